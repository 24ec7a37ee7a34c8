"""Which weight layout ggml's CPU backend multiplies fastest, for two products of the 26B-A4B step.

They do not batch: the self-conditioning product (E^T [262144 -> 2816] by a 256-token canvas) in one piece and in
vocabulary blocks, per type; and the dense ffn_down ([2112 -> 2816] by 256 rows) per type. Random weights, one
process, best of --repeats runs of each product.

    python bench/product_kernels.py [--threads 2] [--repeats 3] [--only sc|down]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from diffgemma import binding as B
from diffgemma.graph import Ctx

lib, ffi = B.lib, B.ffi


def quantized(a: np.ndarray, ttype: int) -> np.ndarray:
    """Rows of `a` in ggml type `ttype` (ggml's own quantizer)."""
    a = np.ascontiguousarray(a, np.float32)
    n, k = a.shape
    out = np.empty(lib.ggml_row_size(ttype, k) * n, np.uint8)
    lib.ggml_quantize_chunk(ttype, ffi.cast("float *", ffi.from_buffer(a)), ffi.from_buffer(out), 0, n, k, ffi.NULL)
    return out


def timed(backend, K: int, N: int, M: int, wtype: int, xtype: int, blocks: int, repeats: int) -> float:
    """Best ms of w [K, N] x x [K, M]; with blocks > 1 both are stored block-major ([K / blocks, N, blocks]), one
    product per block and a pairwise sum over the blocks (graph.Graphs.self_cond's scheme)."""
    rng = np.random.default_rng(0)
    kb = K // blocks
    dt = B.DeviceTensors(lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_by_type(B.DEV_TYPE_CPU)),
                         [("w", wtype, (kb, N, blocks)), ("x", xtype, (kb, M, blocks))], what="operands")
    try:
        for t, rows in zip(dt.tensors, (N * blocks, M * blocks), strict=True):
            data = quantized(rng.standard_normal((rows, kb), dtype=np.float32) * 0.05, t.type)
            lib.ggml_backend_tensor_set(t, ffi.from_buffer(data), 0, data.nbytes)
        g = Ctx(64)
        y = g.mul_mat(*dt.tensors)
        while y.ne[2] > 1:
            half = y.ne[2] // 2
            y = g.add(*(g.view_3d(y, N, M, half, y.nb[1], y.nb[2], i * half * y.nb[2]) for i in (0, 1)))
        g.output(y, "y")
        sched = lib.ggml_backend_sched_new(ffi.new("ggml_backend_t[]", [backend]), ffi.NULL, 1, 64, False, True)
        try:
            assert lib.ggml_backend_sched_alloc_graph(sched, g.graph)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                lib.ggml_backend_sched_graph_compute(sched, g.graph)
                best = min(best, time.perf_counter() - t0)
        finally:
            lib.ggml_backend_sched_free(sched)
            g.free()
    finally:
        dt.free()
    return 1e3 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("sc", "down"), default=None)
    a = ap.parse_args()
    cpu = lib.ggml_backend_dev_by_type(B.DEV_TYPE_CPU)
    backend = lib.ggml_backend_dev_init(cpu, ffi.NULL)
    B.set_n_threads(backend, a.threads)
    QT = B.QT
    print(f"{a.threads} threads, best of {a.repeats}")
    if a.only in (None, "sc"):
        K, N, M = 262144, 2816, 256
        print(f"\nself-conditioning product: E^T [{K} -> {N}] x probabilities [{K}, {M}] (both in the type)")
        for name in ("F16", "BF16"):
            t = int(getattr(QT, name))
            for blocks in (1, 16, 64, 256):
                ms = timed(backend, K, N, M, t, t, blocks, a.repeats)
                print(f"  {name:5s} {blocks:4d} blocks of {K // blocks:6d}: {ms:8.1f} ms  "
                      f"{2 * K * N * M / ms / 1e6:6.1f} GFLOP/s", flush=True)
    if a.only in (None, "down"):
        N, M = 2816, 256
        print(f"\ndense down: w [2112 -> {N}] x activations [2112, {M}] (F32; Q6_K: rows of 2304, its block)")
        for name in ("Q5_1", "F32", "BF16", "F16", "Q8_0", "Q5_0", "Q4_1", "Q6_K"):
            K = 2304 if name == "Q6_K" else 2112
            ms = timed(backend, K, N, M, int(getattr(QT, name)), B.F32, 1, a.repeats)
            print(f"  {name:5s}: {ms:6.1f} ms  {2 * K * N * M / ms / 1e6:6.1f} GFLOP/s", flush=True)
    lib.ggml_backend_free(backend)


if __name__ == "__main__":
    main()
