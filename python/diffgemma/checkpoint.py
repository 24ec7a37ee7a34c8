"""Reading a Hugging Face checkpoint directory without torch: config.json and friends, safetensors headers,
memory-mapped tensors, and the float output types a conversion writes.

Shared by the text converter (diffgemma.converter) and the vision tower's (diffgemma.vision_convert).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import ftypes, gguf_file
from .errors import Error

# outtype → (ggml type of the matrices, llama ftype written as general.file_type)
OUTTYPES: dict[str, tuple[QT, int]] = {n: (QT[n.upper()], ftypes.FILE_TYPES[n].ftype)
                                       for n in ("f32", "f16", "bf16", "q8_0")}

_MAX_HEADER = 1 << 28  # sanity bound on a safetensors JSON header

# safetensors dtype → numpy dtype of its stored bytes
ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 with << 16
    "F64": np.dtype("<f8"),
}


# ---- JSON files ---------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file at `path`; an Error naming `what` when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise Error(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Error(f"{what} {path} is not valid JSON: {e}") from None


def read_optional_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object at `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise Error(f"{what} {path} does not hold a JSON object")
    return data


def read_config(hf_dir: Path) -> dict[str, Any]:
    """The config.json of a checkpoint directory, checked to be a JSON object."""
    if not hf_dir.is_dir():
        raise Error(f"{hf_dir} is not a directory (expected a Hugging Face checkpoint)")
    if not (hf_dir / "config.json").is_file():
        raise Error(f"{hf_dir} has no config.json")
    config = read_json(hf_dir / "config.json", "model config")
    if not isinstance(config, dict):
        raise Error(f"{hf_dir / 'config.json'} does not hold a JSON object")
    return config


def number(d: Mapping[str, Any], key: str, default: Any, kind: type, what: str) -> Any:
    """d[key] converted to `kind` (int/float); `default` when absent or null."""
    v = d.get(key)
    if v is None:
        return default
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or (kind is int and v != int(v)):
        raise Error(f"{what}: {key} must be a number{' (integer)' if kind is int else ''}, got {v!r}")
    return kind(v)


def merged_text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json with its text_config's keys lifted to the top (they win)."""
    tc = config.get("text_config") or {}
    if not isinstance(tc, dict):
        raise Error("config.json: text_config must be an object")
    merged = {k: v for k, v in config.items() if k != "text_config"}
    merged.update(tc)
    return merged


# ---- safetensors (streaming, no torch) ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    name: str
    path: Path
    dtype: str  # safetensors dtype string ("F32", "BF16", ...)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, SourceTensor]:
    """Parse a safetensors header (8-byte little-endian length + JSON) without reading any tensor data."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise Error(f"{p} is not a safetensors file (too short)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, _MAX_HEADER):
                raise Error(f"{p} is not a safetensors file (bad header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise Error(f"cannot read {p}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Error(f"{p}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise Error(f"{p}: corrupt safetensors header")
    base = 8 + n
    out: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Error(f"{p}: malformed header entry for {name!r}") from None
        if not 0 <= begin <= end or base + end > size:
            raise Error(f"{p}: tensor {name!r} lies outside the file (truncated download?)")
        if dtype in ST_DTYPES and end - begin != math.prod(shape) * ST_DTYPES[dtype].itemsize:
            raise Error(f"{p}: tensor {name!r} has {end - begin} bytes, expected {shape} of {dtype}")
        out[name] = SourceTensor(name, p, dtype, shape, base + begin, end - begin)
    return out


def _checkpoint_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = read_json(index, "safetensors index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise Error(f"{index}: missing weight_map")
        files = []
        for fn in dict.fromkeys(wm.values()):
            fp = d / str(fn)
            if not fp.is_file():
                raise Error(f"{index} names {fn}, which is missing from {d}")
            files.append(fp)
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise Error(f"{d} has no model.safetensors (nor a sharded model.safetensors.index.json)")
    return files


def read_checkpoint_index(hf_dir: str | os.PathLike[str]) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint (all shards), by name."""
    out: dict[str, SourceTensor] = {}
    for fp in _checkpoint_files(Path(hf_dir)):
        for name, t in read_safetensors_header(fp).items():
            if name in out:
                raise Error(f"tensor {name!r} appears in both {out[name].path.name} and {fp.name}")
            out[name] = t
    return out


class Mapper:
    """Memory-maps checkpoint files on demand; close() unmaps them all."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap[Any, np.dtype[np.uint8]]] = {}

    def array(self, t: SourceTensor) -> np.ndarray[Any, Any]:
        """The tensor's stored values in numpy order (BF16 as raw uint16 bits), without copying."""
        mm = self._maps.get(t.path)
        if mm is None:
            mm = np.memmap(t.path, dtype=np.uint8, mode="r")
            self._maps[t.path] = mm
        return mm[t.offset:t.offset + t.nbytes].view(ST_DTYPES[t.dtype]).reshape(t.shape)

    def close(self) -> None:
        for mm in self._maps.values():
            mmap_obj = getattr(mm, "_mmap", None)
            if mmap_obj is not None:
                try:
                    mmap_obj.close()
                except (BufferError, ValueError):
                    pass  # a view is still alive; the GC will release it
        self._maps.clear()


def to_f32(a: np.ndarray[Any, Any], st_dtype: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A safetensors array (BF16 given as raw uint16 bits) as float32."""
    return gguf_file.bf16_bits_to_f32(a) if st_dtype == "BF16" else a.astype(np.float32)
