"""Decoder-step latency: diffgemma vs transformers on the same weights, in one process (CPU).

A mid-size synthetic DiffusionGemma (hidden 512, 6 layers 5:1, 16 experts top-4, vocab 8192, canvas 64 after a
128-token prompt) is written in F32 and Q8_0; each file is timed with diffgemma (self-conditioning on, sampling
statistics on the device), and transformers (FP32, its default) runs the same weights rebuilt from the F32 file.

    python bench/step_latency.py [--threads 2] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch

from diffgemma import bench, testing


def mid_hparams():
    swa = tuple((i + 1) % 6 != 0 for i in range(6))
    return testing.tiny_hparams(n_layer=6, swa_layers=swa, n_embd=512, n_head=8, n_head_kv_swa=4, n_head_kv_global=1,
                                head_dim=128, head_dim_swa=64, n_ff=1024, n_ff_exp=256, n_expert=16, n_expert_used=4,
                                n_vocab=8192, sliding_window=128, canvas_length=64, rope_dim=128, rope_dim_swa=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hp = mid_hparams()
    d = pathlib.Path(tempfile.mkdtemp(prefix="dg-step-"))
    w = testing.random_weights(hp, seed=0)
    files = {wt: testing.write_model(d / f"mid-{wt}.gguf", hp, wtype=wt, weights=w) for wt in ("f32", "q8_0")}
    ours = {wt: bench.bench(p, prompt_tokens=a.prompt_tokens, steps=a.steps, threads=a.threads).ours
            for wt, p in files.items()}
    ref = bench.hf_model_from_gguf(files["f32"], "float32")
    theirs = bench.transformers_step(ref, prompt_tokens=a.prompt_tokens, canvas=hp.canvas_length, vocab=hp.n_vocab,
                                     steps=a.steps)
    print(f"mid-size config, {a.threads} threads, prompt {a.prompt_tokens}, canvas {hp.canvas_length}, "
          f"{a.steps} timed steps (self-conditioning on)")
    print(f"{'engine':32s} {'ms/step':>9s} {'prefill ms':>11s} {'vs transformers':>16s}")
    print(f"{'transformers FP32':32s} {theirs['step_ms']:9.2f} {theirs['prefill_ms']:11.2f} {'1.00x':>16s}")
    for wt, r in ours.items():
        print(f"{'diffgemma ' + wt.upper() + ' weights':32s} {r['step_ms']:9.2f} {r['prefill_ms']:11.2f} "
              f"{theirs['step_ms'] / r['step_ms']:15.2f}x")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"transformers": theirs, "ours": ours}, indent=1))


if __name__ == "__main__":
    main()
