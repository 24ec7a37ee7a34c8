"""Hugging Face downloads: `OWNER/NAME[:QUANT]` and `hf://OWNER/NAME/FILE.gguf` become files in huggingface_hub's
cache (its progress bar, its token, its offline mode HF_HUB_OFFLINE=1). `:QUANT` picks the file as llama.cpp's
`-hf` does, and a repository brings its matching mmproj (the vision tower) when it has one."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

from .errors import Error

SCHEME = "hf://"
# llama.cpp's -hf without a quant: the first of these found, else the first model file of the repository.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SPLIT = re.compile(r"(.+)-(\d{5})-of-(\d{5})", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_NOT_MODELS = ("mmproj", "imatrix")  # .gguf files of a repository that are not the text model
_LISTED = 12  # most file names an error lists


@dataclasses.dataclass(frozen=True)
class GGUFName:
    """What a .gguf file's name says: its quant tag ("Q4_K_M", "" if none) and its split part (1 of 1 if whole)."""

    path: str
    tag: str
    part: int
    parts: int

    @property
    def bits(self) -> int:
        """The tag's first number (Q4_K_M -> 4, BF16 -> 16; 0 without one): how close two quants are."""
        m = re.search(r"\d+", self.tag)
        return int(m.group()) if m else 0


def gguf_name(path: str) -> GGUFName | None:
    """The quant tag and split part of a repository path ending in .gguf, else None."""
    if not path.lower().endswith(".gguf"):
        return None
    stem, part, parts = path[: -len(".gguf")], 1, 1
    if m := _SPLIT.fullmatch(stem):  # NAME-00001-of-00003.gguf
        stem, part, parts = m.group(1), int(m.group(2)), int(m.group(3))
    tag = _TAG.search(stem.rsplit("/", 1)[-1])
    return GGUFName(path, tag.group(1).upper() if tag else "", part, parts)


def is_hf(path: Any) -> bool:
    """Whether a model argument names a Hugging Face repository or file (`hf://...`)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """(repo, quant, file) of "OWNER/NAME", "OWNER/NAME:QUANT", "hf://OWNER/NAME[:QUANT]" or
    "hf://OWNER/NAME/PATH/FILE.gguf" (quant None: the default; file None: chosen by quant)."""
    if not isinstance(spec, str):
        raise Error(f"a Hugging Face model is a str OWNER/NAME[:QUANT] or hf://OWNER/NAME/FILE.gguf, got {spec!r}")
    rest = spec[len(SCHEME):] if spec.startswith(SCHEME) else spec
    owner, _, tail = rest.partition("/")
    name, _, file = tail.partition("/")
    quant = None
    if not file:
        name, _, quant = name.partition(":")
    repo = f"{owner}/{name}"
    if not _REPO.fullmatch(repo) or (file and not file.lower().endswith(".gguf")):
        raise Error(f"{spec!r} is not a Hugging Face model: give OWNER/NAME[:QUANT] "
                    "(e.g. unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M) or hf://OWNER/NAME/FILE.gguf")
    return repo, quant or None, file or None


def resolve_hf(spec: str, *, filename: str | None = None,
               mmproj: str | os.PathLike | bool | None = None) -> tuple[pathlib.Path, Any]:
    """The local paths (model, mmproj) of a Hugging Face model, downloaded into huggingface_hub's cache unless
    they are there already (with HF_HUB_OFFLINE=1 only the cache is read).

    spec: "OWNER/NAME[:QUANT]" (hf:// in front or not) picks the model file as llama.cpp's -hf does: the
    first .gguf whose path has QUANT followed by "." or "-" (any case), by default Q4_K_M, else Q8_0, else the
    first model file; "hf://OWNER/NAME/PATH/FILE.gguf" names the file. filename: a quant tag or a file path in
    the repository, overriding the spec's quant. mmproj: None fetches the repository's mmproj*.gguf beside the
    model (the closest in precision) when the model was chosen by repository and quant (not named by an
    hf:// file path); False fetches none; a path is returned as given. An unknown repository, file or quant is
    an Error listing what the repository offers; so is one not in the cache while offline."""
    repo, quant, file = parse(spec)
    named_by_path = file is not None and filename is None  # a file path brings only that file, as a local path
    if filename is not None:
        if not isinstance(filename, str) or not filename:
            raise Error(f"filename must be a quant tag or a .gguf file of {repo}, got {filename!r}")
        quant, file = (None, filename) if filename.lower().endswith(".gguf") else (filename, None)
    files, where = _repo_files(repo)
    chosen = _find(files, file, repo, where) if file else choose(files, quant, repo, where)
    name = gguf_name(chosen)
    if name is not None and name.parts > 1:  # refuse before downloading parts the reader cannot load
        whole = sorted({n.tag or n.path for n in map(gguf_name, _models(files)) if n.parts == 1})
        raise Error(f"{chosen} of {repo} is split into {name.parts} files; diffgemma reads single-file GGUFs: "
                    f"pick another quant ({', '.join(whole) or 'none is whole'}) or join the parts with llama.cpp's "
                    "llama-gguf-split --merge and load the result")
    model_path = _download(repo, chosen)
    if mmproj is None and not named_by_path:
        sibling = choose_mmproj(files, chosen)
        return model_path, _download(repo, sibling) if sibling else None
    return model_path, None if mmproj is False else mmproj


def choose(files: list[str], quant: str | None, repo: str = "the repository", where: str = "") -> str:
    """The model file llama.cpp's -hf REPO:QUANT takes among a repository's files (the first part of a split)."""
    firsts = sorted(f for f in _models(files) if gguf_name(f).part == 1)
    for tag in [quant] if quant else DEFAULT_QUANTS:
        pattern = re.compile(re.escape(tag) + r"[.-]", re.IGNORECASE)
        found = next((f for f in firsts if pattern.search(f)), None)
        if found:
            return found
    if quant is None and firsts:
        return firsts[0]
    if not firsts:
        raise Error(f"{repo}{where} has no .gguf model file ({_some(files) or 'no files'})")
    tags = list(dict.fromkeys(gguf_name(f).tag or f for f in firsts))
    raise Error(f"{repo}{where} has no {quant} file; it offers {', '.join(tags)} (files: {_some(_ggufs(files))})")


def choose_mmproj(files: list[str], model: str) -> str | None:
    """The repository's mmproj*.gguf for `model` as llama.cpp picks it: in the model's folder or the nearest one
    above it, then the closest in bits to the model's quant (F16 before F32 for a Q4_K_M); None if none."""
    folder = model.split("/")[:-1]
    bits = gguf_name(model).bits
    best, best_key = None, None
    for f in files:
        name = gguf_name(f)
        if name is None or name.parts > 1 or "mmproj" not in f.lower():
            continue
        where = f.split("/")[:-1]
        if where != folder[:len(where)]:
            continue
        key = (-len(where), abs(name.bits - bits))
        if best_key is None or key < best_key:
            best, best_key = f, key
    return best


def _models(files: list[str]) -> list[str]:
    return [f for f in files if gguf_name(f) and not any(w in f.rsplit("/", 1)[-1].lower() for w in _NOT_MODELS)]


def _ggufs(files: list[str]) -> list[str]:
    return [f for f in files if gguf_name(f)]


def _some(files: list[str]) -> str:
    shown = ", ".join(files[:_LISTED])
    return shown + (f", ... ({len(files)} in all)" if len(files) > _LISTED else "")


def _find(files: list[str], file: str, repo: str, where: str) -> str:
    """The repository path of `file` (any case, as llama.cpp's --hf-file)."""
    found = next((f for f in files if f.lower() == file.lower()), None)
    if found is None:
        raise Error(f"{repo}{where} has no file {file}; its .gguf files: {_some(_ggufs(files)) or 'none'}")
    return found


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants  # a submodule the package loads lazily
    except ImportError as e:  # a dependency, but an environment may lack it
        raise Error("Hugging Face downloads need huggingface_hub: pip install 'huggingface-hub>=0.24'") from e
    return huggingface_hub


def _offline() -> bool:
    return bool(_hub().constants.HF_HUB_OFFLINE)


def _repo_files(repo: str) -> tuple[list[str], str]:
    """The repository's file paths, from the Hub, else (offline, or the Hub unreachable) from the cache as
    llama.cpp does; the second value says where the list came from when it is the cache (for errors)."""
    hub = _hub()
    from huggingface_hub.utils import RepositoryNotFoundError

    failure = "HF_HUB_OFFLINE=1"
    if not _offline():
        try:
            return sorted(hub.HfApi().list_repo_files(repo)), ""
        except RepositoryNotFoundError as e:
            raise Error(f"no Hugging Face repository {repo} (a private one needs a login: `hf auth login` or "
                        "HF_TOKEN)") from e
        except Exception as e:  # no network, the Hub down: the cache may still hold the files
            failure = f"the Hub is unreachable: {type(e).__name__}: {e}"
    cached = _cached_files(repo)
    if cached is None:
        raise Error(f"{repo} is not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE}) and {failure}: "
                    "nothing to load (run once online to download it)")
    return cached, f" (in the cache; {failure})"


def _cached_files(repo: str) -> list[str] | None:
    """The files of the repository's main revision in huggingface_hub's cache (models--OWNER--NAME/refs/main
    names the snapshot folder), or None when the cache has no such snapshot."""
    hub = _hub()
    from huggingface_hub.file_download import repo_folder_name

    folder = pathlib.Path(hub.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        snapshot = folder / "snapshots" / (folder / "refs" / "main").read_text().strip()
    except OSError:
        return None
    if not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _download(repo: str, path: str) -> pathlib.Path:
    """A repository file's path in the cache, downloaded with huggingface_hub's progress bar if it is not there."""
    hub = _hub()
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError

    try:  # the cache and offline mode as huggingface_hub.constants say now (0.24 binds them at import)
        return pathlib.Path(hub.hf_hub_download(repo, path, cache_dir=hub.constants.HF_HUB_CACHE,
                                                local_files_only=_offline()))
    except GatedRepoError as e:
        raise Error(f"{repo} is gated: accept its terms on https://huggingface.co/{repo} and log in "
                    "(`hf auth login` or HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE=1" if _offline() else "the Hub is unreachable"
        raise Error(f"{path} of {repo} is not in the Hugging Face cache and {why}") from e
    except Exception as e:  # HTTP errors, a full disk: say which file
        raise Error(f"downloading {path} of {repo} failed: {type(e).__name__}: {e}") from e
