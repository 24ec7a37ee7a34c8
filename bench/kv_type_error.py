"""Logit error of the F16 prompt-KV store against the F32 store and against transformers, on the golden
configs of tests/test_golden.py (tiny random transformers models, F32 weights, prompts of 3, 9, 30 and 300).

    python bench/kv_type_error.py
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import hf_reference as ref  # noqa: E402
from test_golden import CONFIGS  # noqa: E402

import diffgemma as dg  # noqa: E402


def main() -> None:
    d = pathlib.Path(tempfile.mkdtemp(prefix="dg-kvtype-"))
    print(f"{'config':14s} {'prompt':>6s} {'flash':>5s} {'|f16-f32| max':>14s} {'mean':>9s} "
          f"{'|f32-hf| max':>13s} {'|f16-hf| max':>13s}")
    for name, kw in CONFIGS.items():
        hf = ref.make_hf_model(d / name, seed=11, **kw)
        path = dg.convert(d / name, d / f"{name}.gguf", outtype="f32", progress=False)
        for flash in ("on", "off"):
            with dg.load(path, kv_type="f32", flash_attn=flash) as a, dg.load(path, flash_attn=flash) as b:
                hp = a.hparams
                for n in (3, 9, 30, 300):
                    rng = np.random.default_rng(n)
                    prompt = [2] + rng.integers(7, hp.n_vocab, n - 1).tolist()
                    canvas = rng.integers(0, hp.n_vocab, hp.canvas_length).tolist()
                    want = ref.hf_logits(hf, prompt, canvas)
                    f32, f16 = a.logits(prompt, canvas), b.logits(prompt, canvas)
                    e = np.abs(f16 - f32)
                    print(f"{name:14s} {n:6d} {flash:>5s} {e.max():14.2e} {e.mean():9.2e} "
                          f"{np.abs(f32 - want).max():13.2e} {np.abs(f16 - want).max():13.2e}")


if __name__ == "__main__":
    main()
