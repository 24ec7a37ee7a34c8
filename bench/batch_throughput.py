"""Batched denoising throughput: committed tokens/s and request latency at max batch B = 1, 2, 4, 8 (CPU).

The proportional config of bench/step_latency.py (canvas 256, 128 experts top-8: ~16 canvas rows per expert,
where the expert products are starved for rows) as a synthetic file. N requests (default 8, prompts of 256
random tokens, one canvas each, a fixed step count so every request does the same work) are submitted at once
to `m.generate_batch(prompts, max_batch=B)`: B = 1 is today's one-at-a-time serving, larger B shares each
decoder pass among up to B canvases and lets waiting requests join between steps. Repeats are interleaved over
B so a slow spell of the shared machine hits every B alike.

Then the server: N concurrent clients (threads, one /v1/completions request each) against `diffgemma serve`
in-process with --max-batch 1 (the serial server) and --max-batch B for the other B. First of all, the bare
decoder pass: `m.denoise_batch` of B canvases (each after its own 256-token prefix), time per canvas.

    python bench/batch_throughput.py [--threads 2] [--steps 8] [--requests 8] [--repeats 3] [--wtype q8_0]
        [--batches 1,2,4,8] [--no-server] [--json out.json]
    python bench/batch_throughput.py --file model.gguf --pass-only --batches 1,2,4   # e.g. the 26B-A4B layout
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

import diffgemma as dg
from diffgemma import server, testing

SWA = tuple((i + 1) % 6 != 0 for i in range(6))
PROPORTIONAL = dict(n_layer=6, swa_layers=SWA, n_embd=512, n_head=8, n_head_kv_swa=4, n_head_kv_global=1,
                    head_dim=128, head_dim_swa=64, n_vocab=8192, sliding_window=128, rope_dim=128, rope_dim_swa=64,
                    n_ff=384, n_ff_exp=128, n_expert=128, n_expert_used=8, canvas_length=256)
PROMPT_TOKENS = 256


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def library_run(m: dg.Model, prompts: list[list[int]], B: int, steps: int) -> dict:
    """All requests submitted at t0; latency = t0 to the request's last canvas."""
    t0 = time.perf_counter()
    done: dict[int, float] = {}
    tokens = 0
    s = m.stream_batch(prompts, max_batch=B, steps=steps, stability=None, seed=list(range(len(prompts))),
                       max_new_tokens=m.hparams.canvas_length, chat=False)
    for i, ev in s:
        if isinstance(ev, dg.CanvasEvent):
            tokens += m.hparams.canvas_length  # committed canvas tokens (an EOS cut does not change the work)
            done[i] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    lat = list(done.values())
    return {"B": B, "wall_s": wall, "tokens_per_s": tokens / wall, "p50_s": percentile(lat, 50),
            "p95_s": percentile(lat, 95)}


def server_run(m: dg.Model, prompts: list[list[int]], B: int, steps: int) -> dict:
    """N clients at once, each one /v1/completions request (token-id prompt), against a server of max batch B."""
    lat: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    with server.Server(m, port=0, max_batch=B, queue_size=len(prompts), log_level="warning") as srv:
        barrier = threading.Barrier(len(prompts) + 1)

        def client(i: int) -> None:
            barrier.wait()
            t = time.perf_counter()
            body = json.dumps({"prompt": prompts[i], "max_tokens": m.hparams.canvas_length, "seed": i,
                               "steps": steps, "stability": None}).encode()
            req = urllib.request.Request(f"{srv.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    answer = json.load(r)
            except urllib.error.HTTPError as e:
                with lock:
                    errors.append(f"{e.code} {e.read()[:200]!r}")
                return
            with lock:
                lat.append(time.perf_counter() - t)
                tokens[0] += m.hparams.canvas_length * len(answer["diffusion"]["canvases"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"server with max batch {B}: {len(errors)} failed requests, e.g. {errors[0]}")
    return {"B": B, "wall_s": wall, "tokens_per_s": tokens[0] / wall, "p50_s": percentile(lat, 50),
            "p95_s": percentile(lat, 95)}


def decoder_pass(m: dg.Model, batches: list[int], repeats: int) -> dict[int, list[float]]:
    """Milliseconds per canvas of one denoise_batch over B canvases, each after its own 256-token prefix."""
    hp, L = m.hparams, m.hparams.canvas_length
    rng = np.random.default_rng(1)
    seqs = [m.new_sequence() for _ in range(max(batches))]
    try:
        for s in seqs:
            m.prefill([2, *rng.integers(5, hp.n_vocab, PROMPT_TOKENS - 1).tolist()], sequence=s)
        asks = [dg.batching.Denoise(rng.integers(0, hp.n_vocab, L), 0.8, True, rng.random(L, dtype=np.float32))
                for _ in seqs]
        out: dict[int, list[float]] = {B: [] for B in batches}
        for B in batches:  # warm: each batch shape's graph built once
            m.denoise_batch(list(zip(seqs[:B], asks[:B], strict=True)))
        for _ in range(repeats):  # interleaved over B
            for B in batches:
                t = time.perf_counter()
                m.denoise_batch(list(zip(seqs[:B], asks[:B], strict=True)))
                out[B].append(1e3 * (time.perf_counter() - t) / B)
        return out
    finally:
        for s in seqs:
            m.free_sequence(s)


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def table(title: str, runs: dict[int, list[dict]]) -> None:
    base = median_run(runs[min(runs)])["tokens_per_s"]
    print(f"\n{title}")
    print(f"{'max batch':>9s} {'tokens/s':>9s} {'vs B=1':>7s} {'p50 latency s':>14s} {'p95 latency s':>14s}  "
          "tokens/s per repeat")
    for B, rs in runs.items():
        r = median_run(rs)
        print(f"{B:9d} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / base:6.2f}x {r['p50_s']:14.2f} "
              f"{r['p95_s']:14.2f}  " + " ".join(f"{x['tokens_per_s']:.1f}" for x in rs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wtype", default="q8_0", choices=("f32", "q8_0"))
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--file", type=pathlib.Path, help="a GGUF to run instead of the synthetic proportional config")
    ap.add_argument("--pass-only", action="store_true", help="only the bare decoder pass (for huge files)")
    ap.add_argument("--json", type=pathlib.Path)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    d = None
    if a.file is None:
        hp = testing.tiny_hparams(**PROPORTIONAL)
        d = pathlib.Path(tempfile.mkdtemp(prefix="dg-batch-"))
        path = testing.write_model(d / f"proportional-{a.wtype}.gguf", hp, wtype=a.wtype,
                                   weights=testing.random_weights(hp, seed=0))
    else:
        path = a.file
    out: dict[str, dict] = {"library": {B: [] for B in batches}, "server": {B: [] for B in batches}}
    try:
        with dg.load(path, threads=a.threads) as m:
            hp = m.hparams
            rng = np.random.default_rng(0)
            prompts = [[2, *rng.integers(5, hp.n_vocab, PROMPT_TOKENS - 1).tolist()] for _ in range(a.requests)]
            out["pass"] = decoder_pass(m, batches, a.repeats)
            if not a.pass_only:
                library_run(m, prompts[:2], 2, 1)  # warm: graphs built once
                for _ in range(a.repeats):  # interleaved over B
                    for B in batches:
                        out["library"][B].append(library_run(m, prompts, B, a.steps))
                        if not a.no_server:
                            out["server"][B].append(server_run(m, prompts, B, a.steps))
    finally:
        if d is not None:
            path.unlink()
            d.rmdir()
    name = a.file.name if a.file else f"proportional config ({a.wtype.upper()})"
    print(f"{name}: canvas {hp.canvas_length}, {hp.n_expert} experts top-{hp.n_expert_used}, {a.threads} threads, "
          f"median of {a.repeats} interleaved repeats")
    print("\nthe decoder pass, m.denoise_batch of B canvases (each after its own 256-token prefix):")
    base = float(np.median(out["pass"][batches[0]]))
    print(f"{'B':>3s} {'ms per canvas':>14s} {'canvases/s vs B=' + str(batches[0]):>20s}  per repeat")
    for B, ms in out["pass"].items():
        med = float(np.median(ms))
        print(f"{B:3d} {med:14.1f} {base / med:19.2f}x  " + " ".join(f"{x:.1f}" for x in ms))
    if not a.pass_only:
        print(f"\n{a.requests} requests of {PROMPT_TOKENS} prompt tokens + one canvas, {a.steps} steps each")
        table("m.generate_batch(prompts, max_batch=B), all submitted at once:", out["library"])
        if not a.no_server:
            table(f"server, {a.requests} concurrent /v1/completions clients, --max-batch B (1 = the serial "
                  "server):", out["server"])
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
