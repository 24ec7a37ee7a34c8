"""Long context on the mid config: prefill tokens/s at 1k, 8k and 32k prompt tokens and the decoder's ms/step
at those committed lengths, diffgemma vs transformers on the same weights in the same run (CPU).

The mid config of bench/step_latency.py (hidden 512, 6 layers 5 sliding : 1 global, window 128, 16 experts
top-4, vocab 8192, canvas 64), F32 weights, context 65536. diffgemma: the default F16 prompt-KV store, prompt
encoded in chunks of n_batch=512, step = `denoise_step` (forward with self-conditioning plus the on-device
argmax / entropy / sample). transformers (FP32): its encoder over the prompt in one call where the attention
scores fit in --hf-mem-gb (8 heads x n^2 x 4 B per layer), else in chunks of 512 through its DynamicCache (the
way its generate appends canvases); step = its decoder forward with the cache and self-conditioning logits.

    python bench/long_context.py [--lengths 1024 8192 32768] [--threads 2] [--steps 5] [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
import torch
from step_latency import COMMON, CONFIGS  # bench/ is the script's directory

import diffgemma as dg
from diffgemma import bench, testing


def ours(path: pathlib.Path, lengths: list[int], threads: int, steps: int, n_batch: int) -> dict[int, dict]:
    out = {}
    with dg.load(path, threads=threads, n_batch=n_batch) as m:
        hp = m.hparams
        L = hp.canvas_length
        rng = np.random.default_rng(0)
        canvas, u = rng.integers(0, hp.n_vocab, L), np.full(L, 0.5, np.float32)
        for n in lengths:
            prompt = rng.integers(5, hp.n_vocab, n).astype(np.int32)
            m.reset()
            t = time.perf_counter()
            m.encode(prompt)
            prefill = time.perf_counter() - t
            m.denoise_step(canvas, 0.8, False, u)  # graph build and warm-up
            t = time.perf_counter()
            for _ in range(steps):
                m.denoise_step(canvas, 0.7, True, u)
            step_ms = 1e3 * (time.perf_counter() - t) / steps
            out[n] = {"prefill_s": prefill, "prefill_tok_s": n / prefill, "step_ms": step_ms,
                      "kv_bytes": m.kv_bytes, "kv_bytes_per_token": m.kv_bytes_per_token}
            print(f"diffgemma     n={n:6d}  prefill {prefill:7.2f} s ({n / prefill:7.0f} tok/s)  "
                  f"step {step_ms:7.1f} ms  store {m.kv_bytes / 1e6:.1f} MB", flush=True)
    return out


def theirs(path: pathlib.Path, lengths: list[int], steps: int, mem_gb: float) -> dict[int, dict]:
    from transformers import DynamicCache

    model = bench.hf_model_from_gguf(path, "float32")
    cfg = model.config.get_text_config(decoder=True)
    hp = dg.gguf_file.validate(dg.gguf_file.read(path))
    L = hp.canvas_length
    g = torch.Generator().manual_seed(0)
    cv = torch.randint(0, hp.n_vocab, (1, L), generator=g)
    out = {}
    for n in lengths:
        prompt = torch.randint(5, hp.n_vocab, (1, n), generator=g)
        one_shot = hp.n_head * n * n * 4 / 1e9 <= mem_gb
        chunk = n if one_shot else 512
        cache = DynamicCache(config=cfg)
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, n, chunk):
                ids = prompt[:, s:s + chunk]
                pos = torch.arange(s, s + ids.shape[1])[None]
                cache = model.model.encoder(input_ids=ids, cache=cache, position_ids=pos).cache
        prefill = time.perf_counter() - t
        positions = torch.arange(n, n + L)[None]
        with torch.no_grad():
            sc = model(cache=cache, decoder_input_ids=cv, decoder_position_ids=positions).logits / 0.8
            t = time.perf_counter()
            for _ in range(steps):
                model(cache=cache, decoder_input_ids=cv, decoder_position_ids=positions, self_conditioning_logits=sc)
            step_ms = 1e3 * (time.perf_counter() - t) / steps
        how = "one call" if one_shot else "chunks of 512"
        out[n] = {"prefill_s": prefill, "prefill_tok_s": n / prefill, "step_ms": step_ms, "prefill": how}
        print(f"transformers  n={n:6d}  prefill {prefill:7.2f} s ({n / prefill:7.0f} tok/s, {how})  "
              f"step {step_ms:7.1f} ms", flush=True)
        del cache
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--hf-mem-gb", type=float, default=4.0,
                    help="largest attention-score tensor transformers may build in one prefill call")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hp = testing.tiny_hparams(**COMMON, **CONFIGS["mid"][0], context_length=65536)
    d = pathlib.Path(tempfile.mkdtemp(prefix="dg-long-"))
    path = testing.write_model(d / "mid-f32.gguf", hp, wtype="f32", weights=testing.random_weights(hp, seed=0))
    try:
        res = {"ours": ours(path, a.lengths, a.threads, a.steps, a.n_batch)}
        if not a.no_transformers:
            res["transformers"] = theirs(path, a.lengths, a.steps, a.hf_mem_gb)
            for n in a.lengths:
                o, t = res["ours"][n], res["transformers"][n]
                print(f"n={n:6d}  prefill {o['prefill_tok_s'] / t['prefill_tok_s']:.2f}x  "
                      f"step {t['step_ms'] / o['step_ms']:.2f}x  (transformers time / ours)")
    finally:
        path.unlink()
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
