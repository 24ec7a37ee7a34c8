"""What runs where on each non-CPU device, and how long it takes against the CPU in the same run.

For every graph the engine runs (encoder chunk, decoder pass at B=1 and B=4, logits, the template mask, the vision
tower) on a model fully offloaded to a device: the scheduler's split count, the ops it left on the CPU, the median
time of the call against the same call on a CPU-only model loaded beside it (a ratio: lavapipe is a software
driver, not a speed target), and, for RPC devices, the bytes and round trips each call cost on the wire.

    python bench/devices.py [--file F.gguf] [--device Vulkan0,RPC0] [--rpc HOST:PORT | --rpc local] [--repeat 5]
                            [--n-gpu-layers -1] [--json out.json]

--rpc local starts `diffgemma rpc-server` (serving the CPU) on a free localhost port for the run. Without
--file: the embedded model ("tiny") and a random vision tower of its width.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

import diffgemma as dg
from diffgemma import binding as B
from diffgemma import rpc, testing
from diffgemma import template as tpl
from diffgemma.batching import Denoise

NO_WORK = {"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}  # nodes that move no data


def _graph_report(sched: Any, graph: Any) -> dict:
    """Split count and the ops each backend ran (compute ops only, by ggml op name)."""
    where: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(B.lib.ggml_graph_n_nodes(graph)):
        node = B.lib.ggml_graph_node(graph, i)
        op = B.cstr(B.lib.ggml_op_desc(node))
        if op in NO_WORK:
            continue
        backend = B.lib.ggml_backend_sched_get_tensor_backend(sched, node)
        name = "?" if backend == B.NULL else B.cstr(B.lib.ggml_backend_name(backend))
        where[name][op] += 1
    return {"splits": int(B.lib.ggml_backend_sched_get_n_splits(sched)),
            "copies": int(B.lib.ggml_backend_sched_get_n_copies(sched)),
            "ops": {k: dict(v) for k, v in where.items()},
            "cpu_ops": dict(where.get("CPU", {}))}


def _median_ms(fn: Any, repeat: int, warm: bool = True) -> float:
    if warm:
        fn()  # graph built and allocated, pipelines compiled
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class Calls:
    """The engine's graphs as calls on one loaded model; `graph()` names the graph the last call ran."""

    def __init__(self, m: dg.Model, seed: int = 0) -> None:
        self.m = m
        hp = m.hparams
        rng = np.random.default_rng(seed)
        self.L = hp.canvas_length
        self.prompt = rng.integers(5, hp.n_vocab, min(m.n_batch, 128)).astype(np.int32)
        self.canvas = rng.integers(0, hp.n_vocab, self.L)
        self.u = np.full(self.L, 0.5, np.float32)
        self.seqs = [m.new_sequence() for _ in range(4)]
        for s in self.seqs:
            m.prefill(self.prompt, sequence=s)
        m.prefill(self.prompt)
        table = np.ones((2, hp.n_vocab), dtype=bool)
        table[1] = tpl.class_mask(m.tokenizer, "digits")
        self.vocab = (table, (np.arange(self.L) % 2).astype(np.int32))
        self.image = None
        if m.vision is not None:
            vh = m.vision.hparams
            cols = rows = 4 * vh.pool
            self.image = (rng.random((rows * cols, 3 * vh.patch_size ** 2), dtype=np.float32), cols, rows)

    def finish(self) -> None:
        """Wait for remote devices: ggml sends an RPC graph without waiting for it to run (no reply is due), so
        a call whose results stay on the server would be timed before its work is done; a memory query is
        answered only once the server has run everything sent before it."""
        for d in self.m.placement.devices:
            if d.relay is not None:
                d.free_now()

    def encoder_chunk(self) -> None:
        self.m.reset()
        self.m.encode(self.prompt)

    def decoder_b1(self) -> None:
        self.m.denoise_step(self.canvas, 0.9, True, self.u)

    def decoder_b4(self) -> None:
        self.m.denoise_batch([(s, Denoise(self.canvas, 0.9, True, self.u)) for s in self.seqs])

    def logits(self) -> None:
        self.m.logits(self.prompt, self.canvas)

    def template_mask(self) -> None:
        self.m.denoise_step(self.canvas, 0.9, True, self.u, vocab=self.vocab)

    def vision(self) -> None:
        self.m.vision.encode(*self.image)

    def graph(self, name: str) -> tuple[Any, Any]:
        if name == "vision":
            return self.m.vision.sched, self.m.vision._graph[1].graph
        return self.m.sched, self.m._graph.ctx.graph


GRAPHS = ["encoder_chunk", "decoder_b1", "decoder_b4", "logits", "template_mask", "vision"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_server() -> tuple[str, subprocess.Popen]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffgemma", "rpc-server", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    for _ in range(300):
        try:
            rpc.probe(endpoint, timeout=5)
            return endpoint, proc
        except dg.Error:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the local rpc-server did not start")


def run(path: Any, mmproj: Any, targets: list[str], servers: list[str], repeat: int, ngl: int) -> dict:
    out: dict[str, Any] = {"file": str(path), "repeat": repeat, "devices": {}}
    with dg.load(path, device="cpu", mmproj=mmproj) as cpu:
        base = Calls(cpu)
        cpu_ms = {g: _median_ms(getattr(base, g), repeat) for g in GRAPHS if g != "vision" or base.image}
        out["cpu_ms"] = cpu_ms
        for target in targets:
            with dg.load(path, device=target, rpc=servers or None, mmproj=mmproj, n_gpu_layers=ngl) as m:
                calls = Calls(m)
                relay = m.placement.output.relay
                res = {"placement": m.placement.describe()}
                for g in cpu_ms:
                    def call(g: str = g, calls: Calls = calls) -> None:
                        getattr(calls, g)()
                        calls.finish()

                    call()  # warm-up (graph built and sent once), not counted below
                    before = dict(relay.stats) if relay else None
                    ms = _median_ms(call, repeat, warm=False)
                    rep = _graph_report(*calls.graph(g))
                    rep.update(ms=round(ms, 2), ratio_to_cpu=round(ms / cpu_ms[g], 2))
                    if relay is not None:  # per call, the memory query of finish() left out (1 round trip, 29 B)
                        per = {k: (relay.stats[k] - before[k]) / repeat for k in before}
                        per["round_trips"] -= 1
                        per["messages"] -= 1
                        per["bytes_sent"] -= 13
                        per["bytes_received"] -= 24
                        rep["rpc_per_call"] = {k: round(v) for k, v in per.items()}
                    res[g] = rep
                out["devices"][target] = res
    return out


def table(res: dict) -> str:
    lines = [f"file {res['file']}; median of {res['repeat']} calls"]
    for dev, r in res["devices"].items():
        lines.append(f"\n{dev}: {r['placement']}")
        lines.append(f"  {'graph':14s} {'splits':>6s} {'ms':>9s} {'x CPU':>7s}  ops left on the CPU / RPC per call")
        for g in GRAPHS:
            if g not in r:
                continue
            x = r[g]
            cpu_ops = ", ".join(f"{k} x{v}" for k, v in sorted(x["cpu_ops"].items())) or "none"
            wire = x.get("rpc_per_call")
            extra = (f"; {wire['round_trips']} round trips, {wire['bytes_sent']:,} B up, "
                     f"{wire['bytes_received']:,} B down") if wire else ""
            lines.append(f"  {g:14s} {x['splits']:6d} {x['ms']:9.2f} {x['ratio_to_cpu']:7.2f}  {cpu_ops}{extra}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default=None, help="a diffusion-gemma GGUF (default: the embedded model)")
    ap.add_argument("--mmproj", default=None, help="its vision tower (default with no --file: a random one)")
    ap.add_argument("--device", default=None, help="devices to bench, comma-separated (default: every non-CPU one)")
    ap.add_argument("--rpc", default=None, help="HOST:PORT,... of RPC servers, or 'local' to start one here")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--json", default=None, help="write the results here too")
    a = ap.parse_args()
    proc = None
    servers = []
    if a.rpc == "local":
        endpoint, proc = _local_server()
        servers = [endpoint]
    elif a.rpc:
        servers = a.rpc.split(",")
    try:
        path, mmproj = a.file or "tiny", a.mmproj
        if a.file is None and mmproj is None:
            width = dg.load("tiny", device="cpu").hparams.n_embd
            mmproj = testing.write_random_mmproj(pathlib.Path(tempfile.mkdtemp()) / "mmproj.gguf", n_proj=width)
        targets = a.device.split(",") if a.device else [
            d.name for d in dg.list_devices(servers or None) if not d.is_cpu and d.type in ("gpu", "igpu")]
        res = run(path, mmproj, targets, servers, a.repeat, a.n_gpu_layers)
        print(table(res))
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(res, indent=1))
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
