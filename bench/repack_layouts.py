"""Repacked weights and batching on the real layouts (CPU): load time, resident memory and the decoder pass at
B = 1, 2, 4, 8 canvases, with and without repack, plus which weight products scale with rows (per node).

Files: the 26B-A4B layout (full widths, 128 experts top-8, a recipe's types) cut to --layers layers (one
sliding, one global, ...) and --vocab tokens, written as synthetic files (testing.write_synthetic), for the
asym-2bitexp and Q4_K_M recipes; and the proportional config of bench/step_latency.py quantized to Q4_K_M
(the mid-size file). Each (file, repack) runs in its own process (clean resident memory), repeats interleaved.

    python bench/repack_layouts.py [--out /tmp/dg-repack] [--layers 2] [--vocab 8192] [--repeats 3]
        [--batches 1,2,4,8] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).parent


def build(out: pathlib.Path, layers: int, vocab: int) -> dict[str, pathlib.Path]:
    import diffgemma as dg
    from diffgemma import testing

    sys.path.insert(0, str(HERE))
    from batch_throughput import PROPORTIONAL
    from full_layout import cut_26b_a4b, recipe_types

    hp = cut_26b_a4b(layers, vocab)
    files = {}
    for recipe in ("asym-2bitexp", "Q4_K_M"):
        path = out / f"26B-A4B-{layers}layers-{recipe}.gguf"
        if not path.exists():
            testing.write_synthetic(path, hp, recipe_types(hp, recipe, out))
        files[f"26B-A4B {layers} layers {recipe}"] = path
    path = out / "proportional-Q4_K_M.gguf"
    if not path.exists():
        php = testing.tiny_hparams(**PROPORTIONAL)
        src = testing.write_model(out / "proportional-f32.gguf", php, weights=testing.random_weights(php, seed=0))
        dg.quantize(src, path, recipe="Q4_K_M", progress=False)
        src.unlink()
    files["proportional Q4_K_M"] = path
    return files


def rss_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, repack: bool, batches: list[int], threads: int, profile: bool) -> dict:
    """One process: load, then one warm and one timed decoder pass per B (ms per canvas), per-node times."""
    import diffgemma as dg

    rss0 = rss_mb()
    t = time.perf_counter()
    m = dg.load(path, threads=threads, repack=repack)
    load_s = time.perf_counter() - t
    out = {"load_s": load_s, "rss_after_load_mb": rss_mb() - rss0, "repacked": len(m.repacked),
           "repacked_bytes": sum(m._file.tensors[n].nbytes for n in m.repacked)}
    hp, L = m.hparams, m.hparams.canvas_length
    rng = np.random.default_rng(1)
    seqs = [m.new_sequence() for _ in range(max(batches))]
    for s in seqs:
        m.prefill([2, *rng.integers(5, hp.n_vocab, 255).tolist()], sequence=s)
    asks = [dg.batching.Denoise(rng.integers(0, hp.n_vocab, L), 0.8, True, rng.random(L, dtype=np.float32))
            for _ in seqs]
    out["pass_ms"] = {}
    for b in batches:
        m.denoise_batch(list(zip(seqs[:b], asks[:b], strict=True)))  # warm: the graph of this shape
        t = time.perf_counter()
        m.denoise_batch(list(zip(seqs[:b], asks[:b], strict=True)))
        out["pass_ms"][b] = 1e3 * (time.perf_counter() - t) / b
    out["rss_after_pass_mb"] = rss_mb() - rss0
    if profile:  # ms per canvas of each weight product (all layers), observed node by node, at B=1 and max B
        from full_layout import node_ms

        out["nodes"] = {}
        for b in (batches[0], batches[-1]):
            pairs = list(zip(seqs[:b], asks[:b], strict=True))
            m.denoise_batch(pairs)  # this shape's graph, built outside the observed pass
            out["nodes"][b] = {k: v / b for k, v in node_ms(m, lambda pairs=pairs: m.denoise_batch(pairs)).items()}
    m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/dg-repack")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only files whose label contains this")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1] == "1", batches, a.threads, a.profile)))
        return
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = build(out, a.layers, a.vocab)
    runs: dict[tuple[str, bool], list[dict]] = collections.defaultdict(list)
    for r in range(a.repeats):  # interleaved: every repeat runs each file with and without repack
        for label, path in files.items():
            if a.only and a.only not in label:
                continue
            for repack in (False, True):
                cmd = [sys.executable, __file__, "--child", str(path), str(int(repack)), "--batches", a.batches,
                       "--threads", str(a.threads)] + (["--profile"] if r == 0 else [])
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                runs[(label, repack)].append(res)
                print(label, "repack" if repack else "mapped", json.dumps(res["pass_ms"]), flush=True)
    (out / "repack_layouts.json").write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in runs.items()}, indent=1))
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"\n{a.threads} threads, median of {a.repeats} interleaved repeats (one process per file and setting)")
    for label in files:
        if (label, False) not in runs:
            continue
        print(f"\n{label}")
        print(f"{'':8s} {'load s':>7s} {'RSS MB':>7s} {'repacked':>9s} " +
              " ".join(f"{'B=' + str(b) + ' ms':>10s}" for b in batches) +
              " " + " ".join(f"{'B=' + str(b) + ' x':>7s}" for b in batches[1:]))
        for repack in (False, True):
            rs = runs[(label, repack)]
            ms = {b: med([r["pass_ms"][str(b)] for r in rs]) for b in batches}
            ratio = {b: med([r["pass_ms"][str(batches[0])] / r["pass_ms"][str(b)] for r in rs]) for b in batches}
            print(f"{'repack' if repack else 'mapped':8s} {med([r['load_s'] for r in rs]):7.2f} "
                  f"{med([r['rss_after_pass_mb'] for r in rs]):7.0f} "
                  f"{rs[0]['repacked_bytes'] / 2**20:7.0f}MB " + " ".join(f"{ms[b]:10.0f}" for b in batches) + " " +
                  " ".join(f"{ratio[b]:6.2f}x" for b in batches[1:]))
        speed = [r0["pass_ms"][str(b)] / r1["pass_ms"][str(b)] for b in batches
                 for r0, r1 in zip(runs[(label, False)], runs[(label, True)], strict=True)]
        print(f"repack speed-up per canvas (all B, per repeat): median {med(speed):.2f}x")
        for repack in (False, True):
            nodes = runs[(label, repack)][0].get("nodes")
            if not nodes:
                continue
            b0, b1 = str(batches[0]), str(batches[-1])
            print(f"  per node, ms per canvas, B={b0} -> B={b1} ({'repack' if repack else 'mapped'}):")
            for k, v in sorted(nodes[b0].items(), key=lambda kv: -kv[1])[:9]:
                print(f"    {k:22s} {v:8.1f} -> {nodes[b1].get(k, float('nan')):8.1f}")


if __name__ == "__main__":
    main()
