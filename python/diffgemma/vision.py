"""The Gemma-4 vision tower on ggml: its forward graph (../shared/spec/vision.md §1) and `Tower`, a tower loaded
from an mmproj file (diffgemma.mmproj) next to a text model.

patches -> 2x-1 -> patch projection + x/y position tables -> L sandwich-normed ViT layers (per-head q/k/v
norms, 2-D RoPE with x on the first half of each head and y on the second, scale 1, gated tanh-GELU MLP,
optional ClippableLinear clamps) -> k x k average pooling -> x sqrt(D) -> optional standardize -> weightless
RMSNorm -> projection to the text width. One image per graph, no padding: the grid is exact.
Shapes are in ggml order: activations are [features, tokens].
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import pathlib
from typing import Any

import numpy as np

from . import binding as B
from . import gguf_file
from .binding import F32, I32
from .errors import Error
from .graph import Ctx, attention, gelu_tanh, rms
from .images import preprocess
from .mmproj import BOUNDS, ROPE_THETA, VisionHParams, validate

_lib, _ffi = B.lib, B.ffi
POOL_AVG = 1  # enum ggml_op_pool


def linear(g: Ctx, w: dict[str, Any], scalars: dict[str, float], name: str, x: Any) -> Any:
    """W x with the ClippableLinear bounds of `name` when the file has them: clamp(W clamp(x, in), out)."""
    lo, hi = scalars.get(f"{name}.input_min", -math.inf), scalars.get(f"{name}.input_max", math.inf)
    if math.isfinite(lo) or math.isfinite(hi):
        x = g.clamp(x, max(lo, -3.4e38), min(hi, 3.4e38))
    y = g.mul_mat(w[f"{name}.weight"], x)
    lo, hi = scalars.get(f"{name}.output_min", -math.inf), scalars.get(f"{name}.output_max", math.inf)
    if math.isfinite(lo) or math.isfinite(hi):
        y = g.clamp(y, max(lo, -3.4e38), min(hi, 3.4e38))
    return y


def rope_2d(g: Ctx, x: Any, pos_x: Any, pos_y: Any) -> Any:
    """Axial RoPE on [d, heads, n]: NeoX rotation over the first d/2 dims by the column (x), over the second d/2
    by the row (y), each with theta^(-2j/(d/2))."""
    d, h, n = x.ne[0], x.ne[1], x.ne[2]
    half = d // 2
    out = []
    for i, pos in enumerate((pos_x, pos_y)):
        view = g.view_3d(x, half, h, n, x.nb[1], x.nb[2], i * half * x.nb[0])
        out.append(g.rope_ext(view, pos, _ffi.NULL, half, B.GGML_ROPE_TYPE_NEOX, 0, ROPE_THETA, 1.0, 0.0, 1.0,
                              0.0, 0.0))
    return g.concat(out[0], out[1], 0)


def layer(g: Ctx, w: dict[str, Any], hp: VisionHParams, scalars: dict[str, float], il: int, x: Any,
          pos_x: Any, pos_y: Any, flash: bool) -> Any:
    """One encoder layer: x + post_norm(attn(ln1 x)), then + post_norm(mlp(ln2 .))."""
    b, eps, n = f"v.blk.{il}.", hp.eps, x.ne[1]
    d, H = hp.head_dim, hp.n_head
    a = rms(g, x, eps, w[b + "ln1.weight"])
    q = g.reshape_3d(linear(g, w, scalars, b + "attn_q", a), d, H, n)
    k = g.reshape_3d(linear(g, w, scalars, b + "attn_k", a), d, H, n)
    v = g.reshape_3d(linear(g, w, scalars, b + "attn_v", a), d, H, n)
    q = rope_2d(g, rms(g, q, eps, w[b + "attn_q_norm.weight"]), pos_x, pos_y)
    k = rope_2d(g, rms(g, k, eps, w[b + "attn_k_norm.weight"]), pos_x, pos_y)
    v = rms(g, v, eps)  # weightless v norm
    o = linear(g, w, scalars, b + "attn_out", attention(g, q, k, v, _ffi.NULL, flash))
    x = g.add(x, rms(g, o, eps, w[b + "attn_post_norm.weight"]))
    f = rms(g, x, eps, w[b + "ln2.weight"])
    f = g.mul(gelu_tanh(g, linear(g, w, scalars, b + "ffn_gate", f)), linear(g, w, scalars, b + "ffn_up", f))
    f = linear(g, w, scalars, b + "ffn_down", f)
    x = g.add(x, rms(g, f, eps, w[b + "ffn_post_norm.weight"]))
    if b + "out_scale.weight" in scalars:
        x = g.scale(x, scalars[b + "out_scale.weight"])
    return x


def pool(g: Ctx, x: Any, cols: int, rows: int, k: int) -> Any:
    """Mean over k x k patch cells: [D, rows*cols] (row-major) -> [D, (rows/k)*(cols/k)] (row-major)."""
    D = x.ne[0]
    grid = g.cont(g.permute(g.reshape_3d(x, D, cols, rows), 2, 0, 1, 3))  # [cols, rows, D]
    pooled = g.pool_2d(grid, POOL_AVG, k, k, k, k, 0.0, 0.0)  # [cols/k, rows/k, D]
    out = g.cont(g.permute(pooled, 1, 2, 0, 3))  # [D, cols/k, rows/k]
    return g.reshape_2d(out, D, (cols // k) * (rows // k))


def build_encoder(g: Ctx, w: dict[str, Any], hp: VisionHParams, scalars: dict[str, float], cols: int, rows: int,
                  flash: bool) -> dict[str, Any]:
    """The whole tower for one image of cols x rows patches.
    Inputs: pixels [3 p^2, n] (values in [0, 1], channel-major inside a patch), pos_x / pos_y [n].
    Output: out [n_proj, n / pool^2]."""
    p, D, n = hp.patch_size, hp.n_embd, cols * rows
    pixels = g.input("pixels", F32, 3 * p * p, n)
    pos_x, pos_y = g.input("pos_x", I32, n), g.input("pos_y", I32, n)
    kernel = w["v.patch_embd.weight"]
    x = g.mul_mat(g.reshape_2d(kernel, 3 * p * p, D), g.scale_bias(pixels, 2.0, -1.0))
    table = w["v.position_embd.weight"]  # [D, n_pos, 2]: slice 0 is indexed by x, slice 1 by y
    tab_x = g.view_2d(table, D, table.ne[1], table.nb[1], 0)
    tab_y = g.view_2d(table, D, table.ne[1], table.nb[1], table.nb[2])
    x = g.add(x, g.add(g.get_rows(tab_x, pos_x), g.get_rows(tab_y, pos_y)))
    for il in range(hp.n_layer):
        x = layer(g, w, hp, scalars, il, x, pos_x, pos_y, flash)
    y = g.scale(pool(g, x, cols, rows, hp.pool), math.sqrt(D))
    if hp.standardize:
        y = g.mul(g.sub(y, w["v.std_bias"]), w["v.std_scale"])
    y = g.mul_mat(w["mm.input_projection.weight"], g.rms_norm(y, hp.eps))
    g.output(y, "image_embd")
    return {"pixels": pixels, "pos_x": pos_x, "pos_y": pos_y, "out": y}


# ---- the loaded tower ------------------------------------------------------------------------------

class Tower:
    """A gemma4v tower loaded next to a text model: its weights on the model's backends, its own scheduler,
    one cached graph per image grid."""

    def __init__(self, path: str | os.PathLike, *, backends: list[Any], gpu_dev: Any):
        self.path = pathlib.Path(path)
        self._file = gguf_file.read(self.path)
        self.hparams = validate(self._file)
        self.metadata = self._file.metadata
        self._bufs: list[Any] = []
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = _ffi.from_buffer(self._mmap)
        infos = list(self._file.tensors.values())
        self._ctx = B.ggml_context(_lib.ggml_tensor_overhead() * (len(infos) + 8))
        self.weights, buf = B.map_weights(self._ctx, infos, self._base, len(self._mmap), gpu_dev,
                                          oom="not enough GPU memory for the vision tower")
        self._bufs.append(buf)
        # Clamp bounds and layer scalars are graph constants read on the host (infinite bounds: no clamp).
        self.scalars = {i.name: float(self._host(i.name)[0]) for i in infos
                        if i.name.endswith(BOUNDS) or i.name.endswith(".out_scale.weight")}
        self._backends = _ffi.new("ggml_backend_t[]", backends)
        self.sched = _lib.ggml_backend_sched_new(self._backends, _ffi.NULL, len(backends), 8192, False, True)
        self._graph: tuple[tuple[int, int], Any, dict[str, Any]] | None = None
        self.flash = True
        self._closed = False
        self._cache: dict[tuple, np.ndarray] = {}  # embeddings by (pixels hash, grid)

    def _host(self, name: str) -> np.ndarray:
        info = self._file.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.float32, count=info.nbytes // 4, offset=info.offset)

    def embeddings(self, image: Any, image_budget: int) -> np.ndarray:
        """The projected embeddings of one image (a path, bytes, a PIL image or a uint8 array), preprocessed as
        the Hugging Face processor does; the last few are kept (a chat re-sends its pictures every turn)."""
        hp = self.hparams
        p = preprocess(image, image_budget, hp.patch_size, hp.pool)
        key = (hashlib.blake2b(p.pixels.tobytes(), digest_size=16).digest(), p.cols, p.rows)
        if key not in self._cache:
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self.encode(p.pixels, p.cols, p.rows)
        return self._cache[key].copy()

    def encode(self, patches: np.ndarray, cols: int, rows: int) -> np.ndarray:
        """Projected embeddings [n_tokens, n_proj] of one image's patches [rows*cols, 3 p^2] (HF layout: raster
        pixels with interleaved RGB inside each patch, values in [0, 1], patches in row-major order)."""
        hp = self.hparams
        p = hp.patch_size
        if cols % hp.pool or rows % hp.pool:
            raise Error(f"the patch grid {cols}x{rows} is not a multiple of the pooling kernel {hp.pool}")
        if cols > hp.n_pos or rows > hp.n_pos:
            raise Error(f"the patch grid {cols}x{rows} exceeds the position tables ({hp.n_pos})")
        if patches.shape != (rows * cols, 3 * p * p):
            raise Error(f"patches must have shape {(rows * cols, 3 * p * p)}, got {patches.shape}")
        key = (cols, rows)
        if self._graph is None or self._graph[0] != key:
            if self._graph is not None:
                self._graph[1].free()
                self._graph = None
            _lib.ggml_backend_sched_reset(self.sched)
            g = Ctx(8192)
            io = build_encoder(g, self.weights, hp, self.scalars, cols, rows, self.flash)
            if not _lib.ggml_backend_sched_alloc_graph(self.sched, g.graph):
                g.free()
                raise Error("ggml could not allocate the vision graph (out of memory?)")
            self._graph = (key, g, io)
        _, g, io = self._graph
        # The kernel's flattening is channel-major (C, H, W inside a patch): the llama.cpp conv layout.
        chw = np.ascontiguousarray(patches.reshape(-1, p, p, 3).transpose(0, 3, 1, 2), dtype=np.float32)
        n = rows * cols
        _set(io["pixels"], chw)
        _set(io["pos_x"], np.tile(np.arange(cols, dtype=np.int32), rows))
        _set(io["pos_y"], np.repeat(np.arange(rows, dtype=np.int32), cols))
        if _lib.ggml_backend_sched_graph_compute(self.sched, g.graph) != 0:
            raise Error("ggml vision graph computation failed")
        out = np.empty((n // hp.pool ** 2, hp.n_proj), dtype=np.float32)
        _lib.ggml_backend_tensor_get(io["out"], _ffi.from_buffer(out), 0, out.nbytes)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._graph is not None:
            self._graph[1].free()
        _lib.ggml_backend_sched_free(self.sched)
        for buf in self._bufs:
            _lib.ggml_backend_buffer_free(buf)
        _lib.ggml_free(self._ctx)
        del self._base
        self._mmap.close()


def _set(t: Any, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(arr), 0, arr.nbytes)
