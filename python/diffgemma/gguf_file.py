"""Reading and validating `diffusion-gemma` GGUF files (through ggml's own gguf parser, metadata only)."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import quants as gq

from . import binding as B
from . import layout, outputs
from .errors import GGUFError

_ffi, _lib = B.ffi, B.lib

_NUMPY_OF_GGUF = {
    VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16, VT.UINT32: np.uint32,
    VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_, VT.UINT64: np.uint64, VT.INT64: np.int64,
    VT.FLOAT64: np.float64,
}

# Types ggml can use as a weight of get_rows / mul_mat (integer and intermediate types are not weights).
FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})
NOT_WEIGHT_TYPES = frozenset({QT.Q8_K, QT.I8, QT.I16, QT.I32, QT.I64, QT.F64})


def f32_to_bf16_bits(x: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaNs stay quiet NaNs), as ggml stores BF16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    rounded = ((u + bias) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """bfloat16 bit patterns (any integer array of them, e.g. a uint16 view of stored bytes) -> float32 (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(x: np.ndarray[Any, Any], ggml_type: int) -> np.ndarray[Any, Any]:
    """float32 values as the stored data of `ggml_type`: F32, F16, BF16 or any type the gguf package quantizes."""
    t = QT(ggml_type)
    if t == QT.F32:
        return np.asarray(x, dtype=np.float32)
    if t == QT.F16:
        return x.astype(np.float16)
    if t == QT.BF16:
        return f32_to_bf16_bits(x)
    return gq.quantize(x, t)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order, trailing 1s dropped (at least one dim)
    type: int
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def type_name(self) -> str:
        return B.type_name(self.type)


@dataclasses.dataclass
class GGUFFile:
    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    alignment: int
    file_size: int


def decode(data: Any, info: TensorInfo) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A tensor's values as flat float32 (dequantized if need be; an F32 tensor is a view), read from `data`,
    the whole file's bytes (an mmap or a uint8 memmap)."""
    raw = np.frombuffer(data, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    if info.type == int(QT.F32):
        return raw.view(np.float32)
    return gq.dequantize(raw.reshape(math.prod(info.shape[1:]), -1), QT(info.type)).reshape(-1)


def _value(ctx: Any, i: int) -> Any:
    t = _lib.gguf_get_kv_type(ctx, i)
    if t == VT.STRING:
        return B.ffi.string(_lib.gguf_get_val_str(ctx, i)).decode("utf-8", "replace")
    if t == VT.ARRAY:
        at, n = _lib.gguf_get_arr_type(ctx, i), _lib.gguf_get_arr_n(ctx, i)
        if at == VT.STRING:
            get = _lib.gguf_get_arr_str
            return [_ffi.string(get(ctx, i, j)).decode("utf-8", "replace") for j in range(n)]
        if at not in _NUMPY_OF_GGUF:
            return []  # nested arrays: not used by this architecture
        dt = np.dtype(_NUMPY_OF_GGUF[at])
        if n == 0:
            return []
        buf = _ffi.buffer(_lib.gguf_get_arr_data(ctx, i), n * dt.itemsize)
        return np.frombuffer(buf, dtype=dt).copy().tolist()
    if t in _NUMPY_OF_GGUF:
        dt = np.dtype(_NUMPY_OF_GGUF[t])
        return np.frombuffer(_ffi.buffer(_lib.gguf_get_val_data(ctx, i), dt.itemsize), dtype=dt)[0].item()
    return None


def read(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory; raise GGUFError on anything unreadable."""
    p = pathlib.Path(path)
    if not p.exists():
        raise GGUFError(f"{p}: no such file")
    if not p.is_file():
        raise GGUFError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise GGUFError(f"{p}: empty file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{p}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    B.take_errors()
    params = _ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": _ffi.NULL})
    ctx = _lib.gguf_init_from_file(str(p).encode(), params[0])
    if ctx == _ffi.NULL:
        why = B.take_errors() or "ggml's gguf parser rejected it"
        raise GGUFError(f"{p}: unreadable or truncated GGUF ({why})")
    try:
        md = {_ffi.string(_lib.gguf_get_key(ctx, i)).decode(): _value(ctx, i) for i in range(_lib.gguf_get_n_kv(ctx))}
        data_offset = _lib.gguf_get_data_offset(ctx)
        tensors: dict[str, TensorInfo] = {}
        for i in range(_lib.gguf_get_n_tensors(ctx)):
            name = _ffi.string(_lib.gguf_get_tensor_name(ctx, i)).decode()
            ne = list(_lib.gguf_get_tensor_ne(ctx, i)[0:4])
            while len(ne) > 1 and ne[-1] == 1:
                ne.pop()
            tensors[name] = TensorInfo(name, tuple(int(x) for x in ne), int(_lib.gguf_get_tensor_type(ctx, i)),
                                       data_offset + _lib.gguf_get_tensor_offset(ctx, i),
                                       int(_lib.gguf_get_tensor_size(ctx, i)))
        gf = GGUFFile(p, md, tensors, data_offset, _lib.gguf_get_alignment(ctx), size)
    finally:
        _lib.gguf_free(ctx)
    end = max((t.offset + t.nbytes for t in gf.tensors.values()), default=data_offset)
    if end > size:
        raise GGUFError(f"{p}: truncated: tensor data needs {end} bytes, the file has {size}")
    return gf


def _type_ok(role: str, t: TensorInfo) -> str | None:
    """None if the stored type suits the tensor's role, else why not."""
    if role == layout.VECTOR:
        return None if t.type == QT.F32 else f"{t.name}: type {t.type_name} not allowed (norms/scales must be f32)"
    if role == layout.ROUTER:
        return None if t.type in FLOAT_TYPES else f"{t.name}: type {t.type_name} not allowed (router: f32/f16/bf16)"
    if t.type in NOT_WEIGHT_TYPES or not t.type_name:
        return f"{t.name}: type {t.type_name or t.type} cannot be a weight"
    blk = _lib.ggml_blck_size(t.type)
    if t.shape[0] % blk:
        return f"{t.name}: row length {t.shape[0]} is not a multiple of the {t.type_name} block ({blk})"
    return None


def validate(gf: GGUFFile) -> layout.HParams:
    """Check architecture, keys and every tensor against the published layout; all problems in one error."""
    embd = gf.tensors.get("token_embd.weight")
    n_vocab = embd.shape[1] if embd is not None and len(embd.shape) == 2 else None
    hp, problems = layout.hparams_from_metadata(gf.metadata, n_vocab=n_vocab)
    if hp is None:
        raise GGUFError(f"{gf.path}: not a valid {layout.ARCH} file:\n  " + "\n  ".join(problems))
    toks = gf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(toks, list) and len(toks) != hp.n_vocab:
        problems.append(f"tokenizer has {len(toks)} tokens but token_embd has {hp.n_vocab} rows")
    fused = layout.fused_gate_up(gf.tensors)
    expected = layout.tensor_specs(hp, fused_gate_up=fused)
    names = {s.name for s in expected}
    for spec in expected:
        t = gf.tensors.get(spec.name)
        if t is None:
            problems.append(f"missing tensor {spec.name} (expected shape {list(spec.shape)})")
            continue
        if t.shape != spec.shape:
            problems.append(f"{spec.name}: shape {list(t.shape)}, expected {list(spec.shape)}")
            continue
        why = _type_ok(spec.role, t)
        if why:
            problems.append(why)
    for name in gf.tensors:
        if name not in names:
            problems.append(f"unexpected tensor {name}")
    if problems:
        raise GGUFError(f"{gf.path}: {len(problems)} problem(s) with this {layout.ARCH} file:\n  "
                        + "\n  ".join(problems))
    return hp


def bits_per_weight(tensors: Iterable[tuple[Sequence[int], int]]) -> float:
    """Bits per weight as llama.cpp reports it: 8 x the tensor data bytes / the number of weights, over every
    tensor of a file (ggml shape, ggml type); the header (metadata, vocabulary) and padding do not count."""
    n_bytes = n_weights = 0
    for shape, t in tensors:
        rows = int(np.prod(shape[1:], dtype=np.int64))
        n_bytes += _lib.ggml_row_size(t, shape[0]) * rows
        n_weights += shape[0] * rows
    return 8 * n_bytes / n_weights if n_weights else 0.0


def census(types: list[str] | Any) -> str:
    """Stored-type census in the published form, e.g. 'f32:423, q5_K:175, ...' (most frequent first)."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---- writing ----------------------------------------------------------------------------------------

def _set_kv(ctx: Any, key: str, value: Any) -> None:
    k = key.encode()
    if isinstance(value, bool):
        _lib.gguf_set_val_bool(ctx, k, value)
    elif isinstance(value, int | np.integer):
        v = int(value)
        if 0 <= v < 2**32:
            _lib.gguf_set_val_u32(ctx, k, v)
        elif -(2**31) <= v < 0:
            _lib.gguf_set_val_i32(ctx, k, v)
        else:
            _lib.gguf_set_val_u64(ctx, k, v)
    elif isinstance(value, float | np.floating):
        _lib.gguf_set_val_f32(ctx, k, float(value))
    elif isinstance(value, str):
        _lib.gguf_set_val_str(ctx, k, value.encode())
    elif isinstance(value, list | tuple | np.ndarray):
        vals = list(value)
        if vals and all(isinstance(v, str) for v in vals):
            keep = [_ffi.new("char[]", v.encode()) for v in vals]
            _lib.gguf_set_arr_str(ctx, k, _ffi.new("const char *[]", keep), len(keep))
            return
        if vals and all(isinstance(v, bool | np.bool_) for v in vals):
            arr, t = np.asarray(vals, dtype=np.uint8), VT.BOOL
        elif all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in vals):
            arr, t = np.asarray(vals, dtype=np.int32), VT.INT32
        else:
            arr, t = np.asarray(vals, dtype=np.float32), VT.FLOAT32
        arr = np.ascontiguousarray(arr)
        _lib.gguf_set_arr_data(ctx, k, t, _ffi.from_buffer(arr), len(arr))
    else:
        raise TypeError(f"cannot store {key}={value!r} in GGUF")


class Writer:
    """Writes a GGUF file through ggml's gguf API: metadata first, then tensor data one tensor at a time.

    The file appears under its final name only when complete (see diffgemma.outputs: temporary name + rename;
    an exception, Ctrl-C or SIGTERM removes the partial file).
    """

    def __init__(self, path: str | os.PathLike, copy_kv_from: str | os.PathLike | None = None):
        self.path = pathlib.Path(path)
        self.ctx = _lib.gguf_init_empty()
        self._specs: list[tuple[str, tuple[int, ...], int]] = []
        if copy_kv_from is not None:
            params = _ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": _ffi.NULL})
            src = _lib.gguf_init_from_file(str(copy_kv_from).encode(), params[0])
            if src == _ffi.NULL:
                raise GGUFError(f"{copy_kv_from}: unreadable GGUF")
            _lib.gguf_set_kv(self.ctx, src)  # keeps every source key with its exact type
            _lib.gguf_free(src)
            _lib.gguf_remove_key(self.ctx, b"general.alignment")  # our padding is always the default 32

    def __del__(self) -> None:
        if getattr(self, "ctx", None) is not None:
            _lib.gguf_free(self.ctx)
            self.ctx = None

    def set(self, key: str, value: Any) -> None:
        _lib.gguf_remove_key(self.ctx, key.encode())
        _set_kv(self.ctx, key, value)

    def set_all(self, md: dict[str, Any]) -> None:
        for k, v in md.items():
            if k != "general.alignment":
                self.set(k, v)

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int) -> None:
        if len(name.encode()) >= 64:
            raise GGUFError(f"tensor name too long for GGUF: {name}")
        blk = _lib.ggml_blck_size(ggml_type)
        if shape[0] % blk:
            raise GGUFError(f"{name}: row length {shape[0]} is not a multiple of the {B.type_name(ggml_type)} "
                            f"block ({blk})")
        self._specs.append((name, tuple(int(x) for x in shape), int(ggml_type)))

    def _layout(self) -> tuple[bytes, list[tuple[int, int]]]:
        """Header bytes and (offset, nbytes) of every tensor."""
        n = len(self._specs)
        mem = _lib.ggml_tensor_overhead() * (n + 1) + 1024
        gctx = B.ggml_context(mem)
        try:
            for name, shape, t in self._specs:
                ne = list(shape) + [1] * (4 - len(shape))
                tt = _lib.ggml_new_tensor_4d(gctx, t, *ne)
                _lib.ggml_set_name(tt, name.encode())
                _lib.gguf_add_tensor(self.ctx, tt)
        finally:
            _lib.ggml_free(gctx)
        meta = _ffi.new("char[]", _lib.gguf_get_meta_size(self.ctx))
        _lib.gguf_get_meta_data(self.ctx, meta)
        header = bytes(_ffi.buffer(meta))
        base = len(header)
        out = []
        for i, (_name, shape, t) in enumerate(self._specs):
            nbytes = _lib.ggml_row_size(t, shape[0]) * int(np.prod(shape[1:], dtype=np.int64))
            out.append((base + _lib.gguf_get_tensor_offset(self.ctx, i), int(nbytes)))
        return header, out

    def predicted_size(self) -> int:
        _, offs = self._layout()
        end = offs[-1][0] + offs[-1][1] if offs else 0
        return _pad(end, 32)

    def write(self, data: Any = None, *, progress: Any = None, sparse: bool = False) -> int:
        """Write the file. `data(name) -> bytes-like` (or an iterable of them) gives each tensor's bytes in
        order; with sparse=True no tensor data is written (the file is extended with a hole: same size,
        nothing stored)."""
        header, offs = self._layout()
        with outputs.atomic(self.path) as tmp:
            with open(tmp, "wb") as f:
                f.write(header)
                for (name, _shape, _t), (off, nbytes) in zip(self._specs, offs, strict=True):
                    if sparse:
                        continue
                    out = data(name)
                    # a buffer, or an iterable of buffers written in order (lets callers stream a tensor)
                    pieces = [out] if isinstance(out, bytes | bytearray | memoryview | np.ndarray) else out
                    f.seek(off)
                    got = 0
                    for piece in pieces:
                        buf = memoryview(piece).cast("B")
                        got += buf.nbytes
                        if got > nbytes:
                            break
                        f.write(buf)
                    if got != nbytes:
                        raise GGUFError(f"{name}: got {got} bytes of data, expected {nbytes}")
                    if progress is not None:
                        progress(nbytes)
                end = _pad(offs[-1][0] + offs[-1][1], 32) if offs else len(header)
                f.truncate(end)
        return end


def _pad(n: int, a: int) -> int:
    return (n + a - 1) // a * a
