"""The DiffusionGemma forward graph, built on ggml.

Two passes share one set of weights (see ../shared/spec/model.md):
- `encode`: causal pass over newly committed tokens (prompt, or a finished canvas) that appends each layer's
  K (after k_norm + RoPE) and V (after v_norm) to the prompt-KV store;
- `decode`: bidirectional pass over a canvas that reads the store (global layers: every committed key;
  sliding layers: the last W-1), with the self-conditioning input path and soft-capped logits.
Shapes are in ggml order: activations are [features, tokens].

Nodes are named as llama.cpp's `cb(cur, name, il)` names them ("attn_norm-3", "attn_out-3", "l_out-3"), and
every weight product after its weight ("attn_q-3", "ffn_gate_up_exps-3", "self_cond_gate"; see
weights.product_name), so the profiler and the imatrix collector find nodes by name.

`Runner` runs them: a ggml scheduler over the model's backends that keeps one graph allocated until the shape
changes, with the eval callback observe() installs.

Batch invariance: a token's numbers must not depend on how many other rows share its pass (a batch, a prompt
cut differently because a prefix was reused). ggml's CPU kernels are row-independent except where they choose
a kernel by row count: a matrix product of one row takes a dot-product loop instead of the tiled GEMM (other
rounding), so a pass has at least MIN_ROWS rows (a lone token is duplicated); flash attention's kernel
depends on the query rows, so attention pads them (kv.query_rows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import binding as B
from .binding import F16, F32, I32
from .errors import Error
from .kv import PromptKV, query_rows
from .layout import HParams
from .weights import ModelWeights, product_name

_lib, _ffi = B.lib, B.ffi
GELU_C = math.sqrt(2.0 / math.pi)
MASKED_LOGIT = -1e30  # a disallowed token's logit bias: its probability underflows to exactly 0, yet finite (0 * s = 0)
GRAPH_NODES = 32768
MIN_ROWS = 2  # a pass computes at least this many rows: ggml's CPU matrix product of one row rounds otherwise
# Repacked (CPU_REPACK) products run rows in groups of 4 by a GEMM and the rest one by one, which rounds
# differently (Q4_K): their input is padded to whole groups.
REPACK_ROWS = 4
# The self-conditioning product sums over the whole vocabulary (262,144 entries): as one matrix product its
# operands stream from memory for every output tile; cut into blocks of this many entries (a batched product, then
# a sum over blocks) they stay in cache, 2.4x faster on CPU (docs/performance.md). See sc_blocks.
SC_BLOCK = 4096


class Ctx:
    """A ggml context (no_alloc) holding one graph's nodes, with short names for the ops we use."""

    def __init__(self, n_nodes: int):
        size = _lib.ggml_tensor_overhead() * n_nodes + _lib.ggml_graph_overhead_custom(n_nodes, False)
        self.ctx = B.ggml_context(size)
        self.graph = _lib.ggml_new_graph_custom(self.ctx, n_nodes, False)

    def free(self) -> None:
        if self.ctx is not None:
            _lib.ggml_free(self.ctx)
            self.ctx = None

    def input(self, name: str, type_: int, *ne: int) -> Any:
        t = getattr(_lib, f"ggml_new_tensor_{len(ne)}d")(self.ctx, type_, *ne)
        _lib.ggml_set_name(t, name.encode())
        _lib.ggml_set_input(t)
        return t

    def output(self, t: Any, name: str) -> Any:
        _lib.ggml_set_name(t, name.encode())
        _lib.ggml_set_output(t)
        _lib.ggml_build_forward_expand(self.graph, t)
        return t

    def expand(self, t: Any) -> None:
        _lib.ggml_build_forward_expand(self.graph, t)

    def __getattr__(self, op: str) -> Any:
        fn = getattr(_lib, "ggml_" + op)
        ctx = self.ctx
        return lambda *args: fn(ctx, *args)


def _on_host(t: Any) -> bool:
    """Whether tensor t lives in host memory (or has none yet: a graph-only dry run)."""
    return t.buffer == _ffi.NULL or bool(_lib.ggml_backend_buft_is_host(_lib.ggml_backend_buffer_get_type(t.buffer)))


def named(t: Any, name: str, il: int = -1) -> Any:
    """Name node t "<name>-<il>" inside layer il, "<name>" outside the layers (llama.cpp's scheme)."""
    _lib.ggml_set_name(t, (name if il < 0 else f"{name}-{il}").encode())
    return t


def product(g: Ctx, w: Any, x: Any) -> Any:
    """w x, the node named after the weight w (weights.product_name). A repacked w gets its input's rows
    padded with zeros to a multiple of REPACK_ROWS, and only the first rows of the product are read."""
    n, pad = x.ne[1], -x.ne[1] % REPACK_ROWS
    if not pad or x.ne[2] != 1 or not B.in_extra_buffer(w):
        return named(g.mul_mat(w, x), product_name(_ffi.string(w.name).decode()))
    y = named(g.mul_mat(w, g.pad(x, 0, pad, 0, 0)), product_name(_ffi.string(w.name).decode()))
    return g.view_2d(y, y.ne[0], n, y.nb[1], 0)


def sc_blocks(n_vocab: int) -> int:
    """How many vocabulary blocks the self-conditioning product runs in: the largest power of two dividing
    n_vocab whose blocks still hold >= SC_BLOCK entries (1: one product, for small vocabularies)."""
    c = 1
    while n_vocab % (2 * c) == 0 and n_vocab // (2 * c) >= SC_BLOCK:
        c *= 2
    return c


def sc_shape(n_vocab: int, rows: int) -> tuple[int, int, int]:
    """ggml shape of E^T (rows = n_embd) and of a self-conditioning state (rows = canvas length): the vocabulary
    in sc_blocks blocks, block-major, [V / C, rows, C]."""
    c = sc_blocks(n_vocab)
    return (n_vocab // c, rows, c)


def sc_layout(a: np.ndarray) -> np.ndarray:
    """A host array [rows, V] (a canvas's probabilities, written into its self-conditioning state) in sc_shape's
    layout: [C, rows, V / C]."""
    rows, V = a.shape
    c = sc_blocks(V)
    return np.ascontiguousarray(a.reshape(rows, c, V // c).transpose(1, 0, 2))


def product_id(g: Ctx, w: Any, x: Any, ids: Any) -> Any:
    """The experts' product (ggml_mul_mat_id) of w chosen by ids, named after w."""
    return named(g.mul_mat_id(w, x, ids), product_name(_ffi.string(w.name).decode()))


def rms(g: Ctx, x: Any, eps: float, w: Any = None) -> Any:
    """RMS norm over ne0, weight used as is (x * w, not x * (1 + w))."""
    y = g.rms_norm(x, eps)
    return g.mul(y, w) if w is not None else y


def gelu_tanh(g: Ctx, x: Any) -> Any:
    """0.5 x (1 + tanh(c (x + 0.044715 x^3))) = silu(x d) / d with d = 2c (1 + 0.044715 x^2) >= 2c.

    Exact algebra on fast vectorized ops: the CPU backend's fused gelu reads an fp16 table (errors ~1e-3) and
    its tanh is scalar libm (~16 ns per element)."""
    d = g.scale_bias(g.sqr(x), 2.0 * GELU_C * 0.044715, 2.0 * GELU_C)
    return g.div(g.silu(g.mul(x, d)), d)


def softcap(g: Ctx, x: Any, cap: float) -> Any:
    """cap * tanh(x / cap), with tanh(y) = 2 sigmoid(2y) - 1 (vectorized, unlike the CPU backend's tanh)."""
    return g.scale_bias(g.sigmoid(g.scale(x, 2.0 / cap)), 2.0 * cap, -cap)


def mul_scalar(g: Ctx, x: Any, s: Any) -> Any:
    """x times the one-element tensor s, repeated into a row first: the CPU backend multiplies by a tensor of
    one value per row element by element, by a full row vectorized."""
    return g.mul(x, g.repeat(s, g.view_1d(x, x.ne[0], 0)))


def token_rows(g: Ctx, x: Any, b: int, L: int, axis: int = 1) -> Any:
    """Tokens b*L .. (b+1)*L of x along its token axis (1 for [F, n], 2 for [d, heads, n]); x itself when it
    holds just those (one canvas: the graph is the unbatched one)."""
    if x.ne[axis] == L:
        return x
    if axis == 2:
        return g.view_3d(x, x.ne[0], x.ne[1], L, x.nb[1], x.nb[2], b * L * x.nb[2])
    return g.view_2d(x, x.ne[0], L, x.nb[1], b * L * x.nb[1])


def min_rows(g: Ctx, x: Any, axis: int = 1) -> Any:
    """x with its lone token (along `axis`) duplicated: at least MIN_ROWS rows (see the module's docstring)."""
    return g.concat(x, x, axis) if x.ne[axis] < MIN_ROWS else x


def concat_tokens(g: Ctx, parts: list[Any]) -> Any:
    """[F, L] parts side by side along the token axis: [F, sum L]."""
    out = parts[0]
    for part in parts[1:]:
        out = g.concat(out, part, 1)
    return out


def mlp(g: Ctx, x: Any, gate: Any, up: Any, down: Any) -> Any:
    return product(g, down, g.mul(gelu_tanh(g, product(g, gate, x)), product(g, up, x)))


def attention(g: Ctx, q: Any, k: Any, v: Any, mask: Any, flash: bool) -> Any:
    """q [d, Hq, n_q], k/v [d, Hkv, n_kv] -> [d*Hq, n_q]. Scale 1.0: q/k norms replace 1/sqrt(d).
    mask: None or [n_kv, >= kv.query_rows(n_q)] (rows past n_q are ignored)."""
    d, n_head, n_q = q.ne[0], q.ne[1], q.ne[2]
    q = g.permute(q, 0, 2, 1, 3)  # [d, n_q, Hq]
    k = g.permute(k, 0, 2, 1, 3)  # [d, n_kv, Hkv]
    if flash:
        v = g.permute(v, 0, 2, 1, 3)
        rows = query_rows(n_q)
        if rows > n_q:  # zero queries: ggml's CPU kernel is then the tiled one whatever n_q (kv.query_rows)
            q = g.pad(q, 0, rows - n_q, 0, 0)
        out = g.flash_attn_ext(q, k, v, mask, 1.0, 0.0, 0.0)  # [d, Hq, rows]
        _lib.ggml_flash_attn_ext_set_prec(out, B.GGML_PREC_F32)
        return g.view_2d(out, d * n_head, n_q, out.nb[2], 0)
    kq = g.mul_mat(k, q)  # [n_kv, n_q, Hq]; KV head j serves query heads j*G..(j+1)*G-1 (ggml broadcast)
    kq = g.soft_max_ext(kq, mask if mask is not None else _ffi.NULL, 1.0, 0.0)
    vt = g.cont(g.permute(v, 1, 2, 0, 3))  # [n_kv, d, Hkv]
    out = g.mul_mat(vt, kq)  # [d, n_q, Hq]
    return g.reshape_2d(g.cont(g.permute(out, 0, 2, 1, 3)), d * n_head, n_q)


class Graphs:
    """Builds the encoder and decoder graphs of one model (its weight records, hyper-parameters)."""

    def __init__(self, w: ModelWeights, hp: HParams, flash: bool, embd_scale: float):
        self.w, self.hp, self.flash, self.embd_scale = w, hp, flash, embd_scale

    def node_names(self, kv: PromptKV, canvas: int, embd_t: Any, sc_state: Any) -> list[str]:
        """Names of the nodes of an encoder graph (4 tokens) and a decoder graph (a canvas), built in
        throwaway contexts: a dry run that reads no weight and allocates nothing."""
        names: list[str] = []
        for build in (lambda g: self.encode(g, kv, 4), lambda g: self.decode(g, [kv], canvas, embd_t, [sc_state])):
            g = Ctx(32768)
            try:
                build(g)
                names += [_ffi.string(_lib.ggml_graph_node(g.graph, i).name).decode()
                          for i in range(_lib.ggml_graph_n_nodes(g.graph))]
            finally:
                g.free()
        return names

    def _qkv(self, g: Ctx, il: int, a: Any, pos: Any, n: int) -> tuple[Any, Any, Any]:
        """Projected, normed and roped q, k and normed v of one layer: [d, heads, n]."""
        hp, L = self.hp, self.w.layers[il]
        d, n_kv = hp.layer_head_dim(il), hp.n_head_kv[il]
        swa = hp.is_swa(il)
        q = g.reshape_3d(product(g, L.attn_q, a), d, hp.n_head, n)
        k_raw = g.reshape_3d(product(g, L.attn_k, a), d, n_kv, n)
        # Global layers have no v_proj: V is the raw K projection (before k_norm and RoPE).
        v_raw = k_raw if L.attn_v is None else g.reshape_3d(product(g, L.attn_v, a), d, n_kv, n)
        q = named(rms(g, q, hp.rms_eps, L.attn_q_norm), "Qcur_normed", il)
        k = named(rms(g, k_raw, hp.rms_eps, L.attn_k_norm), "Kcur_normed", il)
        freqs = _ffi.NULL if swa else self.w.rope_freqs  # proportional RoPE: pairs past n_rot frozen
        base = hp.rope_base_swa if swa else hp.rope_base
        q = named(g.rope_ext(q, pos, freqs, d, B.GGML_ROPE_TYPE_NEOX, 0, base, 1.0, 0.0, 1.0, 0.0, 0.0), "Qcur_pos", il)
        k = named(g.rope_ext(k, pos, freqs, d, B.GGML_ROPE_TYPE_NEOX, 0, base, 1.0, 0.0, 1.0, 0.0, 0.0), "Kcur_pos", il)
        v = named(rms(g, v_raw, hp.rms_eps), "Vcur_normed", il)
        return q, k, v

    def _ffn(self, g: Ctx, il: int, h1: Any, n: int) -> Any:
        """Dense MLP + MoE, both from h1, each with its own pre/post norms; returns their normed sum."""
        hp, L = self.hp, self.w.layers[il]
        eps = hp.rms_eps
        dense = mlp(g, named(rms(g, h1, eps, L.ffn_norm), "ffn_norm_1", il), L.ffn_gate, L.ffn_up, L.ffn_down)
        dense = named(rms(g, dense, eps, L.post_ffw_norm_1), "ffn_mlp", il)

        # Router on the raw residual: softmax over all experts, top-k, renormalise, then per-expert scale.
        r = g.scale(g.mul(g.rms_norm(h1, eps), L.ffn_gate_inp_scale), hp.n_embd ** -0.5)
        probs = named(g.soft_max(product(g, L.ffn_gate_inp, r)), "ffn_moe_probs", il)  # [E, n]
        k = hp.n_expert_used
        # [k, n]; contiguous so the imatrix collector can read it
        ids = named(g.cont(g.argsort_top_k(probs, k)), "ffn_moe_topk", il)
        wts = named(g.get_rows(g.reshape_3d(probs, 1, hp.n_expert, n), ids), "ffn_moe_weights", il)  # [1, k, n]
        wts = named(g.div(wts, g.reshape_3d(g.sum_rows(g.reshape_2d(wts, k, n)), 1, 1, n)), "ffn_moe_weights_norm", il)
        flat_ids = g.reshape_1d(ids, k * n)
        scale = g.get_rows(g.reshape_2d(L.ffn_down_exps_scale, 1, hp.n_expert), flat_ids)
        wts = named(g.mul(wts, g.reshape_3d(scale, 1, k, n)), "ffn_moe_weights_scaled", il)

        x = g.reshape_3d(named(rms(g, h1, eps, L.pre_ffw_norm_2), "ffn_norm_2", il), hp.n_embd, 1, n)
        fe = hp.n_ff_exp
        if L.ffn_gate_up_exps is not None:
            gu = product_id(g, L.ffn_gate_up_exps, x, ids)  # [2*fe, k, n]: gate rows, then up rows
            gate = g.view_3d(gu, fe, k, n, gu.nb[1], gu.nb[2], 0)
            up = g.view_3d(gu, fe, k, n, gu.nb[1], gu.nb[2], fe * gu.nb[0])
        else:
            gate = product_id(g, L.ffn_gate_exps, x, ids)
            up = product_id(g, L.ffn_up_exps, x, ids)
        # Routing weights scale the down projection's input (linear, so the same as scaling its output): a
        # row-broadcast multiply costs per element on the CPU backend, and fe < H elements are fewer.
        act = named(g.mul(g.mul(gelu_tanh(g, g.cont(gate)), up), wts), "ffn_moe_weighted", il)
        experts = product_id(g, L.ffn_down_exps, act, ids)  # [H, k, n]
        moe = g.view_2d(experts, hp.n_embd, n, experts.nb[2], 0)
        for j in range(1, k):
            moe = g.add(moe, g.view_2d(experts, hp.n_embd, n, experts.nb[2], j * experts.nb[1]))
        moe = named(rms(g, moe, eps, L.post_ffw_norm_2), "ffn_moe", il)
        both = named(g.add(dense, moe), "ffn_moe_combined", il)
        return named(rms(g, both, eps, L.post_ffw_norm), "ffn_post_norm", il)

    def _store_and_read(self, g: Ctx, kv: PromptKV, il: int, k: Any, v: Any, *, exact_new: bool = False,
                        tiles: bool = False) -> tuple[Any, Any]:
        """Write the n new K/V of layer il into the store's slots after the committed tokens (a ring write may
        wrap), and return what the new queries read: the slots of PromptKV.read_range, one contiguous range in
        slot order, so nothing is concatenated. (The decoder writes its canvas into slots the next encode
        overwrites.)

        exact_new (the decoder): an F16 store on the host is read as an F32 copy whose new slots hold the new
        tokens' F32 K/V, so a canvas attends to itself unrounded; only committed tokens' K/V are rounded. The
        copy is one pass over the slots read (the CPU's flash attention converts each F16 key once per tile of
        queries anyway). The encoder reads its own tokens back rounded: which tokens share its pass depends on
        the prefix a store already held, and a token's numbers must not. tiles: an encode pass's whole tiles
        of keys (PromptKV.read_range)."""
        n, swa = k.ne[2], self.hp.is_swa(il)
        first, count = kv.read_range(swa, n, tiles=tiles)
        pieces = kv.write_pieces(swa, n)
        out = []
        for new, store in ((k, kv.k[il]), (v, kv.v[il])):
            d, h, nb1, nb2 = store.ne[0], store.ne[1], store.nb[1], store.nb[2]
            for slot, src, cnt in pieces:
                piece = g.view_3d(new, d, h, cnt, new.nb[1], new.nb[2], src * new.nb[2])
                g.expand(g.cpy(piece, g.view_3d(store, d, h, cnt, nb1, nb2, slot * nb2)))
            read = g.view_3d(store, d, h, count, nb1, nb2, first * nb2)
            # (ggml_set keeps offsets in int32: a copy past 2 GB per layer reads the store as it is)
            if exact_new and store.type != F32 and _on_host(store) and count * d * h * 4 < 2**31:
                read = g.cast(read, F32)
                for slot, src, cnt in pieces:
                    piece = g.view_3d(new, d, h, cnt, new.nb[1], new.nb[2], src * new.nb[2])
                    read = g.set_inplace(read, piece, read.nb[1], read.nb[2], read.nb[3], (slot - first) * read.nb[2])
            out.append(read)
        return out[0], out[1]

    def _mask_input(self, g: Ctx, kind: str, kv: PromptKV, n: int, *, tiles: bool = False) -> Any:
        """The [keys read, query_rows(n)] mask input of one layer kind ("swa" or "full") of n new tokens."""
        _, count = kv.read_range(kind == "swa", n, tiles=tiles)
        return g.input(f"mask_{kind}", F16 if self.flash else F32, count, query_rows(n))

    def encode(self, g: Ctx, kv: PromptKV, n: int, images: bool = False) -> dict[str, Any]:
        """Causal pass over n new committed tokens at positions kv.n.. ; writes their K/V into the store.
        Inputs: ids [n], pos [n], mask_swa / mask_full [keys read, n] (0 or -inf; see kv.attention_mask); with
        images also text_keep [1, n] (1 on text rows, 0 on image rows) and image_embd [H, n] (the tower's
        embeddings, 0 on text rows)."""
        hp, w = self.hp, self.w
        ids, pos = g.input("ids", I32, n), g.input("pos", I32, n)
        masks = {kind: self._mask_input(g, kind, kv, n, tiles=True) for kind in ("swa", "full")}
        h = named(g.scale(g.get_rows(w.token_embd, ids), self.embd_scale), "inp_scaled")
        extra = {}
        if images:  # image rows take the tower's embeddings as they are (no embedding scale)
            extra = {"text_keep": g.input("text_keep", F32, 1, n),
                     "image_embd": g.input("image_embd", F32, hp.n_embd, n)}
            h = g.add(g.mul(h, extra["text_keep"]), extra["image_embd"])
        h, rows_pos = min_rows(g, h), min_rows(g, pos, 0)  # only the first n rows are written to the store
        rows = h.ne[1]
        for il, L in enumerate(w.layers):
            a = named(rms(g, h, hp.rms_eps, L.attn_norm), "attn_norm", il)
            q, k, v = self._qkv(g, il, a, rows_pos, rows)
            k, v = self._store_and_read(g, kv, il, token_rows(g, k, 0, n, 2), token_rows(g, v, 0, n, 2), tiles=True)
            if il == hp.n_layer - 1:
                break  # only K/V of the last layer matter: the encoder's output is never read
            mask = masks["swa" if hp.is_swa(il) else "full"]
            o = product(g, L.attn_output, named(attention(g, q, k, v, mask, self.flash), "kqv_out", il))
            h1 = named(g.add(h, named(rms(g, o, hp.rms_eps, L.post_attention_norm), "attn_post_norm", il)),
                       "attn_out", il)
            h = named(g.scale(g.add(h1, self._ffn(g, il, h1, rows)), L.enc_layer_output_scale), "l_out", il)
        return {"ids": ids, "pos": pos, **{f"mask_{k}": m for k, m in masks.items()}, **extra}

    def self_cond(self, g: Ctx, sc_probs: Any, embd_t: Any) -> Any:
        """MLP_sc(pre_norm(softmax(prev scaled logits) . E . s_e)): [V, L] -> [H, L]. sc_probs holds that
        softmax already (the previous step's sampling computed it), in E^T's type; both are in sc_shape's blocks."""
        w, hp = self.w, self.hp
        soft = product(g, embd_t, sc_probs)  # [H, L, C]: one product per vocabulary block
        while soft.ne[2] > 1:  # summed over the blocks pairwise, halving the blocks each time
            assert soft.ne[2] % 2 == 0, "sc_blocks gives a power of two"
            half = soft.ne[2] // 2
            lo, hi = (g.view_3d(soft, soft.ne[0], soft.ne[1], half, soft.nb[1], soft.nb[2], i * half * soft.nb[2])
                      for i in (0, 1))
            soft = g.add(lo, hi)
        soft = g.scale(g.reshape_2d(soft, soft.ne[0], soft.ne[1]), self.embd_scale)
        soft = named(rms(g, soft, hp.rms_eps, w.self_cond_pre_norm), "self_cond_in")
        return mlp(g, soft, w.self_cond_gate, w.self_cond_up, w.self_cond_down)

    def decode(self, g: Ctx, kvs: list[PromptKV], L: int, embd_t: Any, sc_states: list[Any],
               vocab_biases: list[Any] | None = None, logprobs: list[int | None] | None = None) -> dict[str, Any]:
        """Bidirectional pass over the canvases of B sequences (L tokens each, at positions kvs[b].n.. of each
        store), followed by each canvas's sampler statistics of its temperature-scaled logits. Every row-wise
        part (embedding, projections, MoE, LM head) runs on all B*L rows at once; attention reads each
        sequence's own store, and sampling is per canvas, so each is computed as it would be alone.

        sc_states[b] (sc_shape(V, L)) is a persistent device tensor (E^T's type): the previous step's
        softmax(logits / T) is read from it for self-conditioning and this step's is written back, so it never
        leaves the device and is computed once per step.
        Inputs: ids [B*L], pos [B*L]; per canvas (lists of B): sc_gate [1] (0 on the first step:
        self-conditioning contributes exactly 0), inv_temp [1], uniform [1, L] (one draw per position for the
        multinomial sample), mask_swa [keys read, L].
        Outputs: logits [V, B*L] (soft-capped, no temperature); per canvas argmax [L], entropy [L] (nats),
        sample [1, L]. vocab_biases[b] [V, K] (a persistent device tensor, 0 or MASKED_LOGIT, or None)
        restricts each position's tokens to one of K vocabularies: input vocab_rows[b] [L] picks a row per
        position, added to the logits before all sampling statistics (templates). logprobs[b]: None, or k >= 0
        for canvas b's log-probabilities too (see sample); off by default, so nothing is added to the graph."""
        hp, w = self.hp, self.w
        n_seq = len(kvs)
        n = n_seq * L
        biases = vocab_biases or [None] * n_seq
        ids, pos = g.input("ids", I32, n), g.input("pos", I32, n)
        sc_gate = [g.input("sc_gate", F32, 1) for _ in kvs]
        inv_temp = [g.input("inv_temp", F32, 1) for _ in kvs]
        uniform = [g.input("uniform", F32, 1, L) for _ in kvs]
        mask_swa = [self._mask_input(g, "swa", kv, L) for kv in kvs]
        hard = named(g.scale(g.get_rows(w.token_embd, ids), self.embd_scale), "inp_scaled")
        sc = named(concat_tokens(g, [mul_scalar(g, self.self_cond(g, state, embd_t), gate)
                                     for state, gate in zip(sc_states, sc_gate, strict=True)]), "self_cond_out")
        h = named(g.rms_norm(g.add(hard, sc), hp.rms_eps), "inp_embd")  # self_conditioning.post_norm has no weight
        h, rows_pos = min_rows(g, h), min_rows(g, pos, 0)  # rows past n (a lone token's copy) are never read
        rows = h.ne[1]
        for il, Lw in enumerate(w.layers):
            a = named(rms(g, h, hp.rms_eps, Lw.attn_norm), "attn_norm", il)
            q, k, v = self._qkv(g, il, a, rows_pos, rows)
            heads = []
            for b, kv in enumerate(kvs):
                kb, vb = self._store_and_read(g, kv, il, token_rows(g, k, b, L, 2), token_rows(g, v, b, L, 2),
                                             exact_new=True)
                # Global layers: every key read is visible. Sliding layers: the ring slots read may hold committed
                # tokens older than the last W-1, so their mask (the same for every canvas query) hides those.
                mask = mask_swa[b] if hp.is_swa(il) else _ffi.NULL
                heads.append(attention(g, token_rows(g, q, b, L, 2), kb, vb, mask, self.flash))
            o = product(g, Lw.attn_output, named(min_rows(g, concat_tokens(g, heads)), "kqv_out", il))
            h1 = named(g.add(h, named(rms(g, o, hp.rms_eps, Lw.post_attention_norm), "attn_post_norm", il)),
                       "attn_out", il)
            h = named(g.scale(g.add(h1, self._ffn(g, il, h1, rows)), Lw.layer_output_scale), "l_out", il)
        h = named(rms(g, h, hp.rms_eps, w.output_norm), "result_norm")
        logits = product(g, w.token_embd, h)  # tied LM head
        logits = softcap(g, logits, hp.softcap)
        g.output(logits, "logits")
        io: dict[str, Any] = {"ids": ids, "pos": pos, "sc_gate": sc_gate, "inv_temp": inv_temp, "uniform": uniform,
                              "mask_swa": mask_swa, "logits": logits}
        if any(bias is not None for bias in biases):
            io["vocab_rows"] = [None] * n_seq
        stats: dict[str, list[Any]] = {"argmax": [], "entropy": [], "sample": []}
        tops = logprobs or [None] * n_seq
        if any(k is not None for k in tops):
            stats.update({"logprob": [], "top_ids": [], "top_logprobs": []})
        for b in range(n_seq):
            own = token_rows(g, logits, b, L)
            if biases[b] is not None:
                rows = io["vocab_rows"][b] = g.input("vocab_rows", I32, L)
                own = g.add_id(own, biases[b], rows)  # one pass: logits[:, j] + bias[:, rows[j]]
            for name, t in self.sample(g, own, inv_temp[b], uniform[b], sc_states[b], tops[b]).items():
                stats[name].append(t)
            for name in ("logprob", "top_ids", "top_logprobs"):
                if name in stats and len(stats[name]) <= b:
                    stats[name].append(None)  # this canvas did not ask
        return {**io, **stats}

    @staticmethod
    def _row_dots(g: Ctx, a: Any, b: Any) -> Any:
        """sum_v a[v, j] b[v, j] for every column j of two [V, L] tensors, as L batched 1x1 products: the
        CPU backend's sum_rows runs on one thread, a matrix product on all of them."""
        V, L = a.ne[0], a.ne[1]
        return g.mul_mat(g.reshape_3d(a, V, 1, L), g.reshape_3d(b, V, 1, L))  # [1, 1, L]

    def sample(self, g: Ctx, logits: Any, inv_temp: Any, uniform: Any, sc_state: Any,
               top_k: int | None = None) -> dict[str, Any]:
        """Per-position argmax, entropy and multinomial sample of softmax(logits / T), on the device.
        top_k (None: off): also logprob [L], log p of each argmax token, and for k > 0 top_ids / top_logprobs
        [k, L], the k most likely tokens (in no particular order) and their log p: ggml's top_k on the scaled
        logits, so only k x L numbers leave the device, never the [V, L] distribution.

        Entropy H = logsumexp(s) - sum(p s), with logsumexp(s) = s[argmax] - log p[argmax] (one log per position
        instead of one per vocabulary entry). The sample is the inverse CDF at u * total mass: the first entry
        whose running sum exceeds it, i.e. V minus the number of entries above it (cdf is monotone); a count
        rather than an argmax over step(), whose tie order is backend-specific."""
        V, L = logits.ne[0], logits.ne[1]
        scaled = mul_scalar(g, logits, inv_temp)
        probs = g.soft_max(scaled)
        Vb, _, C = sc_state.ne[0], sc_state.ne[1], sc_state.ne[2]  # the next step's self-conditioning input,
        g.expand(g.cpy(g.permute(g.reshape_3d(probs, Vb, C, L), 0, 2, 1, 3), sc_state))  # kept on the device
        argmax = g.argmax(logits)
        at_max = g.reshape_2d(argmax, 1, L)
        s_max = g.get_rows(g.reshape_3d(scaled, 1, V, L), at_max)  # [1, 1, L]
        p_max = g.get_rows(g.reshape_3d(probs, 1, V, L), at_max)
        log_p_max = g.log(g.reshape_2d(p_max, 1, L))
        lse = g.sub(g.reshape_2d(s_max, 1, L), log_p_max)
        entropy = g.sub(lse, g.reshape_2d(self._row_dots(g, probs, scaled), 1, L))
        cdf = g.cumsum(probs)
        total = g.cont(g.view_2d(cdf, 1, L, cdf.nb[1], (V - 1) * cdf.nb[0]))
        # The threshold is repeated into blocks of b entries, the cdf seen as [b, V/b, L]: subtracting a
        # one-value-per-column tensor costs per element on the CPU backend, a b-wide row is vectorized.
        b = math.gcd(V, 256)
        blocks = g.view_3d(cdf, b, 1, L, cdf.nb[1], cdf.nb[1], 0)  # shape template only
        thr = g.repeat(g.reshape_3d(g.mul(uniform, total), 1, 1, L), blocks)
        above = g.reshape_2d(g.step(g.sub(g.reshape_3d(cdf, b, V // b, L), thr)), V, L)
        sample = g.scale_bias(g.reshape_2d(self._row_dots(g, above, above), 1, L), -1.0, float(V))  # 0/1: a.a = sum
        out = {"argmax": g.output(argmax, "argmax"), "entropy": g.output(g.reshape_1d(entropy, L), "entropy"),
               "sample": g.output(g.reshape_1d(sample, L), "sample")}
        if top_k is not None:
            out["logprob"] = g.output(g.reshape_1d(log_p_max, L), "logprob")
        if top_k:
            ids = g.top_k(scaled, top_k)  # [k, L]
            vals = g.get_rows(g.reshape_3d(scaled, 1, V, L), ids)  # [1, k, L]
            out["top_ids"] = g.output(ids, "top_ids")
            out["top_logprobs"] = g.output(g.reshape_2d(g.sub(vals, g.reshape_3d(lse, 1, 1, L)), top_k, L),
                                           "top_logprobs")
        return out


def flash_supported(backend: Any, hp: HParams) -> bool:
    """Whether `backend` runs flash attention at both head sizes of a model (F16 keys and mask, as we use it)."""
    g = Ctx(64)
    try:
        ok = True
        for d in {hp.head_dim, hp.head_dim_swa}:
            q = _lib.ggml_new_tensor_3d(g.ctx, F32, d, 4, hp.n_head)
            k = _lib.ggml_new_tensor_3d(g.ctx, F16, d, 16, 1)
            m = _lib.ggml_new_tensor_2d(g.ctx, F16, 16, 4)
            fa = g.flash_attn_ext(q, k, k, m, 1.0, 0.0, 0.0)
            ok = ok and bool(_lib.ggml_backend_supports_op(backend, fa))
        return ok
    finally:
        g.free()


def set_input(t: Any, arr: np.ndarray) -> None:
    """Write `arr` into a graph input once allocated (one the graph does not use has no buffer: skipped)."""
    if t.buffer == _ffi.NULL:  # e.g. no global layer to mask
        return
    arr = np.ascontiguousarray(arr)
    _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(arr), 0, arr.nbytes)


@dataclasses.dataclass
class Allocated:
    """A built graph allocated on the scheduler: its key (what it was built for) and its input/output tensors."""

    key: tuple
    ctx: Ctx
    io: dict[str, Any]


class Runner:
    """A ggml scheduler over `backends` (the first preferred) holding one allocated graph: use() rebuilds and
    reallocates only when the key changes. An observer (set_observer) sees every node computed. health() is
    called after each compute and failed allocation (the engine's check for a lost RPC server)."""

    def __init__(self, backends: list[Any], health: Callable[[], None] = lambda: None) -> None:
        self._health = health
        self._backends = _ffi.new("ggml_backend_t[]", backends)
        self.sched = _lib.ggml_backend_sched_new(self._backends, _ffi.NULL, len(backends), GRAPH_NODES, False, True)
        self.graph: Allocated | None = None  # the one allocated now
        self._observer: Any = None  # the eval callback, kept alive while installed
        self._observer_error: BaseException | None = None

    def use(self, key: tuple, build: Callable[[Ctx], dict[str, Any]]) -> Allocated:
        """The allocated graph for `key`, built by build(ctx) (returning its io tensors) when the key changed."""
        if self.graph is not None and self.graph.key == key:
            return self.graph
        self.drop()
        _lib.ggml_backend_sched_reset(self.sched)
        g = Ctx(GRAPH_NODES)
        io = build(g)
        if not _lib.ggml_backend_sched_alloc_graph(self.sched, g.graph):
            g.free()
            self._health()  # a lost RPC server refuses allocations: say so rather than "out of memory"
            raise Error("ggml could not allocate the compute graph (out of memory?)")
        self.graph = Allocated(key, g, io)
        return self.graph

    def compute(self, gr: Allocated) -> None:
        """Run the graph; an exception the observer raised is raised here."""
        status = _lib.ggml_backend_sched_graph_compute(self.sched, gr.ctx.graph)
        self._health()  # a lost RPC server: its relay answered in its place, the results are void
        if self._observer_error is not None:  # the callback raised: the graph went unobserved from there
            err, self._observer_error = self._observer_error, None
            raise err
        if status != 0:
            raise Error("ggml graph computation failed")

    def drop(self) -> None:
        """Free the allocated graph; the next use() builds and allocates one again."""
        if self.graph is not None:
            self.graph.ctx.free()
            self.graph = None

    @property
    def observed(self) -> bool:
        return self._observer is not None

    def set_observer(self, callback: Callable[[Any, bool], bool] | None) -> None:
        """Call callback(node, ask) for the nodes of every graph computed from now on (ggml's scheduler eval
        callback; None removes it). An exception in it (Ctrl-C and SIGTERM's included) ends the observation: the
        graph finishes unobserved and compute() raises it."""
        if callback is None:
            _lib.ggml_backend_sched_set_eval_callback(self.sched, _ffi.NULL, _ffi.NULL)
            self._observer = self._observer_error = None
        else:
            def on_node(t: Any, ask: bool, _ud: Any) -> bool:
                if self._observer_error is not None:  # stopped: the rest of the graph runs unobserved
                    return not ask
                return bool(callback(t, ask))

            def on_error(_type: Any, e: BaseException, _tb: Any) -> bool:
                # cffi hands over whatever leaves on_node, even a signal handler's exception raised as on_node
                # starts (a try inside it misses that one); the first is kept for compute() to raise.
                if self._observer_error is None:
                    self._observer_error = e
                return True  # "need it" / "go on": the graph completes (stopping one backend split early would
                # leave the later splits reading stale inputs, e.g. expert ids out of range)

            self._observer = _ffi.callback("bool(struct ggml_tensor *, bool, void *)", on_node, onerror=on_error)
            _lib.ggml_backend_sched_set_eval_callback(self.sched, self._observer, _ffi.NULL)
        self.drop()  # the callback takes effect from the next graph allocation

    def free(self) -> None:
        self.drop()
        _lib.ggml_backend_sched_free(self.sched)
