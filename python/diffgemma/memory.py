"""Sizing the prompt-KV stores (kv.py): the memory free now on each device, the room a store keeps beyond its
window, and the context (n_ctx) a store can hold next to the weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import binding as B
from . import kv, multimodal
from .errors import Error
from .layout import HParams

_lib, _ffi = B.lib, B.ffi


def free_bytes(gpu_dev: Any | None) -> int:
    """Memory free now on a GPU device, or on the host (MemAvailable) for None."""
    if gpu_dev is None:
        return kv.host_available()
    free, total = _ffi.new("size_t *"), _ffi.new("size_t *")
    _lib.ggml_backend_dev_memory(gpu_dev, free, total)
    return int(free[0])


def store_room(hp: HParams, n_batch: int, vision: bool) -> int:
    """Tokens a store holds after the last W-1 keys: a prefill chunk or a canvas, and with a vision tower a
    whole image (its soft tokens are encoded in one pass, however many there are)."""
    room = max(n_batch, hp.canvas_length)
    return max(room, multimodal.MAX_IMAGE_TOKENS) if vision else room


def context_length(hp: HParams, n_ctx: int | None, *, kv_type: str, room: int, on_gpu: Callable[[str], bool],
                   tensors: Iterable[Any], free: Callable[[bool], int]) -> int:
    """The n_ctx of the prompt-KV stores. n_ctx=None: the file's context length, or less where a store would not
    fit next to the weights in the memory free now (free(on_gpu) in bytes; `tensors`: the file's tensor infos,
    whose host-side ones must stay resident); an n_ctx whose store does not fit is an Error naming the bytes.
    on_gpu(name) says where a layer's tensors live."""
    ttype = kv.kv_type_of(kv_type)
    groups = {dev: [il for il in range(hp.n_layer) if on_gpu(f"blk.{il}.") == dev] for dev in (False, True)}
    if n_ctx is None:
        host_weights = sum(t.nbytes for t in tensors if not on_gpu(t.name))

        def budget(dev: bool) -> int:  # the mapped CPU weights' pages must stay resident to run at speed
            return free(dev) - (0 if dev else host_weights) - kv.RESERVE_BYTES

        n_ctx = min(kv.max_context(hp, ttype, room, budget(dev), layers) for dev, layers in groups.items() if layers)
        if n_ctx < hp.canvas_length + 1:
            raise Error(f"not enough free memory for a prompt-KV store next to the weights "
                        f"({kv.store_bytes(hp, ttype, hp.canvas_length + 1, room):,} bytes for one "
                        "canvas); close other programs or offload fewer layers")
    else:
        if n_ctx > hp.context_length:
            raise Error(f"n_ctx={n_ctx} is above the file's context length {hp.context_length} "
                        "(positions past it were never trained); use n_ctx <= that, or leave it out")
        for dev, layers in groups.items():
            if not layers:
                continue
            need = kv.store_bytes(hp, ttype, n_ctx, room, layers)
            left = free(dev) - kv.RESERVE_BYTES
            if need > left:
                raise Error(f"n_ctx={n_ctx}: the prompt-KV store would need {need:,} bytes of "
                            f"{'GPU' if dev else 'host'} memory ({kv.bytes_per_token(hp, ttype):,} "
                            f"per token in {kv_type}) but only {max(left, 0):,} are free; use a smaller n_ctx")
    if n_ctx < hp.canvas_length + 1:
        raise Error(f"n_ctx={n_ctx} cannot hold a prompt and a canvas of {hp.canvas_length}")
    return n_ctx
