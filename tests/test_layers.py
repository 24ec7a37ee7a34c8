"""The package's layers only point down (docs/architecture.md): every import of a diffgemma module, at the top,
inside a function or under TYPE_CHECKING, goes to the same layer or a lower one, and the import graph has no
circle. Third-party imports are not checked (optional dependencies may be imported lazily anywhere)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "diffgemma"

# One line per module; docs/architecture.md explains each layer. A module missing here fails the test, so a new
# module has to be given its place.
LAYERS: dict[str, list[str]] = {
    "base": ["errors", "version", "outputs", "sampler", "template", "schema_compile", "structured", "chat_format",
             "tool_layout", "images", "ftypes", "layout"],
    "core": ["binding_cdef", "binding", "gguf_file", "weights", "kv", "graph", "tokenizer", "imatrix_file",
             "checkpoint", "mmproj", "multimodal", "vision", "rpc", "devices", "cpu_layout"],
    "engine": ["memory", "sequence", "engine"],
    "generation": ["batching", "generation", "chat", "hub", "model"],
    "tools": ["quant_recipes", "quant_plan", "quantizer", "calibration", "hf_tokenizer", "vision_convert", "converter",
              "bench", "testing"],
    "surfaces": ["server.defaults", "server.errors", "server.auth", "server.layouts", "server.protocol",
                 "server.responses", "server.llama_api", "server.metrics", "server.engine", "server.app",
                 "server.runner", "server", "cli_flags", "cli_display", "cli"],
    "entry": ["__init__", "__main__", "server.__main__"],
}
RANK = {mod: i for i, mods in enumerate(LAYERS.values()) for mod in mods}
LAYER_OF = {mod: name for name, mods in LAYERS.items() for mod in mods}


def module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> set[str]:
    """The diffgemma modules one file imports, wherever the import statement stands."""
    me = module_name(path, root)
    package = me.split(".")[:-1] if path.name != "__init__.py" else me.split(".")
    if me == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("diffgemma."):
                    found.add(alias.name.removeprefix("diffgemma."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module is None or not node.module.startswith("diffgemma"):
                    continue
                base = node.module.split(".")[1:]
            else:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            if node.module is None or node.level == 0 and base == []:
                # `from . import a, b` / `from diffgemma import a`: each name may be a module
                for alias in node.names:
                    name = ".".join([*base, alias.name])
                    found.add(name if name in RANK else ".".join(base) or "__init__")
            else:
                found.add(".".join(base))
    found.discard(me)
    return {known(m) for m in found}


def known(mod: str) -> str:
    """A module's own name, or the package it belongs to ("server.app.x" -> "server.app")."""
    while mod and mod not in RANK and "." in mod:
        mod = mod.rsplit(".", 1)[0]
    return mod or "__init__"


def import_graph(root: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, root): imported_modules(p, root) for p in sorted(root.rglob("*.py"))}


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYER_OF[a]}) imports {b} ({LAYER_OF[b]})"
            for a, targets in graph.items() for b in sorted(targets) if RANK[b] > RANK[a]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(import_graph()) - set(RANK))
    assert not missing, f"give these modules a layer in LAYERS and docs/architecture.md: {missing}"
    stale = sorted(set(RANK) - set(import_graph()))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_only_point_down():
    assert upward(import_graph()) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """Copy the package, add one function-level import of a higher layer, and the checks see it."""
    import shutil

    copy = tmp_path / "diffgemma"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("data", "web", "__pycache__"))
    kv = copy / "kv.py"
    kv.write_text(kv.read_text() + "\n\ndef _oops():\n    from .generation import Generation  # noqa\n")
    graph = import_graph(copy)
    assert "kv (core) imports generation (generation)" in upward(graph)
    assert any("kv" in c for c in cycles(graph))  # generation imports kv (through the engine) too


def test_the_check_catches_a_circle_within_a_layer(tmp_path):
    import shutil

    copy = tmp_path / "diffgemma"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("data", "web", "__pycache__"))
    (copy / "errors.py").write_text((copy / "errors.py").read_text() + "\nif False:\n    from . import outputs\n")
    outputs = (copy / "outputs.py").read_text()
    assert "errors" in outputs
    assert ["errors", "outputs"] in cycles(import_graph(copy))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_files_stay_small(path):
    assert len(path.read_text().splitlines()) <= 620, "split this module (issue 25: files under ~600 lines)"
