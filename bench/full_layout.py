"""Speed on the real 26B-A4B tensor layout: a synthetic file with the exact shapes and a recipe's types
(random but valid blocks, written in about a minute), then prefill and per-step latency.

    python bench/full_layout.py --recipe asym-2bitexp --out /tmp/dg-full [--n-gpu-layers -1]

Needs ~11 GB of disk for asym-2bitexp (27 GB for q8_0) and, to run it, that much RAM or GPU memory.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import re
import time
from collections.abc import Callable

from tqdm import tqdm

import diffgemma as dg
from diffgemma import bench, binding, layout, testing


def cut_26b_a4b(layers: int, vocab: int | None = None) -> layout.HParams:
    """The 26B-A4B layout (full widths, 128 experts top-8) cut to `layers` layers (sliding, global, sliding, ...)
    and, if given, a `vocab`-token vocabulary: a file of the real shapes that runs on a small machine."""
    swa = tuple(i % 2 == 0 for i in range(layers))
    hp = dataclasses.replace(layout.full_26b_a4b(), n_layer=layers, swa_layers=swa,
                             n_head_kv=tuple(8 if s else 2 for s in swa))
    return hp if vocab is None else dataclasses.replace(hp, n_vocab=vocab)


def node_ms(m: dg.Model, run: Callable[[], object]) -> dict[str, float]:
    """ms per node kind in one call of run() on model m, observed node by node (Model.observe): each weight product
    under its weight ("ffn_down_exps", all layers together), the self-conditioning product as "token_embd_t", the
    rest as "other". Works with older diffgemma trees too (bench/asym_step.py runs it against one)."""
    from diffgemma import weights

    per: dict[str, float] = collections.defaultdict(float)
    last = [0.0]

    def on_node(node: object, ask: bool) -> bool:
        if ask:
            return True
        now = time.perf_counter()
        name = binding.ffi.string(node.name).decode()
        own = weights.weight_of_product(name) or name == "token_embd_t"
        per[re.sub(r"-[0-9]+$", "", name) if own else "other"] += now - last[0]
        last[0] = now
        return True

    with m.observe(on_node):
        last[0] = time.perf_counter()
        run()
    return {k: 1e3 * v for k, v in per.items()}


def recipe_types(hp: layout.HParams, recipe: str, workdir: pathlib.Path) -> dict[str, int]:
    """Per-tensor GGML types the quantizer would choose for `recipe` (a dry run over a sparse Q8_0 layout)."""
    src = testing.write_model(workdir / "layout-q8_0.gguf", hp, wtype="q8_0", sparse=True)
    kw = {"type": recipe} if recipe in ("q8_0", "q4_k", "q6_k", "f16", "bf16") else {"recipe": recipe}
    rep = dg.quantize(src, workdir / "unused.gguf", dry_run=True, progress=False, **kw)
    src.unlink()
    by_name = {binding.type_name(i): i for i in range(binding.GGML_TYPE_COUNT) if binding.type_name(i)}
    return {name: by_name[dst] for name, _shape, _src, dst in rep.tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="asym-2bitexp")
    ap.add_argument("--out", default="/tmp/dg-full")
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hp = layout.full_26b_a4b()
    types = recipe_types(hp, a.recipe, out)
    path = out / f"synthetic-26B-A4B-{a.recipe}.gguf"
    t0 = time.perf_counter()
    total = sum(1 for _ in types)
    with tqdm(total=total, unit="tensor", desc="writing") as bar:
        testing.write_synthetic(path, hp, types, progress=lambda nbytes: bar.update(1))
    write_s = time.perf_counter() - t0
    results = {"file": str(path), "size_bytes": path.stat().st_size, "write_seconds": write_s}
    for prompt in (128, 2048):
        r = bench.bench(path, prompt_tokens=prompt, steps=a.steps, n_gpu_layers=a.n_gpu_layers)
        results[f"prompt_{prompt}"] = r.ours
        print(r.table())
    (out / "full_layout.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("prompt")}))


if __name__ == "__main__":
    main()
