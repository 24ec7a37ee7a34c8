"""What parsing tool calls and thinking costs next to denoising: the server re-parses the committed text after
every canvas (chat_format.OutputStream), so the cost per canvas is compared with one denoising step of a model
in the same run.

    python bench/chat_parse.py [--model tiny] [--canvases 16] [--chars-per-canvas 1000] [-t THREADS]

A synthetic answer (a thought, text and ten calls with nested arguments) is fed canvas by canvas; the model's
mean step time comes from a short generation (adaptive stop off).
"""

from __future__ import annotations

import argparse
import time

import diffgemma as dg
from diffgemma.chat_format import OutputStream

Q = '<|"|>'


def answer(n_chars: int) -> str:
    call = (f"<|tool_call>call:run{{code:{Q}" + 'x = {"a": [1, 2]}; ' * 20 +
            f"{Q},opts:{{deep:[1,2,{{k:true}}]}}}}<tool_call|>")
    text = "<|channel>thought\n" + "thinking hard. " * 200 + "<channel|>"
    while len(text) < n_chars:
        text += "Some answer text. " * 50 + call
    return text[:n_chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--canvases", type=int, default=16)
    ap.add_argument("--chars-per-canvas", type=int, default=1000, help="about 256 tokens of English")
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args()
    text = answer(a.canvases * a.chars_per_canvas)
    cuts = [a.chars_per_canvas * (k + 1) for k in range(a.canvases - 1)]
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        s = OutputStream()
        for c in cuts:
            s.update(text[:c])
        s.update(text, final=True)
    parse_ms = 1e3 * (time.perf_counter() - t0) / reps / a.canvases
    m = dg.load(a.model, threads=a.threads)
    for _ in range(2):  # the first builds the graphs
        g = m.generate("The quick brown fox", max_new_tokens=m.hparams.canvas_length, steps=8, stability=None,
                       seed=0)
    step_ms = g.timings.step_ms
    print(f"answer: {len(text)} chars, {len(s.calls)} calls, {a.canvases} canvases")
    print(f"parse per canvas (whole text so far re-read): {parse_ms:.3f} ms (mean over the answer)")
    print(f"{a.model} denoising step: {step_ms:.3f} ms  ->  parse per canvas / one step = {parse_ms / step_ms:.3f}")


if __name__ == "__main__":
    main()
