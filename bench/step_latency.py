"""Decoder-step latency: diffgemma vs transformers on the same weights, in one process (CPU).

Each config is written as a synthetic DiffusionGemma in F32 and Q8_0; each file is timed with diffgemma and
transformers (FP32, its default) runs the same weights rebuilt from the F32 file. A step is each engine's whole
denoising step as its generate loop runs it: diffgemma's device pass (self-conditioning, logits, on-device
argmax / entropy / sample) plus the host rules (acceptance, re-noising, stopping); transformers' own
`_denoising_step` (decoder with cache and self-conditioning, temperature, softmax, multinomial, acceptance,
re-noising, stopping). transformers' bare decoder forward is printed too.

Configs (hidden 512, 6 layers 5 sliding : 1 global, 8 heads, KV 4 / 1, head dim 64 / 128, vocab 8192):
* mid: 16 experts top-4 (width 256), dense width 1024, canvas 64 after 128 prompt tokens;
* proportional: the released model's proportions where they set the work per step: canvas 256 (its canvas),
  128 experts top-8 (as released: 16 canvas tokens per expert on average), expert width hidden / 4 and dense
  width 3/4 hidden (704 and 2112 for hidden 2816), after 256 prompt tokens.

    python bench/step_latency.py [--config mid|proportional|both] [--threads 2] [--steps 20] [--repeats 3]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch

from diffgemma import bench, testing

SWA = tuple((i + 1) % 6 != 0 for i in range(6))
COMMON = dict(n_layer=6, swa_layers=SWA, n_embd=512, n_head=8, n_head_kv_swa=4, n_head_kv_global=1, head_dim=128,
              head_dim_swa=64, n_vocab=8192, sliding_window=128, rope_dim=128, rope_dim_swa=64)
CONFIGS = {
    "mid": (dict(n_ff=1024, n_ff_exp=256, n_expert=16, n_expert_used=4, canvas_length=64), 128),
    "proportional": (dict(n_ff=384, n_ff_exp=128, n_expert=128, n_expert_used=8, canvas_length=256), 256),
}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median step time (its other figures come from the same run)."""
    return sorted(runs, key=lambda r: r["step_ms"])[len(runs) // 2]


def run(name: str, threads: int, steps: int, repeats: int) -> dict:
    extra, prompt = CONFIGS[name]
    hp = testing.tiny_hparams(**COMMON, **extra)
    d = pathlib.Path(tempfile.mkdtemp(prefix="dg-step-"))
    w = testing.random_weights(hp, seed=0)
    files = {wt: testing.write_model(d / f"{name}-{wt}.gguf", hp, wtype=wt, weights=w) for wt in ("f32", "q8_0")}
    ref = bench.hf_model_from_gguf(files["f32"], "float32")
    runs: dict[str, list[dict]] = {"transformers": [], "f32": [], "q8_0": []}
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits both engines
        for wt, p in files.items():
            runs[wt].append(bench.bench(p, prompt_tokens=prompt, steps=steps, threads=threads).ours)
        runs["transformers"].append(bench.transformers_step(ref, prompt_tokens=prompt, canvas=hp.canvas_length,
                                                            vocab=hp.n_vocab, steps=steps))
    for p in files.values():
        p.unlink()
    theirs = _median_run(runs["transformers"])
    ours = {wt: _median_run(runs[wt]) for wt in files}
    print(f"\n{name}: {threads} threads, prompt {prompt}, canvas {hp.canvas_length}, {hp.n_expert} experts "
          f"top-{hp.n_expert_used}, {steps} timed steps (self-conditioning on), median of {repeats} interleaved runs "
          "(all step times: " + "; ".join(f"{k} " + "/".join(f"{r['step_ms']:.1f}" for r in v)
                                          for k, v in runs.items()) + ")")
    print(f"{'engine':34s} {'ms/step':>9s} {'prefill ms':>11s} {'step vs transformers':>21s}")
    print(f"{'transformers FP32 (_denoising_step)':34s} {theirs['step_ms']:9.2f} {theirs['prefill_ms']:11.2f} "
          f"{'1.00x':>21s}")
    print(f"{'transformers FP32 (forward only)':34s} {theirs['forward_ms']:9.2f} {'':11s} {'':>21s}")
    for wt, r in ours.items():
        print(f"{'diffgemma ' + wt.upper() + ' weights':34s} {r['step_ms']:9.2f} {r['prefill_ms']:11.2f} "
              f"{theirs['step_ms'] / r['step_ms']:20.2f}x")
    # The ratio within each interleaved repeat: both engines measured in the same spell of the machine.
    for wt in files:
        ratios = sorted(t["step_ms"] / o["step_ms"] for t, o in zip(runs["transformers"], runs[wt], strict=True))
        print(f"{wt.upper()} ratio per repeat: " + " ".join(f"{x:.2f}x" for x in ratios)
              + f" (median {ratios[len(ratios) // 2]:.2f}x)")
    return {"transformers": theirs, "ours": ours, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per engine; the median is reported")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = list(CONFIGS) if a.config == "both" else [a.config]
    res = {n: run(n, a.threads, a.steps, a.repeats) for n in names}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
