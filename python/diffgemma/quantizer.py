"""Quantize `diffusion-gemma` GGUF files with ggml's own quantizers: recipes, imatrix, streaming, parallel.

    report = diffgemma.quantize.quantize("model-q8_0.gguf", "model-asym.gguf", recipe="asym-2bitexp",
                                         imatrix="model.imatrix.gguf")
    print(report.summary())

A recipe is an ordered list of (regex, type) rules: the first rule whose regex matches a tensor name
(`re.search`, i.e. anywhere in the name) decides its type; `overrides` are rules tried before the recipe's; a
tensor no rule matches keeps its source type. 1-D tensors (norms, scales, rope_freqs) and the MoE router are
never quantized: they are always written as F32. When a type's block does not divide a tensor's row length,
the type falls back as llama-quantize does (Q5_K->Q5_1, Q4_K->Q5_0, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0,
IQ*->IQ4_NL, then F16) and the report records it.

The source is read through a memory map one chunk of whole rows at a time, converted to f32 (ggml's
`to_float` for quantized sources), quantized by a thread pool calling `ggml_quantize_chunk` (the GIL is
released in C), validated with `ggml_validate_row_data` and streamed to a temporary file that is renamed when
complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from . import binding as B
from . import gguf_file, layout
from . import imatrix_file as imx
from .errors import Error

_lib, _ffi = B.lib, B.ffi

F32, F16, BF16 = 0, 1, 30

# Target types: every ggml type with a quantizer that the CPU backend can use as a weight.
TYPE_NAMES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K",
              "q6_K", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "iq1_s", "iq1_m")


def _type_ids() -> dict[str, int]:
    # ids from gguf's enum (ggml has no bounds check to enumerate types safely), confirmed against ggml's names
    out = {}
    for n in TYPE_NAMES:
        t = int(QT[n.upper()])
        if B.type_name(t) == n:
            out[n] = t
    return out


_TYPE_ID = _type_ids()
_TYPE_BY_LOWER = {n.lower(): t for n, t in _TYPE_ID.items()}

# llama-quantize's shape fallbacks when ne0 is not a multiple of the block (types with blocks <= 32 keep).
_FALLBACK = {**dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"),
                              "iq4_nl"),
             "q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}

# Types llama-quantize refuses to make without importance data (ggml itself aborts for iq2_xxs/iq2_xs/iq1_s).
_LLAMA_NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq1_s", "iq1_m"}
_IMATRIX_EXEMPT = {"token_embd.weight"}  # never observed by a matmul, so llama-quantize does not ask for it

# Keys an earlier imatrix-quantization may have left in the source; stale once we requantize without one.
_IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                 "quantize.imatrix.chunks_count")
RECIPE_KEY = "diffgemma.quantize.recipe"

CHUNK_ELEMENTS = 1 << 20  # per work item: large enough to hide Python overhead, small enough to bound memory
COPY_PIECE = 64 << 20  # bytes per piece when a tensor is copied unchanged

# In a recipe regex, this placeholder becomes the layers llama-quantize's "use_more_bits" rule gives extra
# bits: the first and last eighth of the layers and every third layer between them.
MORE_BITS = "<more_bits>"


def type_id(name: str | int) -> int:
    """The ggml type id of a target type name (case-insensitive, e.g. 'Q4_K', 'iq2_s'); Error if unknown."""
    if isinstance(name, int) and not isinstance(name, bool) and name in _TYPE_ID.values():
        return name
    key = str(name).strip().lower()
    if key in _TYPE_BY_LOWER:
        return _TYPE_BY_LOWER[key]
    if key in RECIPES:
        raise Error(f"{name!r} is a recipe, not a ggml type: pass recipe={key!r}")
    raise Error(f"unknown quantization type {name!r}; known types: {', '.join(TYPE_NAMES)}")


def _tn(t: int) -> str:
    return B.type_name(t)


def _more_bits_layers(n_layer: int) -> list[int]:
    e = n_layer // 8
    return [i for i in range(n_layer) if i < e or i >= 7 * n_layer // 8 or (i - e) % 3 == 2]


# ---- recipes --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named, ordered list of (regex, type) rules; `ftype` is the general.file_type to record (None: the
    llama file type of the type holding most weights)."""

    name: str
    description: str
    rules: tuple[tuple[str, str], ...]
    ftype: int | None = None


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(
        "asym-2bitexp",
        "Asymmetric 2-bit-expert mix (hyperspaceai's published recipe, ~10.98 GB for 26B-A4B): expert "
        "gate/up (ffn_gate_up_exps) IQ2_S, which needs an imatrix; expert down (ffn_down_exps) IQ4_NL; "
        "attention q/k/v/output and the dense ffn gate/up/down Q5_K (the 2112-column ffn_down falls back to "
        "Q5_1); token_embd (also the tied output head) Q6_K; self-conditioning MLP Q4_K (its down falls back "
        "to Q5_0); norms, scales, rope_freqs and the router F32.",
        (
            (r"ffn_gate_up_exps\.weight$", "iq2_s"),
            (r"ffn_(gate|up)_exps\.weight$", "iq2_s"),  # unfused layout
            (r"ffn_down_exps\.weight$", "iq4_nl"),
            (r"attn_(q|k|v|output)\.weight$", "q5_K"),
            (r"ffn_(gate|up|down)\.weight$", "q5_K"),
            (r"^token_embd\.weight$", "q6_K"),
            (r"^self_cond_(gate|up|down)\.weight$", "q4_K"),
        ),
    ),
    Recipe(
        "q4_k_m",
        "Q4_K_M-like mix after llama-quantize's Q4_K_M: Q4_K by default; token_embd (the tied output head) "
        "Q6_K; attn_v and ffn_down/ffn_down_exps Q6_K in the first and last eighth of the layers and every third "
        "layer between, Q4_K elsewhere. The 704- and 2112-column down projections cannot hold 256-blocks and "
        "fall back as llama-quantize does (Q6_K->Q8_0, Q4_K->Q5_0). No imatrix needed (used when given); "
        "norms, scales, rope_freqs and the router F32.",
        (
            (r"^token_embd\.weight$", "q6_K"),
            (rf"^blk\.{MORE_BITS}\.attn_v\.weight$", "q6_K"),
            (rf"^blk\.{MORE_BITS}\.ffn_down(_exps)?\.weight$", "q6_K"),
            (r".", "q4_K"),
        ),
        ftype=int(FT.MOSTLY_Q4_K_M),
    ),
]}


def recipes() -> dict[str, str]:
    """Named recipes and what they do. Any single type name (see TYPE_NAMES) is also accepted as `type=`."""
    return {name: r.description for name, r in RECIPES.items()}


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: str
    regex: re.Pattern
    type: int
    origin: str  # "recipe" or "override"


def _parse_rules(rules: Any, origin: str, n_layer: int) -> list[_Rule]:
    """(regex, type) pairs, "regex=type" strings or a {regex: type} mapping -> compiled rules."""
    if rules is None:
        return []
    if isinstance(rules, str | bytes):
        raise Error(f"{origin}: expected a list of (regex, type) rules, got the string {rules!r}")
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    alt = "(?:" + "|".join(str(i) for i in _more_bits_layers(n_layer)) + ")"
    out = []
    for it in items:
        if isinstance(it, str):
            if "=" not in it:
                raise Error(f"{origin}: rule {it!r} is not of the form 'regex=type'")
            pat, t = it.rsplit("=", 1)
        else:
            try:
                pat, t = it
            except (TypeError, ValueError):
                raise Error(f"{origin}: rule {it!r} is not a (regex, type) pair") from None
        if not isinstance(pat, str) or not pat:
            raise Error(f"{origin}: rule {it!r} needs a non-empty regex string")
        try:
            rx = re.compile(pat.replace(MORE_BITS, alt))
        except re.error as e:
            raise Error(f"{origin}: bad regex {pat!r}: {e}") from None
        out.append(_Rule(pat, rx, type_id(t), origin))
    return out


def _resolve_recipe(recipe: Any, type: Any, n_layer: int) -> tuple[list[_Rule], dict[str, Any], int | None]:
    """Rules, a JSON-able description and the recipe's own ftype (or None)."""
    if recipe is not None and type is not None:
        raise Error("give either recipe= or type=, not both")
    if type is not None:
        t = type_id(type)
        return [_Rule(".", re.compile("."), t, "type")], {"type": _tn(t)}, None
    if recipe is None:
        return [], {}, None
    if isinstance(recipe, str):
        key = recipe.strip().lower()
        if key in RECIPES:
            r = RECIPES[key]
            return _parse_rules(r.rules, "recipe", n_layer), {"recipe": r.name}, r.ftype
        if key in _TYPE_BY_LOWER:  # a bare type name works as a uniform recipe
            return _resolve_recipe(None, key, n_layer)
        raise Error(f"unknown recipe {recipe!r}; named recipes: {', '.join(RECIPES)} "
                    f"(or a list of (regex, type) rules, or type=one of {', '.join(TYPE_NAMES)})")
    rules = _parse_rules(recipe, "recipe", n_layer)
    return rules, {"rules": [[r.pattern, _tn(r.type)] for r in rules]}, None


# ---- planning --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    info: gguf_file.TensorInfo
    role: str
    wanted: int
    dst: int
    rule: str | None
    imat: np.ndarray | None = None  # float32 [n_mat, ne0] importance weights

    @property
    def ne0(self) -> int:
        return self.info.shape[0]

    @property
    def n_mat(self) -> int:  # experts of a 3-D tensor, else 1
        return self.info.shape[2] if len(self.info.shape) > 2 else 1

    @property
    def rows_per_mat(self) -> int:
        return self.info.shape[1] if len(self.info.shape) > 1 else 1

    @property
    def n_rows(self) -> int:
        return self.n_mat * self.rows_per_mat

    @property
    def copy(self) -> bool:
        return self.dst == self.info.type

    @property
    def quantized(self) -> bool:
        return bool(_lib.ggml_is_quantized(self.dst))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.info.shape, dtype=np.int64))


def _shape_fallback(t: int, ne0: int) -> tuple[int, str | None]:
    """The type usable for rows of `ne0` values, and why it differs from `t` (None if it does not)."""
    blk = _lib.ggml_blck_size(t)
    if ne0 % blk == 0:
        return t, None
    why = f"row length {ne0} is not a multiple of the {_tn(t)} block ({blk})"
    name = _tn(t)
    new = _TYPE_ID[_FALLBACK[name]] if name in _FALLBACK else t
    if ne0 % _lib.ggml_blck_size(new):
        new = F16
    return new, why


def _ftype_for(plans: list[_Plan]) -> int:
    """llama file type of the target type that holds the most matrix weights (e.g. mostly IQ2_S -> IQ2_S)."""
    weight: dict[int, int] = {}
    for p in plans:
        if p.role in (layout.MATRIX, layout.EMBED):
            weight[p.dst] = weight.get(p.dst, 0) + p.n_elements
    if not weight:
        return int(FT.ALL_F32)
    top = _tn(max(weight.items(), key=lambda kv: kv[1])[0])
    special = {"f32": "ALL_F32", "q3_K": "MOSTLY_Q3_K_S", "q4_K": "MOSTLY_Q4_K_S", "q5_K": "MOSTLY_Q5_K_S"}
    return int(FT[special.get(top, "MOSTLY_" + top.upper())])


def _imatrix_matters(t: int) -> bool:
    """Whether ggml's quantizer for `t` uses importance weights at all (q8_0 and float types ignore them)."""
    return bool(_lib.ggml_is_quantized(t)) and _tn(t) != "q8_0"


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

    def summary(self) -> str:
        try:
            ftype = FT(self.ftype).name
        except ValueError:
            ftype = str(self.ftype)
        n_el = sum(int(np.prod(s, dtype=np.int64)) for _, s, _, _ in self.tensors)
        bpw = 8 * self.size_bytes / n_el if n_el else 0.0
        head = "dry run: would write" if self.dry_run else "wrote"
        lines = [f"{head} {self.dst} from {self.src}",
                 f"  recipe {self.recipe}; file type {ftype}; imatrix {self.imatrix or 'none'}",
                 f"  {len(self.tensors)} tensors, {_size(self.size_bytes)} ({bpw:.3f} bits per weight)",
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
    if t == F32:
        return raw.view(np.float32)  # zero-copy view of the memory map
    if t == F16:
        return raw.view(np.float16).astype(np.float32)
    if t == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    out = np.empty(n, dtype=np.float32)
    _lib.ggml_get_type_traits(t).to_float(_ffi.from_buffer(raw), _ffi.from_buffer("float[]", out), n)
    return out


def _encode_chunk(mm: np.ndarray, p: _Plan, r0: int, r1: int, imat_row: np.ndarray | None) -> np.ndarray:
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

    def __init__(self, plans: list[_Plan], mm: np.ndarray, pool: ThreadPoolExecutor, window: int,
                 bar: Any) -> None:
        self._mm, self._pool, self._window, self._bar = mm, pool, window, bar
        self._jobs = self._iter_jobs(plans)
        self._pending: deque[tuple[str, Future, int]] = deque()

    def _iter_jobs(self, plans: list[_Plan]) -> Iterator[tuple[str, Any, int]]:
        for p in plans:
            off, nbytes, name = p.info.offset, p.info.nbytes, p.info.name
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


# ---- entry point ----------------------------------------------------------------------------------------

def quantize(src: str | os.PathLike, dst: str | os.PathLike, *, recipe: str | Sequence[Any] | None = None,
             type: str | None = None, imatrix: str | os.PathLike | imx.ImatrixData | None = None,
             overrides: Sequence[Any] | Mapping[str, str] | None = None, allow_requantize: bool = True,
             require_imatrix: bool = True, threads: int | None = None, dry_run: bool = False,
             progress: bool = True) -> QuantizeReport:
    r"""Quantize the `diffusion-gemma` GGUF `src` into `dst`.

    recipe: a named recipe (see `recipes()`), a type name, or a list of (regex, type) rules / "regex=type"
    strings (a regex may use `<more_bits>` for the layers llama-quantize gives more bits, e.g.
    r"^blk\.<more_bits>\.attn_v"); type: one type for every quantizable tensor; overrides: rules tried
    before the recipe's. With neither recipe nor type, tensors no override matches keep their source type.
    imatrix: a llama.cpp imatrix file (GGUF or legacy .dat) or ImatrixData; IQ1/IQ2/IQ3_XXS targets need
    one (a dry run only warns); require_imatrix=False quantizes the ones ggml can do without (IQ2_S, IQ3_XXS,
    ...: llama-quantize refuses them, ggml weights by x^2 instead) for experiments. allow_requantize=False
    refuses to convert an already quantized tensor to another type. threads: worker threads (default: all
    usable CPUs). dry_run: plan and predict the exact size without writing. progress: a tqdm bar (MB/s of
    source data) on a terminal. Raises diffgemma.Error on bad input; never leaves a partial file (Ctrl-C
    included).
    """
    t_start = time.perf_counter()
    src_p, dst_p = pathlib.Path(src), pathlib.Path(dst)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise Error(f"threads must be a positive int, got {threads!r}")
    gf = gguf_file.read(src_p)
    hp = gguf_file.validate(gf)
    rules, desc, recipe_ftype = _resolve_recipe(recipe, type, hp.n_layer)
    ovr = _parse_rules(overrides, "overrides", hp.n_layer)
    if not rules and not ovr:
        raise Error("nothing to do: give recipe=, type= or overrides=")
    if ovr:
        desc["overrides"] = [[r.pattern, _tn(r.type)] for r in ovr]
    if not dry_run:
        if not dst_p.parent.is_dir():
            raise Error(f"{dst_p.parent}: no such directory for the output")
        if dst_p.is_dir():
            raise Error(f"{dst_p}: is a directory, not an output file name")
        if dst_p.exists() and dst_p.resolve() == src_p.resolve():
            raise Error(f"{dst_p}: the output would replace the source it is read from")
    imat, imat_name = _load_imatrix(imatrix)

    fused = "blk.0.ffn_gate_exps.weight" not in gf.tensors
    roles = {s.name: s.role for s in layout.tensor_specs(hp, fused_gate_up=fused)}
    plans: list[_Plan] = []
    fallbacks: list[tuple[str, str, str, str]] = []
    for info in gf.tensors.values():
        role = roles[info.name]
        if role in (layout.VECTOR, layout.ROUTER):
            plans.append(_Plan(info, role, F32, F32, role))  # never quantized
            continue
        wanted, rule = info.type, None
        for r in ovr + rules:
            if r.regex.search(info.name):
                wanted, rule = r.type, f"{r.origin} {r.pattern}"
                break
        dst_t, why = _shape_fallback(wanted, info.shape[0])
        if why:
            fallbacks.append((info.name, _tn(wanted), _tn(dst_t), why))
        plans.append(_Plan(info, role, wanted, dst_t, rule))

    refused = [p for p in plans if not p.copy and _lib.ggml_is_quantized(p.info.type)
               and (not allow_requantize or _lib.ggml_get_type_traits(p.info.type).to_float == _ffi.NULL)]
    if refused:
        ex = ", ".join(f"{p.info.name} ({p.info.type_name}->{_tn(p.dst)})" for p in refused[:3])
        raise Error(f"{len(refused)} tensor(s) would be requantized from an already quantized type, e.g. "
                    f"{ex}; pass allow_requantize=True (quality suffers) or start from an f16/bf16/f32 file")

    notes: list[str] = []
    no_imatrix: list[str] = []
    partial: dict[str, float] = {}
    missing: list[_Plan] = []
    for p in plans:
        if p.copy or not _lib.ggml_is_quantized(p.dst):
            continue
        e = None
        if imat is not None:
            try:
                e = imat.entry(p.info.name, p.ne0, p.n_mat)
            except Error:
                if p.info.name not in _IMATRIX_EXEMPT:
                    raise
                notes.append(f"imatrix entry for {p.info.name} does not fit its shape: ignored")
        if e is not None:
            p.imat = np.ascontiguousarray(e.weights())
            if not np.isfinite(p.imat).all() or (p.imat < 0).any():  # llama-quantize rejects these too
                raise Error(f"imatrix entry {p.info.name} holds negative or non-finite values")
            if e.coverage < 1:
                partial[p.info.name] = e.coverage
        elif _imatrix_matters(p.dst):
            no_imatrix.append(p.info.name)
            needs = _lib.ggml_quantize_requires_imatrix(p.dst) or (
                require_imatrix and _tn(p.dst) in _LLAMA_NEEDS_IMATRIX and p.info.name not in _IMATRIX_EXEMPT)
            if needs:
                missing.append(p)
    if imat is not None and imat.entries and not any(p.imat is not None for p in plans):
        notes.append("the imatrix has no entry for any tensor quantized here (made for another model?)")
    if missing:
        types = sorted({_tn(p.dst) for p in missing})
        names = ", ".join(p.info.name for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        msg = (f"{len(missing)} tensor(s) need importance data for {'/'.join(types)} "
               f"({'the imatrix has no entry for' if imat is not None else 'no imatrix given for'} {names}): "
               "pass imatrix=, or give them another type with overrides, e.g. "
               "overrides=[(r'ffn_gate_up_exps', 'q2_K')]")
        if not dry_run:
            raise Error(msg)
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)

    ftype = recipe_ftype if recipe_ftype is not None else _ftype_for(plans)
    w = gguf_file.Writer(dst_p, copy_kv_from=src_p)
    for k in ("split.no", "split.count", "split.tensors.count", *_IMATRIX_KEYS):
        _lib.gguf_remove_key(w.ctx, k.encode())
    w.set("general.quantization_version", 2)
    w.set("general.file_type", ftype)
    w.set(RECIPE_KEY, json.dumps(desc))
    if imat is not None:
        w.set("quantize.imatrix.file", (imat_name or "")[:127])  # llama-quantize keeps at most 127 chars
        if imat.datasets:
            w.set("quantize.imatrix.dataset", imat.datasets[0][:127])
        w.set("quantize.imatrix.entries_count", len(imat.entries))
        if imat.chunk_count > 0:
            w.set("quantize.imatrix.chunks_count", imat.chunk_count)
    for p in plans:
        w.add_tensor(p.info.name, p.info.shape, p.dst)

    def report(size: int, seconds: float) -> QuantizeReport:
        names = [_tn(p.dst) for p in plans]
        census = dict(sorted({n: names.count(n) for n in set(names)}.items(), key=lambda kv: (-kv[1], kv[0])))
        return QuantizeReport(
            src=src_p, dst=dst_p, recipe=json.dumps(desc), census=census,
            tensors=[(p.info.name, p.info.shape, p.info.type_name, _tn(p.dst)) for p in plans],
            size_bytes=size, fallbacks=fallbacks, no_imatrix=no_imatrix, imatrix_partial=partial,
            warnings=notes, ftype=ftype, dry_run=dry_run, imatrix=imat_name,
            src_bytes=sum(p.info.nbytes for p in plans), seconds=seconds)

    if dry_run:
        return report(w.predicted_size(), time.perf_counter() - t_start)

    for t in sorted({p.dst for p in plans if not p.copy and _lib.ggml_is_quantized(p.dst)}):
        _lib.ggml_quantize_init(t)  # IQ grids take seconds under a global lock: build them before the workers
    n_threads = threads or _n_cpus()
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
    return report(size, time.perf_counter() - t_work)

