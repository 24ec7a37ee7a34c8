"""The Gemma-4 vision tower's forward graph, built on ggml (../shared/spec/vision.md §1).

patches -> 2x-1 -> patch projection + x/y position tables -> L sandwich-normed ViT layers (per-head q/k/v
norms, 2-D RoPE with x on the first half of each head and y on the second, scale 1, gated tanh-GELU MLP,
optional ClippableLinear clamps) -> k x k average pooling -> x sqrt(D) -> optional standardize -> weightless
RMSNorm -> projection to the text width. One image per graph, no padding: the grid is exact.
Shapes are in ggml order: activations are [features, tokens].
"""

from __future__ import annotations

import math
from typing import Any

from . import binding as B
from .binding import F32, I32
from .graph import Ctx, attention, gelu_tanh, rms
from .mmproj import ROPE_THETA, VisionHParams

_ffi = B.ffi
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
