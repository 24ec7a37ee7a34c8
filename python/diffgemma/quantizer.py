"""Quantize `diffusion-gemma` GGUF files with ggml's own quantizers: recipes, imatrix, streaming, parallel.

    report = diffgemma.quantize("model-q8_0.gguf", "model-asym.gguf", recipe="asym-2bitexp",
                                imatrix="model.imatrix.gguf")
    print(report.summary())

A recipe is one of llama-quantize's file types (Q4_K_M, IQ2_S, ...: `ftypes` reproduces llama.cpp's choice
for every tensor), `asym-2bitexp` (Q5_K_S with the published quant's overrides), or an ordered list of
(regex, type) rules (`quant_recipes`); `quant_plan` decides each tensor's output type from it.

This module is the entry point and the work: the source is read through a memory map one chunk of whole rows at
a time, converted to f32 (ggml's `to_float` for quantized sources), quantized by a thread pool calling
`ggml_quantize_chunk` (the GIL is released in C), validated with `ggml_validate_row_data` and streamed to a
temporary file that is renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION
from gguf import LlamaFileType as FT

from . import binding as B
from . import gguf_file, outputs
from . import imatrix_file as imx
from . import quant_plan as plan
from .binding import type_name as _tn
from .errors import Error
from .model import resolve
from .quant_recipes import RECIPES, TYPE_NAMES, Recipe, Spec, find_recipe, make_spec, recipes, type_id
from .quant_recipes import TYPE_IDS as _TYPE_ID  # noqa: F401  (tests check it against TYPE_NAMES)

__all__ = ["QuantizeReport", "quantize", "recipes", "find_recipe", "type_id", "Recipe", "RECIPES", "TYPE_NAMES",
           "RECIPE_KEY"]

_lib, _ffi = B.lib, B.ffi

# Keys an earlier imatrix-quantization may have left in the source; stale once we requantize without one.
_IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                 "quantize.imatrix.chunks_count")
RECIPE_KEY = "diffgemma.quantize.recipe"

CHUNK_ELEMENTS = 1 << 20  # per work item: large enough to hide Python overhead, small enough to bound memory
COPY_PIECE = 64 << 20  # bytes per piece when a tensor is copied unchanged


# ---- report ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class QuantizeReport:
    """What quantize() did (or, for a dry run, would do).

    census: {ggml type name: tensor count}, most frequent first; tensors: (name, ggml shape, source type,
    output type) in file order; size_bytes: output file size (predicted exactly for a dry run); fallbacks:
    (name, wanted type, used type, why); no_imatrix: tensors quantized to a type that uses importance weights
    but without importance data; imatrix_partial: {name: fraction of experts with data} where below 1;
    src_bytes / seconds: tensor data read and the time spent converting and writing it (after planning and
    the one-off ggml table initialisation).
    """

    src: pathlib.Path
    dst: pathlib.Path
    recipe: str
    census: dict[str, int]
    tensors: list[tuple[str, tuple[int, ...], str, str]]
    size_bytes: int
    fallbacks: list[tuple[str, str, str, str]]
    no_imatrix: list[str]
    imatrix_partial: dict[str, float]
    warnings: list[str]
    ftype: int
    dry_run: bool
    imatrix: str | None = None
    src_bytes: int = 0
    seconds: float = 0.0

    @property
    def census_str(self) -> str:
        """The census in the published form, e.g. 'f32:423, q5_K:175, ...'."""
        return gguf_file.census([t[3] for t in self.tensors])

    @property
    def mb_per_s(self) -> float:
        return self.src_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def bits_per_weight(self) -> float:
        """As llama.cpp and `diffgemma info` count it (gguf_file.bits_per_weight: tensor data only)."""
        return gguf_file.bits_per_weight((s, type_id(d)) for _, s, _, d in self.tensors)

    def __repr__(self) -> str:  # the full per-tensor list is behind table()
        return (f"QuantizeReport({'dry run: ' if self.dry_run else ''}{self.dst}, census {self.census_str}, "
                f"{_size(self.size_bytes)} ({self.bits_per_weight:.3f} bits per weight), "
                f"{len(self.fallbacks)} fallback(s), {len(self.no_imatrix)} without imatrix)")

    def table(self) -> str:
        """Every tensor: name, ggml shape, source type -> output type (and why, for a shape fallback)."""
        why = {name: f"  fallback {a}->{b}: {reason}" for name, a, b, reason in self.fallbacks}
        w = max((len(t[0]) for t in self.tensors), default=0)
        return "\n".join(f"{name:{w}s}  {'x'.join(map(str, shape)):>16s}  {st:>7s} -> {dt:7s}{why.get(name, '')}"
                         for name, shape, st, dt in self.tensors)

    def summary(self) -> str:
        try:
            ftype = FT(self.ftype).name
        except ValueError:
            ftype = str(self.ftype)
        head = "dry run: would write" if self.dry_run else "wrote"
        lines = [f"{head} {self.dst} from {self.src}",
                 f"  recipe {self.recipe}; file type {ftype}; imatrix {self.imatrix or 'none'}",
                 f"  {len(self.tensors)} tensors, {_size(self.size_bytes)} ({self.bits_per_weight:.3f} bits per "
                 "weight)",
                 f"  census: {self.census_str}"]
        if not self.dry_run and self.seconds > 0:
            lines.append(f"  {_size(self.src_bytes)} read in {self.seconds:.1f} s "
                         f"({self.mb_per_s:.0f} MB/s)")
        if self.fallbacks:
            kinds: dict[tuple[str, str], int] = {}
            for _, a, b, _ in self.fallbacks:
                kinds[a, b] = kinds.get((a, b), 0) + 1
            lines.append(f"  {len(self.fallbacks)} shape fallback(s): "
                         + ", ".join(f"{a}->{b} x{n}" for (a, b), n in kinds.items()))
        if self.no_imatrix:
            more = f" (+{len(self.no_imatrix) - 4} more)" if len(self.no_imatrix) > 4 else ""
            lines.append(f"  {len(self.no_imatrix)} tensor(s) quantized without importance data: "
                         + ", ".join(self.no_imatrix[:4]) + more)
        if self.imatrix_partial:
            worst = min(self.imatrix_partial.items(), key=lambda kv: kv[1])
            lines.append(f"  {len(self.imatrix_partial)} tensor(s) with partial expert coverage "
                         f"(lowest {worst[1]:.0%}: {worst[0]}); uncovered experts got uniform weights")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---- work -----------------------------------------------------------------------------------------------

def _to_f32(t: int, raw: np.ndarray, n: int) -> np.ndarray:
    """`n` f32 values from the raw bytes of whole rows of type `t`."""
    if t == B.F32:
        return raw.view(np.float32)  # zero-copy view of the memory map
    if t == B.F16:
        return raw.view(np.float16).astype(np.float32)
    if t == B.BF16:
        return gguf_file.bf16_bits_to_f32(raw.view(np.uint16))
    out = np.empty(n, dtype=np.float32)
    _lib.ggml_get_type_traits(t).to_float(_ffi.from_buffer(raw), _ffi.from_buffer("float[]", out), n)
    return out


def _encode_chunk(mm: np.ndarray, p: plan.Plan, r0: int, r1: int, imat_row: np.ndarray | None) -> np.ndarray:
    """Rows [r0, r1) of one tensor (all in one expert) converted to the target type and validated."""
    ne0, n = p.ne0, r1 - r0
    srb = p.info.nbytes // p.n_rows
    raw = mm[p.info.offset + r0 * srb: p.info.offset + r1 * srb]
    x = _to_f32(p.info.type, raw, n * ne0)
    if p.quantized and not np.isfinite(x).all():
        # quantizers would turn NaN/Inf into valid-looking garbage (only block scales get validated)
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise Error(f"{p.info.name}: non-finite value in row {r0 + bad // ne0}, column {bad % ne0} of the source")
    out = np.empty(n * _lib.ggml_row_size(p.dst, ne0), dtype=np.uint8)
    im = _ffi.NULL if imat_row is None else _ffi.from_buffer("float[]", imat_row)
    xp = _ffi.from_buffer("float[]", x)
    got = _lib.ggml_quantize_chunk(p.dst, xp, _ffi.from_buffer(out), 0, n, ne0, im)
    if got != out.nbytes:
        raise Error(f"{p.info.name}: ggml_quantize_chunk wrote {got} bytes for rows {r0}..{r1}, "
                    f"expected {out.nbytes}")
    if not _lib.ggml_validate_row_data(p.dst, _ffi.from_buffer(out), out.nbytes):
        why = B.take_errors() or "invalid values"
        raise Error(f"{p.info.name}: the {_tn(p.dst)} data of rows {r0}..{r1} failed ggml's validation "
                    f"({why}); does the source hold NaN or Inf?")
    return out


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class _Pipeline:
    """Work items of all tensors in file order, at most `window` in flight; the writer pulls one tensor's
    results in order, so threads keep working across tensor boundaries while memory stays bounded."""

    def __init__(self, plans: list[plan.Plan], mm: np.ndarray, pool: ThreadPoolExecutor, window: int,
                 bar: Any) -> None:
        self._mm, self._pool, self._window, self._bar = mm, pool, window, bar
        self._jobs = self._iter_jobs(plans)
        self._pending: deque[tuple[str, Future, int]] = deque()

    def _iter_jobs(self, plans: list[plan.Plan]) -> Iterator[tuple[str, Any, int]]:
        for p in plans:
            off, nbytes, name = p.info.offset, p.info.nbytes, p.name
            if p.copy:
                for a in range(0, nbytes, COPY_PIECE):
                    b = min(nbytes, a + COPY_PIECE)
                    yield name, _done(self._mm[off + a: off + b]), b - a
                continue
            srb = nbytes // p.n_rows
            step = max(1, CHUNK_ELEMENTS // p.ne0)
            for e in range(p.n_mat):  # chunks never cross an expert: each gets its own imatrix slice
                base = e * p.rows_per_mat
                imat_row = None if p.imat is None else p.imat[e]
                for a in range(0, p.rows_per_mat, step):
                    r0, r1 = base + a, base + min(a + step, p.rows_per_mat)
                    yield name, (p, r0, r1, imat_row), (r1 - r0) * srb

    def _fill(self) -> None:
        while len(self._pending) < self._window:
            job = next(self._jobs, None)
            if job is None:
                return
            name, work, n = job
            fut = work if isinstance(work, Future) else self._pool.submit(_encode_chunk, self._mm, *work)
            self._pending.append((name, fut, n))

    def pieces(self, name: str) -> Iterator[np.ndarray]:
        while True:
            self._fill()
            if not self._pending or self._pending[0][0] != name:
                return
            _, fut, n = self._pending.popleft()
            yield fut.result()
            self._bar.update(n)

    def close(self) -> None:
        for _, fut, _ in self._pending:
            fut.cancel()
        self._pending.clear()


# ---- arguments and output -------------------------------------------------------------------------------

def _load_imatrix(imatrix: Any) -> tuple[imx.ImatrixData | None, str | None]:
    if imatrix is None:
        return None, None
    if isinstance(imatrix, imx.ImatrixData):
        return imatrix, str(imatrix.path) if imatrix.path else "<in memory>"
    data = imx.load(imatrix)
    return data, str(imatrix)


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _check_arguments(src: Any, dst: Any, imatrix: Any, threads: Any) -> tuple[pathlib.Path, pathlib.Path]:
    """The source and output paths; arguments of the wrong kind are Errors before any file is read."""
    if not isinstance(dst, str | os.PathLike) or not str(dst):
        raise Error(f"dst must be an output file path, got {dst!r}")
    if imatrix is not None and not isinstance(imatrix, str | os.PathLike | imx.ImatrixData):
        raise Error(f"imatrix must be an imatrix file path or ImatrixData, got {imatrix!r}")
    src_p, dst_p = resolve(src), pathlib.Path(dst)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise Error(f"threads must be a positive int, got {threads!r}")
    return src_p, dst_p


def _check_output(src_p: pathlib.Path, dst_p: pathlib.Path, overwrite: bool) -> None:
    """dst must be a file name in an existing directory, not the source, and new unless overwrite."""
    if not dst_p.parent.is_dir():
        raise Error(f"{dst_p.parent}: no such directory for the output")
    if dst_p.is_dir():
        raise Error(f"{dst_p}: is a directory, not an output file name")
    if dst_p.exists() and dst_p.resolve() == src_p.resolve():
        raise Error(f"{dst_p}: the output would replace the source it is read from")
    outputs.check_new(dst_p, overwrite)


def _writer(src_p: pathlib.Path, dst_p: pathlib.Path, plans: list[plan.Plan], spec: Spec, ftype: int,
            extra_md: dict[str, Any], imat: imx.ImatrixData | None, imat_name: str | None) -> gguf_file.Writer:
    """The output's header: the source's metadata with llama-quantize's keys and ours, then every tensor."""
    w = gguf_file.Writer(dst_p, copy_kv_from=src_p)
    for k in ("split.no", "split.count", "split.tensors.count", *_IMATRIX_KEYS):
        _lib.gguf_remove_key(w.ctx, k.encode())
    w.set("general.quantization_version", GGML_QUANT_VERSION)
    w.set("general.file_type", ftype)
    w.set(RECIPE_KEY, json.dumps(spec.desc))
    for k, v in extra_md.items():  # pruned layer arrays, then --override-kv (after file_type, as llama-quantize)
        w.set(k, v)
    if imat is not None:
        w.set("quantize.imatrix.file", (imat_name or "")[:127])  # llama-quantize keeps at most 127 chars
        if imat.datasets:
            w.set("quantize.imatrix.dataset", imat.datasets[0][:127])
        w.set("quantize.imatrix.entries_count", len(imat.entries))
        if imat.chunk_count > 0:
            w.set("quantize.imatrix.chunks_count", imat.chunk_count)
    for p in plans:
        w.add_tensor(p.name, p.info.shape, p.dst)
    return w


def _write(w: gguf_file.Writer, plans: list[plan.Plan], src_p: pathlib.Path, dst_p: pathlib.Path, n_threads: int,
           progress: bool) -> tuple[int, float]:
    """Quantize every tensor on n_threads workers, streamed into the file; its size and the seconds it took."""
    for t in sorted({p.dst for p in plans if not p.copy and _lib.ggml_is_quantized(p.dst)}):
        _lib.ggml_quantize_init(t)  # IQ grids take seconds under a global lock: build them before the workers
    from tqdm.auto import tqdm

    mm = np.memmap(src_p, dtype=np.uint8, mode="r")
    bar = tqdm(total=sum(p.info.nbytes for p in plans), unit="B", unit_scale=True, desc="quantize",
               disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(n_threads, thread_name_prefix="diffgemma-quantize")
    pipe = _Pipeline(plans, mm, pool, 2 * n_threads + 2, bar)
    t_work = time.perf_counter()
    try:
        size = w.write(pipe.pieces)
    except OSError as e:  # disk full, permissions: the partial file is already gone
        raise Error(f"{dst_p}: cannot write the output: {e}") from e
    finally:
        pipe.close()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        del mm
    return size, time.perf_counter() - t_work


# ---- entry point ----------------------------------------------------------------------------------------

def quantize(src: str | os.PathLike, dst: str | os.PathLike, *, recipe: str | Sequence[Any] | None = None,
             type: str | None = None, imatrix: str | os.PathLike | imx.ImatrixData | None = None,
             overrides: Sequence[Any] | Mapping[str, str] | None = None, token_embedding_type: str | None = None,
             output_tensor_type: str | None = None, pure: bool = False, leave_output_tensor: bool = False,
             include_weights: Sequence[str] | None = None, exclude_weights: Sequence[str] | None = None,
             prune_layers: Sequence[int] | None = None, override_kv: Sequence[str] | Mapping[str, Any] | None = None,
             allow_requantize: bool = True, require_imatrix: bool = True, threads: int | None = None,
             dry_run: bool = False, progress: bool = True, overwrite: bool = False) -> QuantizeReport:
    r"""Quantize the `diffusion-gemma` GGUF `src` (a path, or "tiny" for the embedded model) into `dst`.

    recipe: a llama-quantize file type ('Q4_K_M', 'IQ2_S', ... case-insensitive: llama.cpp's per-tensor
    choices, see `recipes()`), 'asym-2bitexp', a type name, or a list of (regex, type) rules / "regex=type"
    strings (first match wins; a regex may use `<more_bits>` for the layers llama-quantize gives more bits,
    e.g. r"^blk\.<more_bits>\.attn_v"); type: one type for every quantizable tensor. With neither, tensors
    no override matches keep their source type.

    llama-quantize's flags, same meaning: overrides = --tensor-type PATTERN=TYPE (searched in the tensor name
    in order, before the recipe; with a file type a match skips its mixture rules, not the shape fallback);
    token_embedding_type = --token-embedding-type; output_tensor_type = --output-tensor-type (the head is
    token_embd, tied); pure = --pure (no mixture); leave_output_tensor = --leave-output-tensor (changes
    nothing: there is no separate output.weight); include_weights / exclude_weights = --include-weights /
    --exclude-weights (imatrix entries whose name contains one of the strings); prune_layers =
    --prune-layers (blocks removed and the rest renumbered); override_kv = --override-kv KEY=TYPE:VALUE
    strings or a {key: value} mapping.

    imatrix: a llama.cpp imatrix file (GGUF or legacy .dat) or ImatrixData; IQ1/IQ2/IQ3_XXS targets need
    one (a dry run only warns); require_imatrix=False quantizes the ones ggml can do without (IQ2_S, IQ3_XXS,
    ...: llama-quantize refuses them, ggml weights by x^2 instead) for experiments. allow_requantize=False
    refuses to convert an already quantized tensor to another type. threads: worker threads (default: all
    usable CPUs). dry_run: plan and predict the exact size without writing. progress: a tqdm bar (MB/s of
    source data) on a terminal. overwrite=True replaces an existing `dst` (else it is an Error). Raises
    diffgemma.Error on bad input; never leaves a partial file (Ctrl-C and SIGTERM included).
    """
    t_start = time.perf_counter()
    src_p, dst_p = _check_arguments(src, dst, imatrix, threads)
    gf = gguf_file.read(src_p)
    hp = gguf_file.validate(gf)
    spec, ovr, tok, out_t = make_spec(recipe, type, overrides, token_embedding_type, output_tensor_type, pure,
                                      hp.n_layer)
    if not dry_run:
        _check_output(src_p, dst_p, overwrite)
    imat, imat_name = _load_imatrix(imatrix)
    imat = plan.filter_imatrix(imat, include_weights, exclude_weights)
    out_names, hp_out = plan.pruned_names(list(gf.tensors), hp, prune_layers)
    if prune_layers:
        spec.desc["prune_layers"] = sorted(set(prune_layers))
    extra_md = plan.output_metadata(gf, hp_out, bool(prune_layers), plan.kv_overrides(override_kv))

    plans = plan.choose(gf, hp, out_names, spec, ovr, tok, out_t, pure, has_imatrix=imat is not None)
    notes = plan.flag_notes(plans, spec, ovr, leave_output_tensor)
    plan.refuse_requantize(plans, allow_requantize)
    no_imatrix, partial = plan.attach_imatrix(plans, imat, spec.file_type, require_imatrix, dry_run, notes)
    ftype = spec.file_type.ftype if spec.file_type is not None else plan.ftype_for(plans)
    w = _writer(src_p, dst_p, plans, spec, ftype, extra_md, imat, imat_name)
    if dry_run:
        size, seconds = w.predicted_size(), time.perf_counter() - t_start
    else:
        size, seconds = _write(w, plans, src_p, dst_p, threads or _n_cpus(), progress)
    names = [_tn(p.dst) for p in plans]
    return QuantizeReport(
        src=src_p, dst=dst_p, recipe=json.dumps(spec.desc),
        census=dict(sorted({n: names.count(n) for n in set(names)}.items(), key=lambda kv: (-kv[1], kv[0]))),
        tensors=[(p.name, p.info.shape, p.info.type_name, _tn(p.dst)) for p in plans], size_bytes=size,
        fallbacks=[(p.name, _tn(p.wanted), _tn(p.dst), plan.shape_fallback(p.wanted, p.ne0)[1] or "")
                   for p in plans if p.wanted != p.dst],
        no_imatrix=no_imatrix, imatrix_partial=partial, warnings=notes, ftype=ftype, dry_run=dry_run,
        imatrix=imat_name, src_bytes=sum(p.info.nbytes for p in plans), seconds=seconds)

