"""What logprobs= costs a denoising step: denoise_step with logprobs None, 0, 5, 20 on a random model with the
tiny shapes but a large vocabulary (the part logprobs works on: top_k over [vocab x canvas] on the device).

    python bench/logprobs_cost.py [--vocab 262144] [--canvas 64] [--threads 1] [--gpu-layers 0]

Each setting runs in blocks of 5 steps (the first of a block builds its graph and is left out); the minimum
of 3 blocks' medians is reported, which tolerates a busy machine.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

import diffgemma as dg
from diffgemma import testing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu-layers", type=int, default=0)
    a = ap.parse_args()
    hp = testing.tiny_hparams(n_vocab=a.vocab, canvas_length=a.canvas)
    with tempfile.TemporaryDirectory() as d:
        path = testing.write_model(pathlib.Path(d) / "m.gguf", hp, weights=testing.random_weights(hp, 0, calm=True))
        with dg.load(path, threads=a.threads, n_gpu_layers=a.gpu_layers) as m:
            rng = np.random.default_rng(0)
            canvas, u = rng.integers(0, a.vocab, a.canvas), rng.random(a.canvas, dtype=np.float32)
            m.prefill(list(range(2, 12)))
            blocks: dict[str, list[float]] = {}
            for _ in range(3):
                for k in (None, 0, 5, 20):
                    times = []
                    for i in range(5):
                        t0 = time.perf_counter()
                        m.denoise_step(canvas, 0.7, i > 0, u, logprobs=k)
                        times.append(time.perf_counter() - t0)
                    blocks.setdefault(str(k), []).append(1e3 * float(np.median(times[1:])))
            print(f"vocab {a.vocab}, canvas {a.canvas}, {m.devices}, threads {a.threads}")
            base = min(blocks["None"])
            for k, ms in blocks.items():
                print(f"  logprobs={k:>4}: {min(ms):8.1f} ms/step  ({min(ms) / base - 1:+.1%})")


if __name__ == "__main__":
    main()
