"""Per-step cost of template vocabulary masking: a denoising step with the per-position vocabulary bias vs the
plain step, on the same model, canvas and draws, interleaved in one process (CPU). Ratios, not times.

The mask is one extra pass over the [V, L] logits (ggml_add_id: logits + bias[:, row]), so its cost grows with
vocabulary x canvas while the forward grows with the weights; the configs bracket that:
* tiny: the embedded Shakespeare model (vocab 4096, canvas 32);
* vocab: a small synthetic model with the released vocabulary (262144) and a canvas of 128: the sampling
  statistics are most of its step, so this is near the worst case for the mask's relative cost.
The "generate" rows time whole template generations (mask, clamping, host rules) against plain ones with the
same number of steps (stop rule off).

    python bench/template_mask.py [--config tiny|vocab|both] [--threads 2] [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import numpy as np

import diffgemma as dg
from diffgemma import template as tpl
from diffgemma import testing

VOCAB_HP = dict(n_vocab=262144, canvas_length=128, n_embd=128, n_layer=6, n_ff=256, n_ff_exp=64)


def _table(m: dg.Model, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows: any token (fixed positions), digits, one of three tokens; a third of the canvas each."""
    table = np.ones((3, m.hparams.n_vocab), dtype=bool)
    table[1] = tpl.class_mask(m.tokenizer, "digits")
    table[2] = False
    table[2, [40, 41, 42]] = True
    return table, (np.arange(L) % 3).astype(np.int32)


def _steps(m: dg.Model, canvas: np.ndarray, u: np.ndarray, steps: int, vocab: object) -> float:
    """Mean ms of a denoising step (self-conditioning on after the first)."""
    m.denoise_step(canvas, 0.8, False, u, vocab)  # warm: graph built and allocated
    t0 = time.perf_counter()
    for i in range(steps):
        m.denoise_step(canvas, 0.8, i > 0, u, vocab)
    return 1e3 * (time.perf_counter() - t0) / steps


def run(name: str, threads: int, steps: int, repeats: int) -> dict:
    tmp = None
    if name == "tiny":
        path = "tiny"
    else:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="dg-mask-"))
        path = testing.write_model(tmp / "vocab.gguf", testing.tiny_hparams(**VOCAB_HP), wtype="f32")
    with dg.load(path, threads=threads) as m:
        hp = m.hparams
        L, V = hp.canvas_length, hp.n_vocab
        rng = np.random.default_rng(0)
        m.logits(m.tokenize("ROMEO:\n"), rng.integers(0, V, L))  # commit a prompt
        canvas, u = rng.integers(0, V, L), rng.random(L, dtype=np.float32)
        vocab = _table(m, L)
        plain, masked = [], []
        for _ in range(repeats):  # interleaved, so a slow spell of the machine hits both
            plain.append(_steps(m, canvas, u, steps, None))
            masked.append(_steps(m, canvas, u, steps, vocab))
        ratios = [b / a for a, b in zip(plain, masked, strict=True)]
        # whole generations: a template of a third fixed text, a third digits, a third 3-token choice
        third = L // 3
        parts = ["x" * third, dg.Hole(third, "digits"),
                 dg.Hole(L - 2 * third, [40, 41, 42])]
        kw = dict(steps=steps, seed=1, stability=None)
        gen_plain, gen_tpl = [], []
        for _ in range(repeats):
            gen_plain.append(m.generate("ROMEO:\n", max_new_tokens=L, chat=False, **kw).timings.step_ms)
            gen_tpl.append(m.generate("ROMEO:\n", template=parts, chat=False, **kw).timings.step_ms)
        gen_ratios = [b / a for a, b in zip(gen_plain, gen_tpl, strict=True)]
    if tmp is not None:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return {"config": name, "vocab": V, "canvas": L, "threads": threads, "steps": steps, "repeats": repeats,
            "step_ms_plain": statistics.median(plain), "step_ms_masked": statistics.median(masked),
            "step_ratio_median": statistics.median(ratios), "step_ratios": [round(r, 4) for r in ratios],
            "generate_step_ms_plain": statistics.median(gen_plain),
            "generate_step_ms_template": statistics.median(gen_tpl),
            "generate_ratio_median": statistics.median(gen_ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("tiny", "vocab", "both"), default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    names = ("tiny", "vocab") if a.config == "both" else (a.config,)
    results = [run(n, a.threads, a.steps, a.repeats) for n in names]
    for r in results:
        print(f"{r['config']:6s} vocab {r['vocab']:6d} canvas {r['canvas']:3d}: step {r['step_ms_plain']:.3f} ms "
              f"plain, {r['step_ms_masked']:.3f} ms masked, ratio {r['step_ratio_median']:.3f} (median of "
              f"{r['repeats']}: {r['step_ratios']}); whole generate {r['generate_step_ms_plain']:.3f} vs "
              f"{r['generate_step_ms_template']:.3f} ms/step, ratio {r['generate_ratio_median']:.3f}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
