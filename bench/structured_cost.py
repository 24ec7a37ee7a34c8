"""The cost of structured output: steps per canvas and ms per step of generations with a JSON Schema against the
same prompt without one, in one process, the two kinds interleaved (the order flipping every pair) so a slow
spell of a busy machine hits both. The plain generation gets as many canvases as the schema's layout takes.

Also reported: the one-time cost of laying a schema out for a model (the per-token grammar classes are computed
once per vocabulary; the layout is cached per schema), and, per schema generation, the positions re-noised by
the commit rule and the values repaired when the steps ran out.

    python bench/structured_cost.py [--model tiny] [--threads 1] [--runs 8] [--steps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import diffgemma as dg
from diffgemma import structured

SCHEMA = {  # a typical extraction answer: strings, a bounded integer, an enum, a number, a list, an optional field
    "type": "object",
    "properties": {
        "speaker": {"type": "string", "maxLength": 12},
        "act": {"type": "integer", "minimum": 1, "maximum": 5},
        "mood": {"enum": ["calm", "angry", "sad"]},
        "certainty": {"type": "number", "minimum": 0, "maximum": 1},
        "alive": {"type": "boolean"},
        "themes": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
        "aside": {"type": "string", "maxLength": 10},
    },
    "required": ["speaker", "act", "mood", "certainty", "alive", "themes"],
}
PROMPT = "ROMEO:\n"


def run(model: str, threads: int, runs: int, steps: int | None) -> dict:
    with dg.load(model, threads=threads) as m:
        t0 = time.perf_counter()
        lay = structured.lay_out(m, SCHEMA)
        first_layout_ms = 1e3 * (time.perf_counter() - t0)
        structured._layouts.clear()  # a second schema on the same vocabulary: the grammar classes are cached
        t0 = time.perf_counter()
        structured.lay_out(m, SCHEMA)
        layout_ms = 1e3 * (time.perf_counter() - t0)
        L = m.hparams.canvas_length
        kw = dict(steps=steps, chat=False)
        m.generate(PROMPT, max_new_tokens=L, seed=0, **kw)  # warm: graphs built
        m.generate(PROMPT, json_schema=SCHEMA, seed=0, **kw)
        out: dict[str, list] = {"plain": [], "schema": []}
        for i in range(runs):
            for k in ("plain", "schema") if i % 2 == 0 else ("schema", "plain"):
                t0 = time.perf_counter()
                if k == "plain":
                    g = m.generate(PROMPT, max_new_tokens=lay.n_canvas * L, seed=i, **kw)
                else:
                    g = m.generate(PROMPT, json_schema=SCHEMA, seed=i, **kw)
                out[k].append((g, 1e3 * (time.perf_counter() - t0)))
    res: dict = {"model": model, "vocab": m.hparams.n_vocab, "canvas": L, "threads": threads, "runs": runs,
                 "step_budget": steps or m.sampler_defaults.steps, "canvases": lay.n_canvas,
                 "template_positions": lay.n_template, "free_positions": int((~lay.fixed).sum()),
                 "vocab_rows": 0 if lay.table is None else len(lay.table), "first_layout_ms": first_layout_ms,
                 "layout_ms": layout_ms}
    for k, gs in out.items():
        res[k] = {"steps_per_canvas": statistics.mean(c.steps for g, _ in gs for c in g.canvases),
                  "step_ms": statistics.median(g.timings.step_ms for g, _ in gs),
                  "host_ms": statistics.median(g.timings.host_ms for g, _ in gs),
                  "generate_ms": statistics.median(ms for _, ms in gs)}
    gs = [g for g, _ in out["schema"]]
    res["schema"].update(renoised_per_generation=statistics.mean(g.timings.renoised for g in gs),
                         repaired_per_generation=statistics.mean(g.timings.repaired for g in gs),
                         stopped_early=sum(c.stopped_early for g in gs for c in g.canvases) /
                         sum(len(g.canvases) for g in gs), example=gs[0].text)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=8, help="generations of each kind")
    p.add_argument("--steps", type=int, default=None, help="step budget per canvas (default: the file's)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    r = run(a.model, a.threads, a.runs, a.steps)
    s, q = r["schema"], r["plain"]
    print(f"{r['model']}: vocab {r['vocab']} x canvas {r['canvas']}, {r['threads']} thread(s), {r['runs']} runs of "
          f"each, step budget {r['step_budget']}; the schema takes {r['canvases']} canvases ({r['free_positions']} "
          f"of {r['template_positions']} positions free, {r['vocab_rows']} vocabulary rows); layout "
          f"{r['first_layout_ms']:.0f} ms the first time on this vocabulary, {r['layout_ms']:.1f} ms after")
    for name, x in (("plain ", q), ("schema", s)):
        print(f"  {name}: {x['steps_per_canvas']:.1f} steps/canvas, {x['step_ms']:.2f} ms/step (host "
              f"{x['host_ms']:.2f}), {x['generate_ms']:.0f} ms/generation (medians)")
    print(f"  schema: {s['renoised_per_generation']:.1f} positions re-noised and {s['repaired_per_generation']:.2f} "
          f"values repaired per generation; {100 * s['stopped_early']:.0f}% of canvases stopped early; "
          f"ratios: steps/canvas {s['steps_per_canvas'] / q['steps_per_canvas']:.2f}, ms/step "
          f"{s['step_ms'] / q['step_ms']:.3f}")
    print(f"  example: {s['example']}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
