"""Images for the Gemma-4 vision tower: decoding and preprocessing as the Hugging Face processor does it
(its PIL backend; ../shared/spec/vision.md §3.1).

An image becomes RGB (transparency composited onto white), is resized with PIL's bicubic filter, keeping its
aspect ratio, to the largest size whose sides are multiples of patch x pooling (48 px) that fits the budget of
soft tokens (small images are upscaled), is scaled to [0, 1] and cut into patches in row-major order.
Pillow is needed only here (the `vision` extra).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
from typing import Any

import numpy as np

from .errors import Error

BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image the processor accepts
DEFAULT_BUDGET = 280


@dataclasses.dataclass(frozen=True)
class Patches:
    """One preprocessed image: patches [rows*cols, 3 p^2] (raster pixels, RGB interleaved, in [0, 1])."""

    pixels: np.ndarray
    cols: int  # patch columns
    rows: int  # patch rows
    n_tokens: int  # soft tokens after pooling
    size: tuple[int, int]  # resized (width, height)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise Error("image input needs Pillow: pip install 'diffgemma[vision]'") from e
    return Image


def open_image(image: Any) -> Any:
    """A PIL image in RGB from a path, bytes, a PIL image or a uint8 array (H x W, H x W x 3 or 4); alpha is
    composited onto white as the reference processor does."""
    Image = _pil()
    what = f"the image {image}" if isinstance(image, str | os.PathLike) else "the image"  # a file is named
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, bytes | bytearray | memoryview):
            img = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, str | os.PathLike):
            p = pathlib.Path(image)
            if not p.is_file():
                raise Error(f"{p}: no such image file")
            img = Image.open(p)
        elif isinstance(image, np.ndarray):
            channels = image.shape[2] if image.ndim == 3 else 1
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
                raise Error(f"an image array must be uint8 H x W, H x W x 3 or H x W x 4, got {image.dtype} "
                            f"{image.shape}")
            img = Image.fromarray(image[:, :, 0] if channels == 1 and image.ndim == 3 else image)
        else:
            raise Error(f"an image must be a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}")
        img.load()
    except Error:
        raise
    except Image.UnidentifiedImageError as e:  # its message names a BytesIO object, not the problem
        raise Error(f"cannot read {what}: not in a format Pillow knows (PNG, JPEG, WebP, GIF, BMP, ...)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise Error(f"cannot read {what}: {e}") from e
    if img.width <= 0 or img.height <= 0:
        raise Error(f"{what} has zero size ({img.width}x{img.height})")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def target_size(width: int, height: int, budget: int, patch: int = 16, pool: int = 3) -> tuple[int, int]:
    """(width, height) after the aspect-preserving resize to `budget` soft tokens: sides multiples of
    patch x pool, at most budget x pool^2 patches."""
    if budget not in BUDGETS:
        raise Error(f"image_budget must be one of {BUDGETS}, got {budget!r}")
    side = patch * pool
    max_px = budget * pool * pool * patch * patch
    f = math.sqrt(max_px / (width * height))
    h, w = math.floor(f * height / side) * side, math.floor(f * width / side) * side
    if h == 0 and w == 0:
        raise Error(f"cannot resize a {width}x{height} image to the patch grid")
    longest = budget * side
    if h == 0:  # a very wide image: one row of cells, as wide as the aspect allows
        h, w = side, min(math.floor(width / height) * side, longest)
    elif w == 0:
        w, h = side, min(math.floor(height / width) * side, longest)
    if h * w > max_px:
        raise Error(f"a {width}x{height} image does not fit {budget} soft tokens")
    return w, h


def preprocess(image: Any, budget: int = DEFAULT_BUDGET, patch: int = 16, pool: int = 3) -> Patches:
    """Decode, resize and patchify one image for a tower with this patch size and pooling kernel."""
    img = open_image(image)
    w, h = target_size(img.width, img.height, budget, patch, pool)
    if (w, h) != img.size:
        img = img.resize((w, h), resample=_pil().Resampling.BICUBIC)
    px = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [h, w, 3]
    rows, cols = h // patch, w // patch
    pixels = px.reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    return Patches(np.ascontiguousarray(pixels), cols, rows, rows * cols // (pool * pool), (w, h))
