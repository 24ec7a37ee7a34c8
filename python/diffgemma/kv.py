"""The prompt-KV store: each layer's K (after k_norm + RoPE) and V (after v_norm) of the committed tokens.

Sized by what a query can see (../shared/spec/model.md §5):
* global layers read every committed token: a linear store (slot = position) that grows in chunks as the
  context fills, so a model that only sees short prompts stays small;
* sliding layers read at most the last W-1 committed tokens: a ring of R = W-1 + room slots, rounded up to whole
  FA_TILE tiles (slot = position mod R), where room holds one prefill chunk or a canvas. Its size does not depend
  on n_ctx.
K and V are stored in F16 by default (F32 on request). Masks are built on the host from the positions the
slots hold, so they stay exactly the reference's across wrap-around.

A token's result must not depend on how its prompt was cut into passes (a reused prefix, a batch): ggml's CPU
flash attention sums keys in tiles of FA_TILE counted from the first slot read, so the sliding layers read from
a slot that is a multiple of FA_TILE and the tiles are fixed by slot; and masks have at least FA_TILE query rows
(graph.attention pads the queries to as many, see there). ggml's plain attention sums over the keys read, so an
encode pass reads them in whole tiles (whole_tiles).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import binding as B
from .binding import F16, F32
from .errors import Error
from .layout import HParams

_lib, _ffi = B.lib, B.ffi
KV_TYPES = {"f16": F16, "f32": F32}
GROW_TOKENS = 4096  # the global layers' store grows in multiples of this many tokens
COPY_CHUNK = 64 << 20  # bytes staged through the host per copy when the store grows
RESERVE_BYTES = 512 << 20  # memory left free next to the store (compute buffers, the rest of the process)
FA_TILE = 64  # query rows and keys per tile of ggml's CPU flash attention (GGML_FA_TILE_Q, GGML_FA_TILE_KV)


def query_rows(n: int) -> int:
    """Query rows of an attention over n tokens: at least FA_TILE, so that ggml's CPU flash attention always
    takes its tiled kernel (F32 accumulation, the same sums whatever the pass) rather than its per-row one
    (F16 accumulation over an F16 store, chosen below FA_TILE rows)."""
    return max(n, FA_TILE)


def kv_type_of(name: str) -> int:
    """The GGML type of a store type name ("f16" or "f32")."""
    if name not in KV_TYPES:
        raise Error(f"kv_type must be one of {sorted(KV_TYPES)}, got {name!r}")
    return KV_TYPES[name]


def _row_bytes(hp: HParams, il: int, ttype: int) -> int:
    """Bytes of one token's K and V in layer il."""
    return 2 * hp.layer_head_dim(il) * hp.n_head_kv[il] * _lib.ggml_type_size(ttype)


def bytes_per_token(hp: HParams, ttype: int, layers: Iterable[int] | None = None) -> int:
    """Store bytes each committed token adds: K and V of every global layer (of `layers` if given)."""
    layers = range(hp.n_layer) if layers is None else layers
    return sum(_row_bytes(hp, il, ttype) for il in layers if not hp.is_swa(il))


def whole_tiles(n: int) -> int:
    """n keys rounded up to whole FA_TILE tiles. An encode pass reads its keys so (the extra slots masked): ggml's
    plain attention sums over the keys a pass reads (softmax, then the product with V), and a sum whose SIMD
    tail moves with the pass rounds differently; which tokens share an encode pass depends on the store's history.
    Whole tiles leave no tail, and masked keys add exact zeros at the end."""
    return -(-n // FA_TILE) * FA_TILE


def ring_slots(hp: HParams, room: int) -> int:
    """Slots of the sliding layers' ring: the last W-1 committed tokens plus `room` new ones, in whole tiles."""
    return whole_tiles(hp.sliding_window - 1 + room)


def ring_bytes(hp: HParams, ttype: int, room: int, layers: Iterable[int] | None = None) -> int:
    """Bytes of the sliding layers' rings (of `layers` if given): fixed, whatever the context."""
    layers = range(hp.n_layer) if layers is None else layers
    return ring_slots(hp, room) * sum(_row_bytes(hp, il, ttype) for il in layers if hp.is_swa(il))


def store_bytes(hp: HParams, ttype: int, n_ctx: int, room: int, layers: Iterable[int] | None = None) -> int:
    """Bytes of the whole store (of `layers` if given) once n_ctx tokens are held."""
    layers = list(range(hp.n_layer) if layers is None else layers)
    return ring_bytes(hp, ttype, room, layers) + whole_tiles(n_ctx) * bytes_per_token(hp, ttype, layers)


def host_available() -> int:
    """Bytes the host can hand out now without swapping (MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def max_context(hp: HParams, ttype: int, room: int, budget: int, layers: Iterable[int] | None = None) -> int:
    """The longest context whose store (of `layers` if given) fits in `budget` bytes, capped by the file's
    context length."""
    layers = list(range(hp.n_layer) if layers is None else layers)
    per_token = bytes_per_token(hp, ttype, layers)
    left = budget - ring_bytes(hp, ttype, room, layers)
    if left < 0:
        return 0
    return int(hp.context_length if per_token == 0 else min(hp.context_length, left // per_token))


def attention_mask(kpos: np.ndarray, qpos: np.ndarray, *, causal: bool, window: int | None = None,
                   dtype: Any = np.float32) -> np.ndarray:
    """[n_q, n_k] additive mask (0 = visible, -inf = not) of queries at positions qpos over keys at kpos
    (spec §5); kpos < 0 marks an empty slot.

    causal (encoder): a key is visible at or before its query, and with `window` only within the query's last
    `window` positions (p - W < k <= p). Not causal (decoder): the queries are one bidirectional block that sees
    itself and, with `window`, the W-1 positions before it (every query the same keys)."""
    k, q = np.asarray(kpos), np.asarray(qpos)
    lo = -1 if window is None else q.min() - window  # keys at or below lo are out of every query's window
    if not causal:
        ok = (k >= 0) & (k > lo) & (k <= q.max())
        return np.broadcast_to(np.where(ok, 0.0, -np.inf).astype(dtype), (len(q), len(k))).copy()
    # Only keys some queries see and others do not need a per-query test: a long prefix is visible to all.
    always = (k >= 0) & (k <= q.min()) & (k > (-1 if window is None else q.max() - window))
    never = (k < 0) | (k > q.max()) | (k <= lo)
    m = np.zeros((len(q), len(k)), dtype)
    m[:, never] = -np.inf
    some = np.flatnonzero(~always & ~never)
    if some.size:
        ks, qs = k[some][None, :], q[:, None]
        ok = ks <= qs
        if window is not None:
            ok &= ks > qs - window
        m[:, some] = np.where(ok, 0.0, -np.inf)
    return m


class PromptKV:
    """K/V of every layer on the layer's device: k[il], v[il] are [d, n_kv_head, slots].

    n: committed tokens held. The decoder writes a canvas's K/V into the slots after them (the next encode
    overwrites them), so a canvas needs room in both stores."""

    def __init__(self, hp: HParams, *, n_ctx: int, room: int, ttype: int,
                 buffer_type: Callable[[int], Any] | None, device_free: Callable[[int], int] | None = None):
        """buffer_type(il): the ggml buffer type of layer il's device, or None for tensors without memory
        (graph-only dry runs). device_free(il): bytes free on that device (None: the host's)."""
        self.hp, self.n_ctx, self.room, self.ttype = hp, n_ctx, room, ttype
        self.ring = ring_slots(hp, room)
        self.n = 0
        self.slot_pos = np.full(self.ring, -1, np.int64)  # the position each ring slot holds (-1: none)
        self._buffer_type, self._device_free = buffer_type, device_free or (lambda il: host_available())
        self._owned: dict[int, tuple[Any, Any]] = {}  # layer -> (ggml context, buffer) of its tensors
        self.k: list[Any] = [None] * hp.n_layer
        self.v: list[Any] = [None] * hp.n_layer
        self.capacity = 0  # slots of the global layers' stores
        swa = [il for il in range(hp.n_layer) if hp.is_swa(il)]
        if swa:
            self._alloc(swa, self.ring)
        self.capacity = whole_tiles(min(n_ctx, GROW_TOKENS))
        for il in range(hp.n_layer):  # one buffer per global layer: growing one frees its old copy at once
            if not hp.is_swa(il):
                self._alloc([il], self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        bufs = {id(buf): buf for _, buf in self._owned.values() if buf is not None}  # layers share a buffer
        return sum(_lib.ggml_backend_buffer_get_size(buf) for buf in bufs.values())

    # ---- memory ------------------------------------------------------------------------------------------

    def _alloc(self, layers: list[int], slots: int) -> None:
        """Create the tensors of `layers` with `slots` slots, one context and buffer per device."""
        groups: dict[Any, list[int]] = {}
        for il in layers:
            groups.setdefault(self._buffer_type(il) if self._buffer_type else None, []).append(il)
        for buft, group in groups.items():
            ctx = B.ggml_context(_lib.ggml_tensor_overhead() * (2 * len(group) + 4))
            for il in group:
                d, h = self.hp.layer_head_dim(il), self.hp.n_head_kv[il]
                self.k[il] = _lib.ggml_new_tensor_3d(ctx, self.ttype, d, h, slots)
                self.v[il] = _lib.ggml_new_tensor_3d(ctx, self.ttype, d, h, slots)
                _lib.ggml_set_name(self.k[il], f"prompt_k.{il}".encode())
                _lib.ggml_set_name(self.v[il], f"prompt_v.{il}".encode())
            buf = None
            if buft is not None:
                need = sum(_row_bytes(self.hp, il, self.ttype) for il in group) * slots
                free = self._device_free(group[0])
                if need + RESERVE_BYTES > free:
                    _lib.ggml_free(ctx)
                    raise Error(f"the prompt-KV store needs {need:,} bytes for {slots:,} tokens but only {free:,} "
                                "bytes of memory are free; load with a smaller n_ctx")
                buf = _lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
                if buf == _ffi.NULL:
                    _lib.ggml_free(ctx)
                    raise Error(f"cannot allocate {need:,} bytes for the prompt-KV store; load with a smaller n_ctx")
                # Masked slots are still read (0 x value): never-written memory could hold NaN bit patterns.
                _lib.ggml_backend_buffer_clear(buf, 0)
            entry = (ctx, buf)  # one object for the group: freed once, when its last layer lets go
            for il in group:
                self._owned[il] = entry

    def _release(self, owned: tuple[Any, Any]) -> None:
        """Free a context and its buffer once no layer uses them."""
        ctx, buf = owned
        if buf is not None and all(b is not buf for _, b in self._owned.values()):
            _lib.ggml_backend_buffer_free(buf)
        if all(c is not ctx for c, _ in self._owned.values()):
            _lib.ggml_free(ctx)

    def reserve(self, n_tokens: int) -> bool:
        """Make the global layers' stores hold n_tokens slots (growing in chunks of GROW_TOKENS, one layer at a
        time so the peak is one layer's copy); True when tensors were replaced (graphs must be rebuilt)."""
        if n_tokens <= self.capacity:
            return False
        if n_tokens > self.n_ctx:
            raise Error(f"{n_tokens} tokens exceed n_ctx={self.n_ctx}")
        new = whole_tiles(min(self.n_ctx, -(-max(n_tokens, 2 * self.capacity) // GROW_TOKENS) * GROW_TOKENS))
        keep = self.n  # committed K/V survive; canvas slots after them are rewritten by the next pass
        stage = np.empty(COPY_CHUNK, np.uint8)
        for il in [il for il in range(self.hp.n_layer) if not self.hp.is_swa(il)]:
            old_k, old_v, old = self.k[il], self.v[il], self._owned.pop(il)
            try:
                self._alloc([il], new)
            except Error:
                self._owned[il], self.k[il], self.v[il] = old, old_k, old_v
                raise
            for src, dst in ((old_k, self.k[il]), (old_v, self.v[il])):
                total = keep * src.nb[2]
                for off in range(0, total, COPY_CHUNK):
                    size = min(COPY_CHUNK, total - off)
                    _lib.ggml_backend_tensor_get(src, _ffi.from_buffer(stage), off, size)
                    _lib.ggml_backend_tensor_set(dst, _ffi.from_buffer(stage), off, size)
            self._release(old)
        self.capacity = new
        return True

    def free(self) -> None:
        owned, self._owned = list(self._owned.values()), {}
        for o in {id(o): o for o in owned}.values():
            self._release(o)

    # ---- slots -------------------------------------------------------------------------------------------

    def write_pieces(self, swa: bool, n: int) -> list[tuple[int, int, int]]:
        """(first slot, first new token, count) of the contiguous pieces the n tokens after the committed ones
        go to: one piece in a global store, two where the ring wraps."""
        if not swa:
            return [(self.n, 0, n)]
        s = self.n % self.ring
        a = min(n, self.ring - s)
        return [(s, 0, a)] + ([(0, a, n - a)] if n > a else [])

    def read_range(self, swa: bool, n: int, *, tiles: bool = False) -> tuple[int, int]:
        """(first slot, count) a pass over n new tokens reads: every slot up to them in a global store; in the
        ring the last W-1 committed and the n new ones, from the multiple of FA_TILE at or below them, where
        those are contiguous, else the whole ring. (The extra slots hold older tokens: masked.) tiles (an
        encode pass): the count in whole_tiles, the slots past the new tokens masked."""
        if not swa:
            return 0, whole_tiles(self.n + n) if tiles else self.n + n
        lo = max(0, self.n - (self.hp.sliding_window - 1))
        first = lo % self.ring // FA_TILE * FA_TILE
        count = lo % self.ring - first + self.n + n - lo
        count = whole_tiles(count) if tiles else count
        return (first, count) if first + count <= self.ring else (0, self.ring)

    def mark(self, n: int) -> None:
        """Record that the ring's slots for positions n_committed.. n_committed+n-1 now hold them."""
        pos = np.arange(self.n, self.n + n)
        self.slot_pos[pos % self.ring] = pos

    def key_positions(self, swa: bool, n: int, *, tiles: bool = False) -> np.ndarray:
        """Positions held by the slots `read_range` returns (-1 for an empty ring slot; a global slot past the new
        tokens gets a later position, which every query masks)."""
        first, count = self.read_range(swa, n, tiles=tiles)
        return self.slot_pos[first:first + count] if swa else np.arange(count)

    def masks(self, n: int, *, causal: bool, kinds: Iterable[str] = ("swa", "full"), dtype: Any = np.float32
              ) -> dict[str, np.ndarray]:
        """The masks ("swa": sliding layers, "full": global layers) [query_rows(n), keys read] of n new tokens
        after the committed ones over the slots they read (call `mark(n)` first); rows past n (padding queries,
        a lone token's copy) repeat the last one, so that they stay finite. causal: an encode pass, which reads
        whole tiles of keys (read_range)."""
        qpos = np.arange(self.n, self.n + n)
        out = {}
        for kind in kinds:
            m = attention_mask(self.key_positions(kind == "swa", n, tiles=causal), qpos, causal=causal,
                               window=self.hp.sliding_window if kind == "swa" else None, dtype=dtype)
            out[kind] = np.concatenate([m, np.repeat(m[-1:], query_rows(n) - n, axis=0)])
        return out

    def truncate(self, n: int) -> bool:
        """Keep only the first n committed tokens; False when the ring no longer holds the last W-1 of them
        (overwritten by later tokens): then the caller must encode again from the start."""
        pos = np.arange(max(0, n - (self.hp.sliding_window - 1)), n)
        if any(self.hp.swa_layers) and not np.array_equal(self.slot_pos[pos % self.ring], pos):
            return False
        self.n = n
        return True

    def reset(self) -> None:
        """Forget every committed token; the allocation is kept for the next prompt."""
        self.n = 0
        self.slot_pos[:] = -1
