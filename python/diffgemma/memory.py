"""Sizing the prompt-KV stores (kv.py): the memory free now on each device, the room a store keeps beyond its
window, and the context (n_ctx) a store can hold next to the weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import binding as B
from . import kv, multimodal
from .errors import Error
from .layout import HParams

_lib, _ffi = B.lib, B.ffi


def free_bytes(dev: Any) -> int:
    """Memory free now on a device (devices.Device), or on the host (MemAvailable) for the CPU."""
    return kv.host_available() if dev.is_cpu else dev.free_now()


def store_room(hp: HParams, n_batch: int, vision: bool) -> int:
    """Tokens a store holds after the last W-1 keys: a prefill chunk or a canvas, and with a vision tower a
    whole image (its soft tokens are encoded in one pass, however many there are)."""
    room = max(n_batch, hp.canvas_length)
    return max(room, multimodal.MAX_IMAGE_TOKENS) if vision else room


def context_length(hp: HParams, n_ctx: int | None, *, kv_type: str, room: int, placement: Any,
                   tensors: Iterable[Any]) -> int:
    """The n_ctx of the prompt-KV stores. n_ctx=None: the file's context length, or less where a store would not
    fit next to the weights in the memory free now on each layer's device (placement: devices.Placement;
    `tensors`: the file's tensor infos, whose CPU-side ones must stay resident); an n_ctx whose store does not
    fit is an Error naming the device and the bytes."""
    ttype = kv.kv_type_of(kv_type)
    groups: dict[str, tuple[Any, list[int]]] = {}
    for il in range(hp.n_layer):
        dev = placement.of_layer(il)
        groups.setdefault(dev.name, (dev, []))[1].append(il)
    if n_ctx is None:
        host_weights = sum(t.nbytes for t in tensors if placement.of_tensor(t.name).is_cpu)

        def budget(dev: Any) -> int:  # the mapped CPU weights' pages must stay resident to run at speed
            return free_bytes(dev) - (host_weights if dev.is_cpu else 0) - kv.RESERVE_BYTES

        n_ctx = min(kv.max_context(hp, ttype, room, budget(dev), layers) for dev, layers in groups.values())
        if n_ctx < hp.canvas_length + 1:
            raise Error(f"not enough free memory for a prompt-KV store next to the weights "
                        f"({kv.store_bytes(hp, ttype, hp.canvas_length + 1, room):,} bytes for one "
                        "canvas); close other programs or offload fewer layers")
    else:
        if n_ctx > hp.context_length:
            raise Error(f"n_ctx={n_ctx} is above the file's context length {hp.context_length} "
                        "(positions past it were never trained); use n_ctx <= that, or leave it out")
        for dev, layers in groups.values():
            need = kv.store_bytes(hp, ttype, n_ctx, room, layers)
            left = free_bytes(dev) - kv.RESERVE_BYTES
            if need > left:
                raise Error(f"n_ctx={n_ctx}: the prompt-KV store would need {need:,} bytes of {dev.name} memory "
                            f"({kv.bytes_per_token(hp, ttype):,} per token in {kv_type}) but only "
                            f"{max(left, 0):,} are free; use a smaller n_ctx")
    if n_ctx < hp.canvas_length + 1:
        raise Error(f"n_ctx={n_ctx} cannot hold a prompt and a canvas of {hp.canvas_length}")
    return n_ctx
