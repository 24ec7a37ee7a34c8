"""Quantize `diffusion-gemma` GGUF files with ggml's own quantizers: recipes, imatrix, streaming, parallel.

    report = diffgemma.quantize("model-q8_0.gguf", "model-asym.gguf", recipe="asym-2bitexp",
                                imatrix="model.imatrix.gguf")
    print(report.summary())

A recipe is one of llama-quantize's file types (Q4_K_M, IQ2_S, ...: `ftypes` reproduces llama.cpp's choice
for every tensor), `asym-2bitexp` (Q5_K_S with the published quant's overrides), or an ordered list of
(regex, type) rules: the first rule whose regex matches a tensor name (`re.search`) decides its type and a
tensor no rule matches keeps its source type. `overrides` (llama-quantize's --tensor-type) are tried before
either. Norms, scales, rope_freqs and the MoE router are never quantized (kept as stored, F32 in published
files). When a type's block does not divide a tensor's row length, the type falls back as llama-quantize
does (Q5_K->Q5_1, Q4_K->Q5_0, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, IQ*->IQ4_NL, then F16) and the report records it.

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
from gguf import GGML_QUANT_VERSION
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from . import binding as B
from . import ftypes, gguf_file, layout, outputs
from . import imatrix_file as imx
from .errors import Error
from .model import resolve

_lib, _ffi = B.lib, B.ffi

# Target types: every ggml type with a quantizer that the CPU backend can use as a weight.
TYPE_NAMES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K",
              "q6_K", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "iq1_s", "iq1_m",
              "tq1_0", "tq2_0", "mxfp4")


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
    if find_recipe(key) is not None:
        raise Error(f"{name!r} is a recipe, not a ggml type: pass recipe={key!r}",
                    cli=f"{name!r} is a recipe, not a ggml type: use --recipe {key}")
    raise Error(f"unknown quantization type {name!r}; known types: {', '.join(TYPE_NAMES)}")


def _tn(t: int) -> str:
    return B.type_name(t)


# ---- recipes --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named recipe: a llama.cpp file type (its mixture rules, see `ftypes`) with optional --tensor-type
    overrides and token embedding type, as `llama-quantize --tensor-type ... FTYPE` would make it."""

    name: str
    description: str
    file_type: ftypes.FileType
    overrides: tuple[tuple[str, str], ...] = ()
    token_embedding_type: str | None = None


ASYM_2BITEXP = Recipe(
    "asym-2bitexp",
    "Asymmetric 2-bit-expert mix (hyperspaceai's published recipe, ~10.98 GB for 26B-A4B): Q5_K_S with "
    "--tensor-type ffn_gate_up_exps=iq2_s (needs an imatrix), ffn_down_exps=iq4_nl, self_cond=q4_K and "
    "--token-embedding-type q6_K. Attention and the dense ffn Q5_K (the 2112-column ffn_down falls back to "
    "Q5_1, self_cond_down to Q5_0); norms, scales, rope_freqs and the router unchanged (F32).",
    ftypes.FILE_TYPES["q5_k_s"],
    overrides=((r"ffn_(gate_up|gate|up)_exps", "iq2_s"),  # gate|up: the unfused layout
               ("ffn_down_exps", "iq4_nl"), ("self_cond", "q4_K")),
    token_embedding_type="q6_K",
)

RECIPES: dict[str, Recipe] = {ASYM_2BITEXP.name: ASYM_2BITEXP} | {
    ft.name: Recipe(ft.name, f"llama-quantize's {ft.name} file type, with llama.cpp's per-tensor choices: "
                            f"{ft.summary}.", ft) for ft in ftypes.FILE_TYPES.values()}


def find_recipe(name: str) -> Recipe | None:
    """The named recipe (case-insensitive; llama-quantize's aliases Q3_K/Q4_K/Q5_K and llama_ftype numbers
    included), or None."""
    key = str(name).strip().lower()
    if key == ASYM_2BITEXP.name:
        return ASYM_2BITEXP
    ft = ftypes.file_type(key)
    return RECIPES[ft.name] if ft is not None else None


def recipes() -> dict[str, str]:
    """Named recipes and what they do: llama-quantize's file types (Q4_K_M, IQ2_S, ...; case-insensitive)
    and asym-2bitexp. Any single type name (see TYPE_NAMES) is also accepted as `type=`."""
    return {name: r.description for name, r in RECIPES.items()}


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: str
    regex: re.Pattern
    type: int
    origin: str  # "recipe", "override" or "type"


def _parse_rules(rules: Any, origin: str, n_layer: int) -> list[_Rule]:
    """(regex, type) pairs, "regex=type" strings or a {regex: type} mapping -> compiled rules."""
    if rules is None:
        return []
    if isinstance(rules, str | bytes):
        raise Error(f"{origin}: expected a list of (regex, type) rules, got the string {rules!r}")
    if not isinstance(rules, Mapping | Sequence):
        raise Error(f"{origin}: expected a recipe name or a list of (regex, type) rules, got {rules!r}")
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    alt = "(?:" + "|".join(str(i) for i in range(n_layer) if ftypes.more_bits(i, n_layer)) + ")"
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


@dataclasses.dataclass
class _Spec:
    """What decides the types: a llama file type (mixture + overrides) or plain first-match rules."""

    desc: dict[str, Any]
    file_type: ftypes.FileType | None = None
    rules: list[_Rule] = dataclasses.field(default_factory=list)  # recipe's overrides or regex rules
    token_embedding_type: int | None = None


def _resolve_recipe(recipe: Any, type: Any, n_layer: int) -> _Spec:
    if recipe is not None and type is not None:
        raise Error("give either recipe= or type=, not both")
    if type is not None:
        t = type_id(type)
        return _Spec({"type": _tn(t)}, rules=[_Rule(".", re.compile("."), t, "type")])
    if recipe is None:
        return _Spec({})
    if isinstance(recipe, int) and not isinstance(recipe, bool):  # a llama_ftype number, as on the CLI
        recipe = str(recipe)
    if isinstance(recipe, str):
        r = find_recipe(recipe)
        if r is not None:
            return _Spec({"recipe": r.name}, r.file_type, _parse_rules(r.overrides, "recipe", n_layer),
                         type_id(r.token_embedding_type) if r.token_embedding_type else None)
        if recipe.strip().lower() in _TYPE_BY_LOWER:  # a bare type name works as a uniform recipe
            return _resolve_recipe(None, recipe, n_layer)
        raise Error(f"unknown recipe {recipe!r}; named recipes: {', '.join(RECIPES)} "
                    f"(or a list of (regex, type) rules, or type=one of {', '.join(TYPE_NAMES)})",
                    cli=f"unknown recipe {recipe!r}; named recipes: {', '.join(RECIPES)} "
                    f"(or --type one of {', '.join(TYPE_NAMES)})")
    rules = _parse_rules(recipe, "recipe", n_layer)
    return _Spec({"rules": [[r.pattern, _tn(r.type)] for r in rules]}, rules=rules)


# ---- planning --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    info: gguf_file.TensorInfo  # the source tensor
    name: str  # in the output (differs from the source's when --prune-layers renumbers blocks)
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
    new = _TYPE_ID[ftypes.shape_fallback(_tn(t), ne0)]
    if new == t:
        return t, None
    return new, f"row length {ne0} is not a multiple of the {_tn(t)} block ({_lib.ggml_blck_size(t)})"


def _ftype_for(plans: list[_Plan]) -> int:
    """llama file type of the target type that holds the most matrix weights (e.g. mostly IQ2_S -> IQ2_S)."""
    weight: dict[int, int] = {}
    for p in plans:
        if p.role in (layout.MATRIX, layout.EMBED):
            weight[p.dst] = weight.get(p.dst, 0) + p.n_elements
    if not weight:
        return int(FT.ALL_F32)
    top = _tn(max(weight.items(), key=lambda kv: kv[1])[0])
    special = {"f32": "ALL_F32", "q3_K": "MOSTLY_Q3_K_S", "q4_K": "MOSTLY_Q4_K_S", "q5_K": "MOSTLY_Q5_K_S",
               "mxfp4": "MOSTLY_MXFP4_MOE"}
    return int(FT[special.get(top, "MOSTLY_" + top.upper())])


def _imatrix_matters(t: int) -> bool:
    """Whether ggml's quantizer for `t` uses importance weights at all (q8_0 and float types ignore them)."""
    return bool(_lib.ggml_is_quantized(t)) and _tn(t) != "q8_0"


def _pruned_names(names: Sequence[str], hp: layout.HParams, prune_layers: Sequence[int] | None
                  ) -> tuple[dict[str, str], layout.HParams]:
    """Output name of every kept tensor ({} entries dropped) and the output's hparams: like llama-quantize's
    --prune-layers, the remaining blocks are renumbered in order; the per-layer arrays lose the pruned
    entries too (llama-quantize only rewrites block_count, which leaves a file that does not load)."""
    if not prune_layers:
        return {n: n for n in names}, hp
    ids = list(prune_layers) if isinstance(prune_layers, Sequence) and not isinstance(prune_layers, str) else [None]
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < hp.n_layer for i in ids):
        raise Error(f"prune_layers: a list of layer ids in 0..{hp.n_layer - 1}, got {prune_layers!r}")
    drop = sorted(set(ids))
    keep = [i for i in range(hp.n_layer) if i not in drop]
    if not keep:
        raise Error("prune_layers would remove every layer")
    new_id = {old: new for new, old in enumerate(keep)}
    out = {}
    for n in names:
        il = layout.layer_of(n)
        if il is None:
            out[n] = n
        elif il in new_id:
            out[n] = f"blk.{new_id[il]}." + n.split(".", 2)[2]
    hp_out = dataclasses.replace(hp, n_layer=len(keep), n_head_kv=tuple(hp.n_head_kv[i] for i in keep),
                                 swa_layers=tuple(hp.swa_layers[i] for i in keep))
    problems = layout.check_hparams(hp_out)
    if problems:
        raise Error(f"prune_layers={drop} leaves a model that cannot run: {'; '.join(problems)}")
    return out, hp_out


def _choose(gf: gguf_file.GGUFFile, hp: layout.HParams, out_names: dict[str, str], spec: _Spec,
            ovr: list[_Rule], token_embedding_type: int | None, output_tensor_type: int | None, pure: bool,
            has_imatrix: bool) -> list[_Plan]:
    """Each kept tensor's output type: norms, scales and the router keep theirs (llama.cpp never quantizes
    them); matrices follow the file type's mixture or the first matching rule."""
    fused = layout.fused_gate_up(gf.tensors)
    roles = {s.name: s.role for s in layout.tensor_specs(hp, fused_gate_up=fused)}
    kept = [info for info in gf.tensors.values() if info.name in out_names]
    matrices = [info for info in kept if roles[info.name] in (layout.MATRIX, layout.EMBED)]
    tok = token_embedding_type if token_embedding_type is not None else spec.token_embedding_type
    chosen: dict[str, tuple[int, int, str | None]] = {}  # source name -> (wanted, dst, rule)
    if spec.file_type is not None:
        names = [out_names[i.name] for i in matrices]
        model = ftypes.Model(n_layer=hp.n_layer, n_expert=hp.n_expert, n_gqa=hp.n_head // hp.n_head_kv[0],
                             n_attn_v=sum(ftypes.category(n) == ftypes.ATTN_V for n in names),
                             has_imatrix=has_imatrix)
        choice = ftypes.choose_types(
            spec.file_type, model, [(out_names[i.name], i.shape[0], i.shape[2] if len(i.shape) > 2 else 1)
                                    for i in matrices],
            overrides=[(r.regex, _tn(r.type)) for r in ovr + spec.rules],
            token_embedding_type=_tn(tok) if tok is not None else None,
            output_tensor_type=_tn(output_tensor_type) if output_tensor_type is not None else None, pure=pure)
        for info in matrices:
            c = choice[out_names[info.name]]
            chosen[info.name] = (_TYPE_ID[c.wanted], _TYPE_ID[c.type], c.why)
    else:
        if pure or output_tensor_type is not None:
            raise Error("pure= and output_tensor_type= change a llama file type's mixture: give a file type "
                        "recipe such as recipe='Q4_K_M'")
        for info in matrices:
            wanted, rule = info.type, None
            if tok is not None and info.name == "token_embd.weight":
                wanted, rule = tok, "token embedding type"
            else:
                for r in ovr + spec.rules:
                    if r.regex.search(out_names[info.name]):
                        wanted, rule = r.type, f"{r.origin} {r.pattern}"
                        break
            chosen[info.name] = (wanted, _shape_fallback(wanted, info.shape[0])[0], rule)
    plans = []
    for info in kept:
        wanted, dst, rule = chosen.get(info.name, (info.type, info.type, roles[info.name]))
        plans.append(_Plan(info, out_names[info.name], roles[info.name], wanted, dst, rule))
    return plans


def _filter_imatrix(imat: imx.ImatrixData | None, include: Sequence[str] | None,
                    exclude: Sequence[str] | None) -> imx.ImatrixData | None:
    """llama-quantize's --include-weights / --exclude-weights: keep / drop entries whose name contains one of
    the strings; an imatrix left without entries counts as none (no imatrix keys, no imatrix rules)."""
    if include and exclude:
        raise Error("include_weights and exclude_weights cannot be used together (as in llama-quantize)")
    for arg, v in (("include_weights", include), ("exclude_weights", exclude)):
        if isinstance(v, str | bytes):
            raise Error(f"{arg} takes a list of name substrings, got the string {v!r}")
    if imat is None or not (include or exclude):
        return imat
    if include:
        entries = {k: e for k, e in imat.entries.items() if any(s in k for s in include)}
    else:
        entries = {k: e for k, e in imat.entries.items() if not any(s in k for s in exclude or ())}
    return dataclasses.replace(imat, entries=entries) if entries else None


def parse_kv_override(item: str) -> tuple[str, bool | int | float | str]:
    """llama-quantize's --override-kv KEY=TYPE:VALUE (TYPE int, float, bool or str) -> (key, value)."""
    key, sep, rest = str(item).partition("=")
    kind, colon, val = rest.partition(":")
    if not sep or not key or len(key) >= 128 or not colon:
        raise Error(f"override_kv: {item!r} is not KEY=TYPE:VALUE (TYPE int, float, bool or str)")
    try:
        if kind == "int":
            return key, abs(int(val))  # llama-quantize stores ints as u32 of the magnitude
        if kind == "float":
            return key, float(val)
    except ValueError:
        raise Error(f"override_kv: {item!r}: {val!r} is not a {kind}") from None
    if kind == "bool" and val in ("true", "false"):
        return key, val == "true"
    if kind == "str" and len(val) <= 127:
        return key, val
    raise Error(f"override_kv: {item!r}: type must be int, float, bool (true/false) or str (<= 127 chars)")


def _kv_overrides(override_kv: Any) -> dict[str, Any]:
    if override_kv is None:
        return {}
    if isinstance(override_kv, Mapping):
        return dict(override_kv)
    if isinstance(override_kv, str | bytes):
        raise Error(f"override_kv takes a list of KEY=TYPE:VALUE strings or a mapping, got {override_kv!r}")
    return dict(parse_kv_override(o) for o in override_kv)


def _output_metadata(gf: gguf_file.GGUFFile, hp_out: layout.HParams, pruned: bool,
                     kv: dict[str, Any]) -> dict[str, Any]:
    """Keys the output sets beyond the source's (pruned layer arrays, --override-kv), checked to load."""
    md: dict[str, Any] = {}
    if pruned:
        full = layout.hparams_to_metadata(hp_out)
        for field in ("n_layer", "n_head_kv", "swa_layers"):
            md[layout.metadata_key(field)] = full[layout.metadata_key(field)]
    md.update(kv)
    _, problems = layout.hparams_from_metadata({**gf.metadata, **md})
    if problems:
        raise Error("the output metadata would not load: " + "; ".join(problems))
    return md


def _attach_imatrix(plans: list[_Plan], imat: imx.ImatrixData | None, file_type: ftypes.FileType | None,
                    require_imatrix: bool, dry_run: bool, notes: list[str]
                    ) -> tuple[list[str], dict[str, float]]:
    """Give each quantized tensor its importance weights; refuse (warn in a dry run) where a type needs
    them and there are none. Returns the tensors without data and the partial expert coverage."""
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
                if p.info.name != "token_embd.weight":  # llama-quantize ignores it there, as here
                    raise
                notes.append(f"imatrix entry for {p.info.name} does not fit its shape: ignored")
        if e is not None:
            p.imat = np.ascontiguousarray(e.weights())
            if not np.isfinite(p.imat).all() or (p.imat < 0).any():  # llama-quantize rejects these too
                raise Error(f"imatrix entry {p.info.name} holds negative or non-finite values")
            if e.coverage < 1:
                partial[p.name] = e.coverage
        elif _imatrix_matters(p.dst):
            no_imatrix.append(p.name)
            if _lib.ggml_quantize_requires_imatrix(p.dst) or (
                    require_imatrix and ftypes.requires_imatrix(p.name, _tn(p.dst), file_type)):
                missing.append(p)
    if imat is not None and imat.entries and not any(p.imat is not None for p in plans):
        notes.append("the imatrix has no entry for any tensor quantized here (made for another model?)")
    if missing:
        types = sorted({_tn(p.dst) for p in missing})
        names = ", ".join(p.name for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        msg = (f"{len(missing)} tensor(s) need importance data for {'/'.join(types)} "
               f"({'the imatrix has no entry for' if imat is not None else 'no imatrix given for'} {names}): ")
        cli = msg + "add --imatrix FILE, or give them another type, e.g. --tensor-type 'ffn_gate_up_exps=q2_K'"
        msg += ("pass imatrix=, or give them another type with overrides, e.g. "
                "overrides=[(r'ffn_gate_up_exps', 'q2_K')]")
        if not dry_run:
            raise Error(msg, cli=cli)
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    return no_imatrix, partial


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


def _spec(recipe: Any, type: Any, overrides: Any, token_embedding_type: str | None, output_tensor_type: str | None,
          pure: bool, n_layer: int) -> tuple[_Spec, list[_Rule], int | None, int | None]:
    """The recipe, the override rules and the embedding/output types, each recorded in the recipe's description
    (what the file's diffgemma.quantize.recipe key says was asked for)."""
    spec = _resolve_recipe(recipe, type, n_layer)
    ovr = _parse_rules(overrides, "overrides", n_layer)
    tok = type_id(token_embedding_type) if token_embedding_type is not None else None
    out_t = type_id(output_tensor_type) if output_tensor_type is not None else None
    if spec.file_type is None and not spec.rules and not ovr and tok is None:
        raise Error("nothing to do: give recipe=, type= or overrides=",
                    cli="nothing to do: give a TYPE, --recipe, --type or --tensor-type")
    if ovr:
        spec.desc["overrides"] = [[r.pattern, _tn(r.type)] for r in ovr]
    for key, val in (("token_embedding_type", tok), ("output_tensor_type", out_t)):
        if val is not None:
            spec.desc[key] = _tn(val)
    if pure:
        spec.desc["pure"] = True
    return spec, ovr, tok, out_t


def _check_output(src_p: pathlib.Path, dst_p: pathlib.Path, overwrite: bool) -> None:
    """dst must be a file name in an existing directory, not the source, and new unless overwrite."""
    if not dst_p.parent.is_dir():
        raise Error(f"{dst_p.parent}: no such directory for the output")
    if dst_p.is_dir():
        raise Error(f"{dst_p}: is a directory, not an output file name")
    if dst_p.exists() and dst_p.resolve() == src_p.resolve():
        raise Error(f"{dst_p}: the output would replace the source it is read from")
    outputs.check_new(dst_p, overwrite)


def _flag_notes(plans: list[_Plan], spec: _Spec, ovr: list[_Rule], leave_output_tensor: bool) -> list[str]:
    """The report's notes on flags that change nothing; an override matching no tensor also warns (a typo)."""
    notes: list[str] = []
    quantizable = [p.info.name for p in plans if p.role not in (layout.VECTOR, layout.ROUTER)]
    for r in ovr:
        if not any(r.regex.search(n) for n in quantizable):
            notes.append(f"override {r.pattern!r} matches no quantizable tensor")
            warnings.warn(notes[-1], stacklevel=3)  # at quantize()'s caller
    if leave_output_tensor:
        notes.append("leave_output_tensor changes nothing here: the output head is token_embd (tied), as in "
                     "llama-quantize; use token_embedding_type to keep it")
    if spec.file_type is not None and spec.file_type.default in ("f32", "f16", "bf16") and ovr:
        notes.append(f"overrides are ignored by the {spec.file_type.name} file type, as in llama-quantize")
    return notes


def _refuse_requantize(plans: list[_Plan], allow_requantize: bool) -> None:
    """An Error when a quantized tensor would be converted to another type and that is not allowed (or not
    possible: a type without a dequantizer)."""
    refused = [p for p in plans if not p.copy and _lib.ggml_is_quantized(p.info.type)
               and (not allow_requantize or _lib.ggml_get_type_traits(p.info.type).to_float == _ffi.NULL)]
    if refused:
        ex = ", ".join(f"{p.info.name} ({p.info.type_name}->{_tn(p.dst)})" for p in refused[:3])
        msg = f"{len(refused)} tensor(s) would be requantized from an already quantized type, e.g. {ex}; "
        raise Error(msg + "pass allow_requantize=True (quality suffers) or start from an f16/bf16/f32 file",
                    cli=msg + "drop --no-requantize (quality suffers) or start from an f16/bf16/f32 file")


def _writer(src_p: pathlib.Path, dst_p: pathlib.Path, plans: list[_Plan], spec: _Spec, ftype: int,
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


def _write(w: gguf_file.Writer, plans: list[_Plan], src_p: pathlib.Path, dst_p: pathlib.Path, n_threads: int,
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
    spec, ovr, tok, out_t = _spec(recipe, type, overrides, token_embedding_type, output_tensor_type, pure, hp.n_layer)
    if not dry_run:
        _check_output(src_p, dst_p, overwrite)
    imat, imat_name = _load_imatrix(imatrix)
    imat = _filter_imatrix(imat, include_weights, exclude_weights)
    out_names, hp_out = _pruned_names(list(gf.tensors), hp, prune_layers)
    if prune_layers:
        spec.desc["prune_layers"] = sorted(set(prune_layers))
    extra_md = _output_metadata(gf, hp_out, bool(prune_layers), _kv_overrides(override_kv))

    plans = _choose(gf, hp, out_names, spec, ovr, tok, out_t, pure, has_imatrix=imat is not None)
    notes = _flag_notes(plans, spec, ovr, leave_output_tensor)
    _refuse_requantize(plans, allow_requantize)
    no_imatrix, partial = _attach_imatrix(plans, imat, spec.file_type, require_imatrix, dry_run, notes)
    ftype = spec.file_type.ftype if spec.file_type is not None else _ftype_for(plans)
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
        fallbacks=[(p.name, _tn(p.wanted), _tn(p.dst), _shape_fallback(p.wanted, p.ne0)[1] or "")
                   for p in plans if p.wanted != p.dst],
        no_imatrix=no_imatrix, imatrix_partial=partial, warnings=notes, ftype=ftype, dry_run=dry_run,
        imatrix=imat_name, src_bytes=sum(p.info.nbytes for p in plans), seconds=seconds)

