"""The 26B-A4B's whole context on this machine: a synthetic file with the released layout and a recipe's types
(bench/full_layout.py), loaded with n_ctx=262144 on the CPU; one canvas generated after a short prompt; the
prompt-KV store's size reported, then grown to the full context to show that it is allocated.

    python bench/full_context.py [--recipe asym-2bitexp] [--out /tmp/dg-full] [--steps 2] [--keep]

Needs ~11 GB of disk and memory for the file plus ~5.6 GB for the store; the file is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import time

from full_layout import recipe_types
from tqdm import tqdm

import diffgemma as dg
from diffgemma import kv, layout, testing

N_CTX = 262144


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="asym-2bitexp")
    ap.add_argument("--out", default="/tmp/dg-full")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of the one canvas")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic file")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hp = layout.full_26b_a4b()
    path = out / f"synthetic-26B-A4B-{a.recipe}.gguf"
    try:
        if not path.exists():
            types = recipe_types(hp, a.recipe, out)
            with tqdm(total=len(types), unit="tensor", desc="writing") as bar:
                testing.write_synthetic(path, hp, types, progress=lambda nbytes: bar.update(1))
        t = time.perf_counter()
        with dg.load(path, n_ctx=N_CTX, n_gpu_layers=0) as m:
            res = {"file_bytes": path.stat().st_size, "load_s": time.perf_counter() - t, "n_ctx": m.n_ctx,
                   "kv_type": m.kv_type, "kv_bytes_per_token": m.kv_bytes_per_token,
                   "kv_bytes_at_load": m.kv_bytes,
                   "kv_bytes_at_n_ctx": kv.store_bytes(hp, m.prompt_kv.ttype, N_CTX, m.prompt_kv.room),
                   "ring_bytes": kv.ring_bytes(hp, m.prompt_kv.ttype, m.prompt_kv.room)}
            print(json.dumps(res, indent=1), flush=True)
            t = time.perf_counter()
            g = m.generate([2, 100, 200, 300, 400, 500], max_new_tokens=256, steps=a.steps, seed=0)
            res.update(generate_s=time.perf_counter() - t, new_tokens=len(g.tokens), steps=g.steps,
                       prefill_ms=g.timings.prefill_ms, step_ms=g.timings.step_ms)
            t = time.perf_counter()
            m.prompt_kv.reserve(N_CTX)  # the global layers' store at its full size (what 262,144 tokens use)
            res.update(grow_s=time.perf_counter() - t, kv_bytes_grown=m.kv_bytes,
                       kv_bytes_per_token_at_n_ctx=m.kv_bytes / N_CTX,
                       peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            g2 = m.generate([2, 100, 200, 300, 400, 500], max_new_tokens=256, steps=1, seed=0)
            res["generates_after_growth"] = len(g2.tokens) > 0
        print(json.dumps(res, indent=1))
        (out / "full_context.json").write_text(json.dumps(res, indent=1))
    finally:
        if not a.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
