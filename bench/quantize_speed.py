"""Quantization throughput: diffgemma.quantize vs llama.cpp's llama_model_quantize, same data, same types.

    PYTHONPATH=python python bench/quantize_speed.py [--types q8_0,q4_K,iq4_nl] [--threads N] [--layers 4]
                                                     [--repeat N] [--no-iq2s]

Writes a random-weight BF16 `diffusion-gemma` file, and an equivalent file for libllama (the architecture
renamed to `gemma4`, which libllama knows and whose layer body this model shares: same tensors, names, shapes
and bytes), then times both quantizers in this process on the same threads. libllama runs with `pure` (every
quantizable tensor gets the file type's base type), which is what `type=` does here, so the outputs hold the
same types; the script also checks that the tensor data come out byte-identical. Throughput is source tensor
bytes per wall-clock second of the whole call (read, convert, quantize, write). IQ2_S runs with a synthetic
imatrix on both sides (llama.cpp gets the per-expert means llama-quantize would pass).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from diffgemma import binding as B  # noqa: E402
from diffgemma import gguf_file, testing  # noqa: E402
from diffgemma import imatrix_file as imx  # noqa: E402
from diffgemma import quantizer as qz  # noqa: E402

# llama_ftype whose base type is the target type (IQ2_S is the base type of the IQ2_M file type).
FTYPE = {"q8_0": 7, "q4_0": 2, "q5_1": 9, "q6_K": 18, "q5_K": 16, "q4_K": 14, "q3_K": 11, "q2_K": 10,
         "iq4_nl": 25, "iq4_xs": 30, "iq3_s": 26, "iq2_s": 29}


def make_source(d: pathlib.Path, layers: int) -> pathlib.Path:
    # every row length a multiple of 256, so no type falls back on either side
    hp = testing.tiny_hparams(n_layer=layers, n_embd=1024, n_ff=2048, n_ff_exp=512, n_expert=16, n_expert_used=4,
                              n_head=8, head_dim=256, head_dim_swa=128, n_vocab=16384,
                              swa_layers=tuple(i != layers - 1 for i in range(layers)))
    return testing.write_model(d / "src-bf16.gguf", hp, wtype="bf16")


def make_llama_twin(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The same file with the architecture (and its key prefix) renamed to gemma4."""
    gf = gguf_file.read(src)
    w = gguf_file.Writer(dst, copy_kv_from=src)
    for k, v in gf.metadata.items():
        if k.startswith("diffusion-gemma."):
            B.lib.gguf_remove_key(w.ctx, k.encode())
            w.set("gemma4." + k[len("diffusion-gemma."):], v)
    w.set("general.architecture", "gemma4")
    for t in gf.tensors.values():
        w.add_tensor(t.name, t.shape, t.type)
    mm = np.memmap(src, np.uint8, mode="r")
    w.write(lambda n: mm[gf.tensors[n].offset: gf.tensors[n].offset + gf.tensors[n].nbytes])
    return dst


def make_imatrix(src: pathlib.Path, path: pathlib.Path) -> imx.ImatrixData:
    rng = np.random.default_rng(3)
    ents = {}
    for name, t in gguf_file.read(src).tensors.items():
        if len(t.shape) >= 2 and "gate_inp" not in name:
            n_mat = t.shape[2] if len(t.shape) > 2 else 1
            ents[name] = (rng.uniform(0.1, 3.0, size=(n_mat, t.shape[0])) * 100, np.full(n_mat, 100))
    imx.save(path, ents, datasets=["synthetic"], chunk_count=1, chunk_size=512)
    return imx.load(path)


def run_llama(llama_cpp, src: pathlib.Path, dst: pathlib.Path, ftype: int, threads: int,
              imat: imx.ImatrixData | None) -> float:
    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread, p.ftype, p.pure, p.allow_requantize = threads, ftype, True, True
    keep = []
    if imat is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imat.entries) + 1))()
        for i, name in enumerate(sorted(imat.entries)):
            w = np.ascontiguousarray(imat.entries[name].weights().reshape(-1))
            keep.append((name.encode(), w))
            arr[i].name, arr[i].size = keep[-1][0], w.size
            arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        p.imatrix = arr
        keep.append(arr)
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    dt = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return dt


def same_tensor_data(a: pathlib.Path, b: pathlib.Path) -> tuple[bool, str]:
    ga, gb = gguf_file.read(a), gguf_file.read(b)
    ma, mb = np.memmap(a, np.uint8, mode="r"), np.memmap(b, np.uint8, mode="r")
    for name, ta in ga.tensors.items():
        tb = gb.tensors.get(name)
        if tb is None or tb.type != ta.type:
            return False, f"{name}: {ta.type_name} vs {tb.type_name if tb else 'missing'}"
        if not np.array_equal(ma[ta.offset: ta.offset + ta.nbytes], mb[tb.offset: tb.offset + tb.nbytes]):
            return False, f"{name}: data differ"
    return True, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="q8_0,q4_K,iq4_nl")
    ap.add_argument("--iq2s", action=argparse.BooleanOptionalAction, default=True, help="also IQ2_S + imatrix")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of each")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()

    import llama_cpp  # the ctypes binding of the same libllama/libggml our cffi binding opened

    B.lib.llama_log_set(B._log_cb, B.NULL)  # llama_cpp installed its own logger: keep libllama quiet again

    d = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="dg-qbench-"))
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    src = make_source(d, args.layers)
    twin = make_llama_twin(src, d / "twin-gemma4.gguf")
    src_bytes = sum(x.nbytes for x in gguf_file.read(src).tensors.values())
    print(f"source: {src_bytes / 1e6:.0f} MB of BF16 tensor data, {args.layers} layers, "
          f"{args.threads} threads, llama-cpp-python {B.llama_cpp_python_version()} "
          f"(files made in {time.perf_counter() - t:.0f} s)")

    runs = [(ty, None) for ty in args.types.split(",") if ty]
    imat = None
    if args.iq2s:
        imat = make_imatrix(src, d / "synthetic.imatrix.gguf")
        runs.append(("iq2_s", imat))
    for ty, _ in runs:  # one-off IQ grid setup (seconds) is shared by both and kept out of the timings
        B.lib.ggml_quantize_init(qz.type_id(ty))

    rows = []
    for ty, im in runs:
        out_dg, out_ll = d / f"dg-{ty}.gguf", d / f"llama-{ty}.gguf"
        t_dg = t_ll = float("inf")
        for _ in range(args.repeat):  # best of N: the machine may be shared
            t = time.perf_counter()
            qz.quantize(src, out_dg, type=ty, imatrix=im, threads=args.threads, progress=False, overwrite=True)
            t_dg = min(t_dg, time.perf_counter() - t)
            t_ll = min(t_ll, run_llama(llama_cpp, twin, out_ll, FTYPE[ty], args.threads, im))
        same, why = same_tensor_data(out_dg, out_ll)
        rows.append((ty + (" +imatrix" if im is not None else ""), t_dg, t_ll, same, why))
        for p in (out_dg, out_ll):
            p.unlink()

    print(f"\n{'type':<16}{'diffgemma':>12}{'llama.cpp':>12}{'ratio':>8}   identical tensors")
    for name, t_dg, t_ll, same, why in rows:
        mb = src_bytes / 1e6
        print(f"{name:<16}{mb / t_dg:>8.0f} MB/s{mb / t_ll:>8.0f} MB/s{t_ll / t_dg:>8.2f}   "
              f"{'yes' if same else 'NO: ' + why}")
    print("(ratio = diffgemma throughput / llama.cpp throughput)")
    if not args.dir:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


if __name__ == "__main__":
    main()
