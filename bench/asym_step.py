"""The 26B-A4B asym-2bitexp denoising step on CPU against an older commit, in one run, repeats interleaved.

The file is the released layout (full widths, 128 experts top-8, the full 262,144-token vocabulary, the
asym-2bitexp recipe's types) cut to --layers layers (sliding, global, ...), written as a synthetic file; or any
GGUF given with --file (e.g. the whole 30-layer file from bench/full_layout.py). Each (version, repeat) runs in
its own process with that version's `python/` tree (`git archive`), its own defaults and environment: a 256-token
prompt, one step without self-conditioning (warm-up), then --steps timed steps with it.

    python bench/asym_step.py [--against 86ff61f] [--layers 2 | --file F.gguf] [--repeats 3] [--steps 4]
        [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
# set by diffgemma at import unless the user set them: a child must get what its own version sets, not ours
OWN_ENV = ("GGML_CPU_TILED_MM_FORCE", "OMP_WAIT_POLICY")


def build(path: pathlib.Path, layers: int) -> None:
    """The asym-2bitexp layout cut to `layers` layers with the full vocabulary (runs in a child of this tree)."""
    from full_layout import cut_26b_a4b, recipe_types

    from diffgemma import testing

    hp = cut_26b_a4b(layers)
    testing.write_synthetic(path, hp, recipe_types(hp, "asym-2bitexp", path.parent))


def child(path: str, steps: int, threads: int, profile: bool) -> dict:
    """One process: load, a 256-token prompt, a warm step, then `steps` timed steps (ms each)."""
    import diffgemma as dg

    t = time.perf_counter()
    m = dg.load(path, threads=threads)
    out: dict = {"load_s": time.perf_counter() - t}
    hp, L = m.hparams, m.hparams.canvas_length
    rng = np.random.default_rng(1)
    m.prefill([2, *rng.integers(5, hp.n_vocab, 255).tolist()])
    canvas = rng.integers(0, hp.n_vocab, L)
    u = rng.random(L, dtype=np.float32)
    m.denoise_step(canvas, 0.8, False, u)  # warm: the graph, E^T, the first touch of every weight page
    out["step_ms"] = []
    for _ in range(steps):
        t = time.perf_counter()
        m.denoise_step(canvas, 0.8, True, u)
        out["step_ms"].append(1e3 * (time.perf_counter() - t))
    if profile:  # ms per step by node kind (weight products by weight, the rest as "other")
        from full_layout import node_ms

        out["nodes"] = node_ms(m, lambda: m.denoise_step(canvas, 0.8, True, u))
    m.close()
    return out


def run(tree: pathlib.Path, args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OWN_ENV}
    env["PYTHONPATH"] = str(tree)
    res = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="86ff61f", help="the commit to compare with (default: main before issue 28)")
    ap.add_argument("--file", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/dg-asym")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="per-node times of one step in the first repeat")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child[0] == "build":
            build(pathlib.Path(a.child[1]), a.layers)
            print("{}")
        else:
            print(json.dumps(child(a.child[1], a.steps, a.threads, a.profile)))
        return
    path = pathlib.Path(a.file) if a.file else pathlib.Path(a.out) / f"asym-2bitexp-{a.layers}layers-fullvocab.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run(ROOT / "python", ["--child", "build", str(path), "--layers", str(a.layers)])
    with tempfile.TemporaryDirectory() as tmp:
        old = pathlib.Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.against, "python"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {a.against: old / "python", "this tree": ROOT / "python"}
        runs: dict[str, list[dict]] = collections.defaultdict(list)
        for r in range(a.repeats):  # interleaved: each repeat runs both versions
            for label, tree in trees.items():
                args = ["--child", "run", str(path), "--steps", str(a.steps), "--threads", str(a.threads)]
                res = run(tree, args + (["--profile"] if a.profile and r == 0 else []))
                runs[label].append(res)
                print(f"repeat {r}: {label:10s} ms/step " + " ".join(f"{x:.0f}" for x in res["step_ms"]), flush=True)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"\n{path.name}, {a.threads} threads, {a.steps} steps x {a.repeats} interleaved repeats")
    base = [med(x["step_ms"]) for x in runs[a.against]]
    for label in trees:
        ms = [med(x["step_ms"]) for x in runs[label]]
        print(f"{label:10s} median ms/step {med(ms):8.0f}   per repeat " + " ".join(f"{x:.0f}" for x in ms) +
              "   speed-up per repeat " + " ".join(f"{b / x:.2f}x" for b, x in zip(base, ms, strict=True)))
    if a.profile:
        nodes = {label: runs[label][0]["nodes"] for label in trees}
        keys = sorted(set().union(*nodes.values()), key=lambda k: -max(n.get(k, 0.0) for n in nodes.values()))
        print("\nper node, ms in one step: " + "  ".join(f"{label:>10s}" for label in trees))
        for k in keys[:14]:
            print(f"  {k:22s} " + "  ".join(f"{nodes[label].get(k, float('nan')):10.1f}" for label in trees))


if __name__ == "__main__":
    main()
