"""Importance-matrix (imatrix) files: llama.cpp's GGUF layout and its legacy `.dat` layout.

An imatrix holds, for every weight matrix that was observed, the sum of squared input activations per input
column (and per expert for 3-D expert tensors) together with the number of activation rows (tokens) that went
into each sum. The quantizer uses the per-column mean (sum / count) as importance weights.

In memory everything is *raw*: `Entry(sums [n_mat, ne0] float64, counts [n_mat] int64)` where `n_mat` is 1 for
a dense 2-D weight and the expert count for `*_exps` tensors, so that merging is plain addition.

    data = imatrix_file.load("model.imatrix.gguf")          # or a legacy .dat
    w = data.weights("blk.0.ffn_down_exps.weight")           # float32 [n_mat, ne0]: per-expert means
    imatrix_file.save("out.gguf", {"blk.0.attn_q.weight": (sums, counts)}, datasets=["calib.txt"],
                      chunk_count=100, chunk_size=512)       # format from the suffix, or format="dat"
    merged = imatrix_file.merge("a.gguf", "b.dat")

GGUF layout (what llama-imatrix writes and llama-quantize reads): key `general.type`="imatrix", string
array `imatrix.datasets`, u32 `imatrix.chunk_count` and `imatrix.chunk_size`; per entry, sorted by name, an
F32 tensor `<name>.in_sum2` of ggml shape [ne0, n_mat] (raw sums) and an F32 tensor `<name>.counts` of shape
[1, n_mat].

Legacy `.dat` layout (native little-endian): int32 entry count; per entry int32 name length, name bytes,
int32 ncall, int32 nval, nval float32 values = mean * ncall (an expert without data stores 1 * ncall);
optionally a trailer int32 chunk count, int32 length, dataset name. It stores means rather than sums and one
count per entry, so raw sums are rebuilt as `value * chunk_size` and counts as `ncall * chunk_size`, and the
expert split of a flat entry is only known once it meets a tensor shape (see `ImatrixData.entry`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import binding as B
from . import gguf_file, outputs
from .errors import Error, GGUFError

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
LEGACY_CHUNK_SIZE = 512  # llama-imatrix's default n_ctx: the unit legacy ncall values are counted in


class Entry(NamedTuple):
    """Raw statistics of one weight: `sums[e, j]` = sum of x_j^2 over the `counts[e]` rows matrix e saw."""

    sums: np.ndarray  # float64 [n_mat, ne0]
    counts: np.ndarray  # int64 [n_mat]

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def ne0(self) -> int:
        return int(self.sums.shape[1])

    @property
    def coverage(self) -> float:
        """Fraction of matrices (experts) that received any data."""
        return float(np.count_nonzero(self.counts > 0)) / max(1, self.n_mat)

    def weights(self) -> np.ndarray:
        """float32 [n_mat, ne0] per-column mean of squared activations; all ones for a matrix with count 0
        (uniform weights, as llama-quantize does for experts no calibration token was routed to)."""
        out = np.ones(self.sums.shape, dtype=np.float64)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None]
        return out.astype(np.float32)

    def reshaped(self, n_mat: int) -> Entry:
        """The same statistics split into `n_mat` matrices (a flat legacy entry meeting an expert tensor)."""
        if n_mat == self.n_mat:
            return self
        if self.n_mat != 1 or self.ne0 % n_mat:
            raise Error(f"cannot split an imatrix entry of shape [{self.n_mat}, {self.ne0}] into {n_mat} "
                        "matrices")
        return Entry(self.sums.reshape(n_mat, self.ne0 // n_mat), np.repeat(self.counts, n_mat))


def make_entry(sums: Any, counts: Any) -> Entry:
    """An Entry from user input: sums [n_mat, ne0] (or [ne0] for one matrix), counts [n_mat] or a scalar."""
    s = np.asarray(sums, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] == 0:
        raise Error(f"imatrix sums must be [n_mat, ne0], got shape {list(s.shape)}")
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 1 and s.shape[0] > 1:
        c = np.repeat(c, s.shape[0])  # one count for all matrices, as old files had
    if c.size != s.shape[0]:
        raise Error(f"imatrix counts have {c.size} entries for {s.shape[0]} matrices")
    if not (np.isfinite(s).all() and np.isfinite(c).all()) or (c < 0).any() or (s < 0).any():
        raise Error("imatrix sums and counts must be finite and non-negative")
    return Entry(np.ascontiguousarray(s), np.rint(c).astype(np.int64))


@dataclasses.dataclass
class ImatrixData:
    """A loaded (or collected) importance matrix.

    entries: {weight name: Entry(sums, counts)}; datasets: calibration sources, oldest first; chunk_count:
    chunks of `chunk_size` tokens processed; path/format: where it came from (None for in-memory data).
    """

    entries: dict[str, Entry]
    datasets: list[str] = dataclasses.field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = LEGACY_CHUNK_SIZE
    path: pathlib.Path | None = None
    format: str | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def entry(self, name: str, ne0: int | None = None, n_mat: int | None = None) -> Entry | None:
        """The entry of `name` (None if absent), split into `n_mat` matrices of `ne0` columns when given.

        Raises Error when the stored size does not fit [n_mat, ne0] (an imatrix of another model)."""
        e = self.entries.get(name)
        if e is None or ne0 is None:
            return e
        n_mat = n_mat or 1
        if e.n_mat * e.ne0 != n_mat * ne0:
            raise Error(f"imatrix entry {name} has {e.n_mat}x{e.ne0} values, the tensor needs {n_mat}x{ne0} "
                        "(was the imatrix made for another model?)")
        return e.reshaped(n_mat) if e.n_mat == 1 else e

    def weights(self, name: str, ne0: int | None = None, n_mat: int | None = None) -> np.ndarray | None:
        """float32 [n_mat, ne0] importance weights of `name` (per-expert means, ones without data) or None."""
        e = self.entry(name, ne0, n_mat)
        return None if e is None else e.weights()

    def save(self, path: str | os.PathLike, *, format: str | None = None) -> pathlib.Path:
        """Write to `path` (GGUF unless the suffix is .dat or format="dat")."""
        return save(path, self.entries, datasets=self.datasets, chunk_count=self.chunk_count,
                    chunk_size=self.chunk_size, format=format)


# ---- loading ------------------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> ImatrixData:
    """Read an imatrix file in llama.cpp's GGUF layout or the legacy .dat layout (told apart by the magic)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such imatrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    return _load_gguf(p) if magic == b"GGUF" else _load_dat(p)


def _load_gguf(p: pathlib.Path) -> ImatrixData:
    gf = gguf_file.read(p)
    md = gf.metadata
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in md]
    sums = {n[: -len(SUM_SUFFIX)]: t for n, t in gf.tensors.items() if n.endswith(SUM_SUFFIX)}
    counts = {n[: -len(COUNT_SUFFIX)]: t for n, t in gf.tensors.items() if n.endswith(COUNT_SUFFIX)}
    if not sums and not counts:
        raise GGUFError(f"{p}: not an imatrix file (no '*{SUM_SUFFIX}' tensors; general.type="
                        f"{md.get(KEY_TYPE)!r})")
    if missing:
        # llama-quantize refuses such files too ("missing imatrix metadata")
        raise GGUFError(f"{p}: imatrix file without metadata key(s) {', '.join(missing)}")
    entries: dict[str, Entry] = {}
    for name in sorted(set(sums) | set(counts)):
        ts, tc = sums.get(name), counts.get(name)
        if ts is None or tc is None:
            raise GGUFError(f"{p}: imatrix entry {name} has {'no sums' if ts is None else 'no counts'}")
        for t in (ts, tc):
            if t.type != B.F32:
                raise GGUFError(f"{p}: {t.name} is {t.type_name}, imatrix tensors must be f32")
        ne0 = ts.shape[0]
        n_mat = int(np.prod(ts.shape[1:], dtype=np.int64))
        if int(np.prod(tc.shape, dtype=np.int64)) != n_mat:
            raise GGUFError(f"{p}: {name}: {n_mat} matrices of sums but counts of shape {list(tc.shape)}")
        s = np.fromfile(p, dtype="<f4", count=ne0 * n_mat, offset=ts.offset).reshape(n_mat, ne0)
        c = np.fromfile(p, dtype="<f4", count=n_mat, offset=tc.offset)
        if not (np.isfinite(s).all() and np.isfinite(c).all()):
            raise GGUFError(f"{p}: imatrix entry {name} holds non-finite values")
        entries[name] = Entry(s.astype(np.float64), np.rint(c).astype(np.int64))
    ds = md[KEY_DATASETS]
    datasets = [str(d) for d in ds] if isinstance(ds, list) else [str(ds)]
    return ImatrixData(entries, datasets, int(md[KEY_CHUNK_COUNT]), int(md[KEY_CHUNK_SIZE]), p, "gguf")


def _load_dat(p: pathlib.Path) -> ImatrixData:
    raw = p.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise GGUFError(f"{p}: truncated legacy imatrix file (reading {what} at byte {pos})")
        out = raw[pos: pos + n]
        pos += n
        return out

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > len(raw) // 16:
        raise GGUFError(f"{p}: not an imatrix file (neither GGUF nor legacy .dat: entry count {n_entries})")
    cs = LEGACY_CHUNK_SIZE
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        n = i32(f"entry {i} name length")
        if n <= 0 or n > 4096:
            raise GGUFError(f"{p}: bad name length {n} in entry {i} (not a legacy imatrix file?)")
        name = take(n, f"entry {i} name").decode("utf-8", "replace")
        ncall, nval = i32(f"{name} ncall"), i32(f"{name} nval")
        if nval < 1:
            raise GGUFError(f"{p}: entry {name} has {nval} values")
        v = np.frombuffer(take(4 * nval, f"{name} values"), dtype="<f4").astype(np.float64)
        if not np.isfinite(v).all():
            raise GGUFError(f"{p}: imatrix entry {name} holds non-finite values")
        if ncall > 0:
            # values are mean * ncall: rebuild raw sums and token counts in units of chunk_size tokens
            entries[name] = Entry((v * cs)[None, :], np.array([ncall * cs], dtype=np.int64))
        else:
            entries[name] = Entry(v[None, :], np.array([1], dtype=np.int64))  # llama uses such values as-is
    datasets: list[str] = []
    chunk_count = 0
    if pos < len(raw):
        chunk_count = i32("the chunk count")
        n = i32("the dataset name length")
        if n < 0:
            raise GGUFError(f"{p}: bad dataset name length {n}")
        name = take(n, "the dataset name").decode("utf-8", "replace")
        datasets = [name] if name else []
    return ImatrixData(entries, datasets, max(0, chunk_count), cs, p, "dat")


# ---- saving -------------------------------------------------------------------------------------------

def _format_for(path: pathlib.Path, format: str | None) -> str:
    fmt = (format or ("dat" if path.suffix.lower() == ".dat" else "gguf")).lower()
    if fmt not in ("gguf", "dat"):
        raise Error(f"unknown imatrix format {format!r}: use 'gguf' or 'dat'")
    return fmt


def save(path: str | os.PathLike, entries: Mapping[str, Entry | tuple[Any, Any]],
         datasets: Iterable[str] = (), chunk_count: int = 0, chunk_size: int = LEGACY_CHUNK_SIZE, *,
         format: str | None = None) -> pathlib.Path:
    """Write an imatrix file; returns its path.

    entries: {weight name: (sums, counts)} with raw sums of squared activations, shape [n_mat, ne0] ([ne0] for
    a dense weight), and the number of rows (tokens) behind each matrix's sums, shape [n_mat]. datasets: the
    calibration sources (file names or descriptions), chunk_count: chunks processed, chunk_size: tokens per
    chunk. format: "gguf" (llama.cpp's current layout, the default) or "dat" (legacy: stores means, drops
    entries without any data); by default ".dat" files get the legacy layout. The file appears only when
    complete (temporary name + rename).
    """
    p = pathlib.Path(path)
    fmt = _format_for(p, format)
    ents = {str(k): (v if isinstance(v, Entry) else make_entry(*v)) for k, v in entries.items()}
    ds = [str(d) for d in datasets]
    if chunk_count < 0 or chunk_size < 0 or chunk_count >= 2**31 or chunk_size >= 2**31:
        raise Error(f"chunk_count ({chunk_count}) and chunk_size ({chunk_size}) must be non-negative int32s")
    if fmt == "gguf":
        _save_gguf(p, ents, ds, int(chunk_count), int(chunk_size))
    else:
        _save_dat(p, ents, ds, int(chunk_count), int(chunk_size))
    return p


def _save_gguf(p: pathlib.Path, entries: dict[str, Entry], datasets: list[str], chunk_count: int,
               chunk_size: int) -> None:
    w = gguf_file.Writer(p)
    w.set(KEY_TYPE, "imatrix")
    if datasets:
        w.set(KEY_DATASETS, datasets)
    else:
        # an empty list must still be a *string* array: the reader looks the key up with gguf_get_arr_str
        B.lib.gguf_set_arr_str(w.ctx, KEY_DATASETS.encode(), B.ffi.new("const char *[]", 1), 0)
    w.set(KEY_CHUNK_COUNT, chunk_count)
    w.set(KEY_CHUNK_SIZE, chunk_size)
    data: dict[str, np.ndarray] = {}
    for name in sorted(entries):
        e = entries[name]
        w.add_tensor(name + SUM_SUFFIX, (e.ne0, e.n_mat), B.F32)
        w.add_tensor(name + COUNT_SUFFIX, (1, e.n_mat), B.F32)
        data[name + SUM_SUFFIX] = np.ascontiguousarray(e.sums, dtype="<f4")
        data[name + COUNT_SUFFIX] = np.ascontiguousarray(e.counts, dtype="<f4")
    w.write(lambda n: data[n])


def _save_dat(p: pathlib.Path, entries: dict[str, Entry], datasets: list[str], chunk_count: int,
              chunk_size: int) -> None:
    if chunk_size < 1:
        raise Error("the legacy .dat format needs chunk_size >= 1 (it counts calls in chunks)")
    parts: list[bytes] = []
    n = 0
    for name in sorted(entries):
        e = entries[name]
        if not (e.counts > 0).any():
            continue  # llama-imatrix drops entries without any data from legacy files
        ncall = max(1, math.ceil(int(e.counts.max()) / chunk_size))
        vals = (e.weights().astype(np.float64) * ncall).astype("<f4")  # count-0 experts: 1 * ncall
        nb = name.encode()
        parts += [struct.pack("<i", len(nb)), nb, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
        n += 1
    dataset = (datasets[-1] if datasets else "").encode()  # the format holds one name: the latest source
    parts += [struct.pack("<ii", chunk_count, len(dataset)), dataset]
    with outputs.atomic(p) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", n))
        for b in parts:
            f.write(b)


# ---- merging ------------------------------------------------------------------------------------------

def _add(name: str, a: Entry, b: Entry) -> Entry:
    if a.sums.shape != b.sums.shape:
        # a flat legacy entry can meet a per-expert one: split it the same way when the sizes agree
        if a.n_mat == 1 and a.sums.size == b.sums.size:
            a = a.reshaped(b.n_mat)
        elif b.n_mat == 1 and a.sums.size == b.sums.size:
            b = b.reshaped(a.n_mat)
        else:
            raise Error(f"cannot merge imatrix entry {name}: shapes [{a.n_mat}, {a.ne0}] and "
                        f"[{b.n_mat}, {b.ne0}]")
    return Entry(a.sums + b.sums, a.counts + b.counts)


def merge(*sources: ImatrixData | str | os.PathLike) -> ImatrixData:
    """Combine imatrix data (objects or file paths): raw sums and counts of the same weight are added, chunk
    counts summed, dataset lists concatenated; chunk_size is the first source's."""
    if not sources:
        raise Error("merge needs at least one imatrix")
    items = [s if isinstance(s, ImatrixData) else load(s) for s in sources]
    entries: dict[str, Entry] = {}
    for it in items:
        for name, e in it.entries.items():
            entries[name] = _add(name, entries[name], e) if name in entries else e
    datasets = [d for it in items for d in it.datasets]
    return ImatrixData(dict(sorted(entries.items())), datasets, sum(it.chunk_count for it in items),
                       items[0].chunk_size)
