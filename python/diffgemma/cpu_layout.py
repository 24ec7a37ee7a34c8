"""Where a CPU weight lives after loading: mapped from the file (no copy), rearranged into one of ggml's CPU extra
buffer types (CPU_REPACK), or copied as F32, whichever runs its product fastest on this CPU (`repack=True`).

Facts read in the pinned ggml that shape the choice (figures: docs/performance.md):
- types ggml's tiled K-quant/IQ GEMM takes (binding.TILED_TYPES; forced on for batch invariance) stay mapped,
  matrices and expert stacks alike: the tiled kernel beat the repacked one on Q4_K (dense products 2x, experts
  2.8x), so repacking serves Q4_0, IQ4_NL and MXFP4;
- dense matrices of a type the x86 CPU backend multiplies only by dot products (binding.DOT_ONLY_TYPES: Q4_1,
  Q5_1) are copied as F32, the values ggml dequantizes them to, for ggml's F32 GEMM (faster, at 4 bytes per
  weight). Not when GPUs run layers: ggml's scheduler uploads the CPU layers' weights for large batches, and an
  F32 copy is 5-6x the bytes of the file's block;
- only matrices (role MATRIX) are considered: each is read by its product alone (the embedding is also gathered
  by rows, which a rearranged layout cannot serve).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

from . import binding as B
from .binding import F32

DEQUANTIZE = "F32"  # choose()'s answer for a matrix copied as F32


def choose(cpu_dev: Any, info: Any, *, f32_copies: bool = True) -> Any:
    """For a CPU matrix (a file's tensor info): the first CPU extra buffer type whose kernel runs its product in
    its own layout, DEQUANTIZE for a dense matrix of a dot-product-only type (with f32_copies), or None (stays
    mapped)."""
    if info.type in B.TILED_TYPES:
        return None
    if info.type in B.DOT_ONLY_TYPES and len(info.shape) == 2:
        return DEQUANTIZE if f32_copies else None
    return next((buft for buft in B.extra_buffer_types(cpu_dev)
                 if B.product_supported(cpu_dev, buft, info.type, tuple(info.shape))), None)


def dequantized(infos: list, host_array: Callable[[str], np.ndarray]) -> B.DeviceTensors:
    """F32 copies of the matrices `infos` in one CPU buffer; host_array(name) reads one as float32."""
    owned = B.DeviceTensors(B.lib.ggml_backend_cpu_buffer_type(), [(i.name, F32, tuple(i.shape)) for i in infos],
                            weights=True, what=f"F32 copies of {len(infos)} matrices (repack=False avoids them)")
    for info, t in zip(infos, owned.tensors, strict=True):
        x = host_array(info.name)
        B.lib.ggml_backend_tensor_set(t, B.ffi.from_buffer(x), 0, x.nbytes)
    return owned


def drop_mapped(mapping: mmap.mmap, infos: list) -> None:
    """Release the mapped pages of weights that now live in their own buffer (read once to be copied; nothing
    reads them again), so they are not resident twice."""
    page = mmap.PAGESIZE
    for info in infos:
        start = -(-info.offset // page) * page
        end = (info.offset + info.nbytes) // page * page
        if end > start:
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
