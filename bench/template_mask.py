"""Per-step cost of template vocabulary masking: a denoising step with the per-position vocabulary bias vs the
plain step, on the same file, canvas and draws, in one process (CPU). Ratios, not times.

Two instances of the model are loaded, one running the plain graph and one the masked graph, and their steps
alternate one by one (the order flipping every pair), so a slow spell of a busy machine hits both; per-step
medians are compared. The mask is one extra pass over the [V, L] logits (ggml_add_id: logits + bias[:, row]),
so its cost grows with vocabulary x canvas while the forward grows with the weights; the configs bracket that:
* tiny: the embedded Shakespeare model (vocab 4096, canvas 32);
* vocab: a small synthetic model with the released vocabulary (262144) and a canvas of 128: the sampling
  statistics are most of its step, so this is near the worst case for the mask's relative cost.
The "generate" figures time whole generations (mask, clamping, host rules), template vs plain, alternating, with
the same number of steps (stop rule off).

    python bench/template_mask.py [--config tiny|vocab|both] [--threads 1] [--steps 60] [--generations 6]
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


def _timed(fn: object, *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return 1e3 * (time.perf_counter() - t0)


def run(name: str, threads: int, steps: int, generations: int) -> dict:
    tmp = None
    if name == "tiny":
        path = "tiny"
    else:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="dg-mask-"))
        path = testing.write_model(tmp / "vocab.gguf", testing.tiny_hparams(**VOCAB_HP), wtype="f32")
    with dg.load(path, threads=threads) as plain, dg.load(path, threads=threads) as masked:
        hp = plain.hparams
        L, V = hp.canvas_length, hp.n_vocab
        rng = np.random.default_rng(0)
        prompt, canvas = plain.tokenize("ROMEO:\n"), rng.integers(0, V, L)
        u = rng.random(L, dtype=np.float32)
        vocab = _table(masked, L)
        for m in (plain, masked):
            m.logits(prompt, canvas)  # commit the prompt
        runs = {"plain": (plain, None), "masked": (masked, vocab)}
        for m, v in runs.values():
            m.denoise_step(canvas, 0.8, False, u, v)  # warm: graph built and allocated
        ms: dict[str, list[float]] = {"plain": [], "masked": []}
        for i in range(steps):
            for k in (("plain", "masked") if i % 2 == 0 else ("masked", "plain")):
                m, v = runs[k]
                ms[k].append(_timed(m.denoise_step, canvas, 0.8, True, u, v))
        # whole generations: a template of a third fixed text, a third digits, a third 3-token choice
        third = L // 3
        parts = ["x" * third, dg.Hole(third, "digits"), dg.Hole(L - 2 * third, [40, 41, 42])]
        kw = dict(steps=20, seed=1, stability=None, chat=False)
        gen: dict[str, list[float]] = {"plain": [], "template": []}
        for i in range(generations):
            for k in (("plain", "template") if i % 2 == 0 else ("template", "plain")):
                if k == "plain":
                    gen[k].append(plain.generate("ROMEO:\n", max_new_tokens=L, **kw).timings.step_ms)
                else:
                    gen[k].append(masked.generate("ROMEO:\n", template=parts, **kw).timings.step_ms)
    if tmp is not None:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    med = {k: statistics.median(v) for k, v in ms.items()}
    gmed = {k: statistics.median(v) for k, v in gen.items()}
    return {"config": name, "vocab": V, "canvas": L, "threads": threads, "steps": steps,
            "generations": generations, "step_ms_plain": med["plain"], "step_ms_masked": med["masked"],
            "step_ratio": med["masked"] / med["plain"],
            "step_ratio_quartiles": [float(q) for q in np.percentile(
                np.array(ms["masked"]) / np.array(ms["plain"]), [25, 50, 75])],
            "generate_step_ms_plain": gmed["plain"], "generate_step_ms_template": gmed["template"],
            "generate_ratio": gmed["template"] / gmed["plain"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("tiny", "vocab", "both"), default="both")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=60, help="timed steps per graph")
    p.add_argument("--generations", type=int, default=6, help="timed generations of each kind (20 steps)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    results = []
    for name in ("tiny", "vocab") if a.config == "both" else (a.config,):
        r = run(name, a.threads, a.steps, a.generations)
        results.append(r)
        q = ", ".join(f"{x:.3f}" for x in r["step_ratio_quartiles"])
        print(f"{r['config']:5s} vocab {r['vocab']:6d} x canvas {r['canvas']:3d}, {r['threads']} thread(s): step "
              f"{r['step_ms_plain']:.3f} ms plain, {r['step_ms_masked']:.3f} ms masked (medians of {r['steps']}), "
              f"ratio {r['step_ratio']:.3f} (pairwise quartiles {q}); whole generate "
              f"{r['generate_step_ms_plain']:.3f} vs {r['generate_step_ms_template']:.3f} ms/step, ratio "
              f"{r['generate_ratio']:.3f}", flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
