"""llama.cpp's file types (llama-quantize's `Q4_K_M`, `IQ2_S`, ...) and the type each one picks per tensor.

A file type is a default ggml type plus llama.cpp's mixture rules: the tied embedding/output head gets more
bits, `attn_v` and `ffn_down` get more bits in some layers, 8-expert models get Q8_0 attention k/v, and so on.
The rules below restate `src/llama-quant.cpp` of the pinned llama-cpp-python 0.3.36 (`llama_tensor_get_type`
and its helpers) for the tensors a `diffusion-gemma` file has (tied embeddings, no fused qkv, not Falcon, not
a 70B); they are data (`RULES`) read by one short function (`mixture_type`). `choose_types` walks a file's
tensors in llama.cpp's order, because two rules depend on how many `attn_v` / `ffn_down` tensors came before
(counting only the ones the mixture decided, as llama.cpp does).

This module is pure: names, shapes and hyper-parameters in, ggml type names out (testable without ggml).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.constants import LlamaFileType as FT

from .errors import Error


@dataclasses.dataclass(frozen=True)
class FileType:
    """One of llama-quantize's file types: its name, `llama_ftype` value and default ggml type."""

    name: str  # as llama-quantize spells it
    ftype: int  # written to general.file_type
    default: str  # ggml type of every quantizable tensor no rule changes
    summary: str


def _ft(name: str, default: str, summary: str, ftype: str | None = None) -> FileType:
    return FileType(name, int(FT[ftype or "MOSTLY_" + name]), default, summary)


# llama-quantize's QUANT_OPTIONS (tools/quantize/quantize.cpp) that ggml can write here; the default types
# are llama_ftype_get_default_type's (note IQ2_S defaults to iq2_xs and IQ3_XS to iq3_s).
FILE_TYPES: dict[str, FileType] = {f.name.lower(): f for f in [
    _ft("Q4_0", "q4_0", "q4_0; q6_K head; q4_1 first-eighth ffn_down with an imatrix"),
    _ft("Q4_1", "q4_1", "q4_1; q6_K head"),
    _ft("MXFP4_MOE", "mxfp4", "mxfp4 experts, q8_0 everything else", "MOSTLY_MXFP4_MOE"),
    _ft("Q5_0", "q5_0", "q5_0; q6_K head; q5_1 first-eighth ffn_down with an imatrix"),
    _ft("Q5_1", "q5_1", "q5_1; q6_K head"),
    _ft("IQ2_XXS", "iq2_xxs", "iq2_xxs (imatrix needed); q4_K attn_v, q2_K early ffn_down, q5_K head"),
    _ft("IQ2_XS", "iq2_xs", "iq2_xs (imatrix needed); q4_K attn_v, q2_K early ffn_down, q5_K head"),
    _ft("IQ2_S", "iq2_xs", "iq2_xs (imatrix needed); q4_K attn_v, iq3_s early ffn_down and attn_output, "
        "q5_K head"),
    _ft("IQ2_M", "iq2_s", "iq2_s (imatrix needed); q4_K attn_v, iq3_s early ffn_down and attn_output, q5_K head"),
    _ft("IQ1_S", "iq1_s", "iq1_s (imatrix needed); q4_K attn_v, iq2_xxs attn_output, q2_K early ffn_down, "
        "q5_K head"),
    _ft("IQ1_M", "iq1_m", "iq1_m (imatrix needed); q4_K attn_v, iq2_xxs attn_output, q2_K early ffn_down, "
        "q5_K head"),
    _ft("TQ1_0", "tq1_0", "ternary tq1_0; q6_K head"),
    _ft("TQ2_0", "tq2_0", "ternary tq2_0; q6_K head"),
    _ft("Q2_K", "q2_K", "q2_K; q3_K attn_v/attn_output/ffn_down (q4_K attn_v at GQA >= 4); q6_K head"),
    _ft("Q2_K_S", "q2_K", "q2_K (imatrix needed); q4_K first-eighth ffn_down (and attn_v at GQA >= 4); q6_K head"),
    _ft("IQ3_XXS", "iq3_xxs", "iq3_xxs (imatrix needed); iq2_s attn_q/attn_k, iq3_s attn_output, q5_K head"),
    _ft("IQ3_S", "iq3_s", "iq3_s; q4_K attn_v at GQA >= 4; q6_K head"),
    _ft("IQ3_M", "iq3_s", "iq3_s; q4_K attn_v, attn_output and first-eighth ffn_down; q6_K head"),
    _ft("IQ3_XS", "iq3_s", "iq3_s; iq3_xxs attn_q/attn_k and middle-layer ffn_gate/up; q6_K head"),
    _ft("Q3_K_S", "q3_K", "q3_K; q6_K head"),
    _ft("Q3_K_M", "q3_K", "q3_K; q5_K first two attn_v, q4_K other attn_v and attn_output, q5_K/q4_K ffn_down; "
        "q6_K head"),
    _ft("Q3_K_L", "q3_K", "q3_K; q5_K attn_v, attn_output and ffn_down; q6_K head"),
    _ft("IQ4_NL", "iq4_nl", "iq4_nl; q5_K attn_v at GQA >= 4, q5_K first-eighth ffn_down without imatrix; "
        "q6_K head"),
    _ft("IQ4_XS", "iq4_xs", "iq4_xs; q5_K attn_v at GQA >= 4, q5_K first-eighth ffn_down without imatrix; "
        "q6_K head"),
    _ft("Q4_K_S", "q4_K", "q4_K; q5_K first four attn_v and first-eighth ffn_down; q6_K head"),
    _ft("Q4_K_M", "q4_K", "q4_K; q6_K attn_v and ffn_down in the 'more bits' layers; q6_K head"),
    _ft("Q5_K_S", "q5_K", "q5_K; q6_K head"),
    _ft("Q5_K_M", "q5_K", "q5_K; q6_K attn_v and ffn_down in the 'more bits' layers; q6_K head"),
    _ft("Q6_K", "q6_K", "q6_K everywhere"),
    _ft("Q8_0", "q8_0", "q8_0 everywhere"),
    _ft("F16", "f16", "f16 everywhere (no mixture, --tensor-type ignored)"),
    _ft("BF16", "bf16", "bf16 everywhere (no mixture, --tensor-type ignored)"),
    _ft("F32", "f32", "f32 everywhere (no mixture, --tensor-type ignored)", "ALL_F32"),
]}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # llama-quantize's own aliases


def file_type(name: str) -> FileType | None:
    """The file type llama-quantize means by `name` (case-insensitive, aliases and llama_ftype numbers such
    as '15' included), or None."""
    key = str(name).strip().lower()
    if key.isdigit():
        return next((f for f in FILE_TYPES.values() if f.ftype == int(key)), None)
    return FILE_TYPES.get(ALIASES.get(key, key))


# ---- tensor categories (llama-quant.cpp's tensor_get_category: first substring that matches) -------------

EMBD, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUT, FFN_UP, FFN_GATE, FFN_DOWN, OTHER = (
    "token_embd", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down", "other")
_CATEGORY_BY_SUBSTRING = (("attn_v.weight", ATTN_V), ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q),
                          ("attn_output.weight", ATTN_OUT), ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE),
                          ("ffn_down", FFN_DOWN))


def category(name: str) -> str:
    """llama.cpp's category of a tensor name: ffn_gate_up_exps is FFN_GATE, self_cond_* are OTHER."""
    if name == "token_embd.weight":  # tied to the output head: no output.weight in this architecture
        return EMBD
    return next((c for s, c in _CATEGORY_BY_SUBSTRING if s in name), OTHER)


# ---- the mixture rules ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Model:
    """What llama.cpp's rules look at besides the tensor: hparams of the *source* model (so pruning layers
    does not change n_layer), layer 0's GQA ratio, how many attn_v tensors the output has, and whether an
    imatrix with at least one entry was given."""

    n_layer: int
    n_expert: int
    n_gqa: int
    n_attn_v: int
    has_imatrix: bool


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor as the rules see it. layer: the block index the name gives (llama.cpp uses its running
    count of that category instead when the model has a single expert); i_attn_v / i_ffn_down: attn_v /
    ffn_down tensors the mixture decided before this one."""

    name: str
    ne0: int
    n_mat: int  # ne[2]: experts of a 3-D tensor, else 1
    layer: int
    i_attn_v: int = 0
    i_ffn_down: int = 0


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth and every third one between get more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]


Cond = Callable[[Model, Tensor, FileType], bool]
CONDITIONS: dict[str, Cond] = {
    "gqa>=4": lambda m, t, f: m.n_gqa >= 4,
    "gqa>=4 or experts>=4": lambda m, t, f: m.n_gqa >= 4 or m.n_expert >= 4,
    "8 experts": lambda m, t, f: m.n_expert == 8,
    "not 8 experts": lambda m, t, f: m.n_expert != 8,
    "imatrix": lambda m, t, f: m.has_imatrix,
    "no imatrix": lambda m, t, f: not m.has_imatrix,
    "expert tensor": lambda m, t, f: t.n_mat > 1,
    "row not a multiple of the default block": lambda m, t, f: t.ne0 % block_size(f.default) != 0,
    "default is not q8_0": lambda m, t, f: f.default != "q8_0",
    "first 2 attn_v": lambda m, t, f: t.i_attn_v < 2,
    "first 4 attn_v": lambda m, t, f: t.i_attn_v < 4,
    "more-bits attn_v": lambda m, t, f: more_bits(t.i_attn_v, m.n_attn_v),
    "first eighth of ffn_down tensors": lambda m, t, f: t.i_ffn_down < m.n_layer // 8,
    "first eighth": lambda m, t, f: t.layer < m.n_layer // 8,
    "first sixteenth": lambda m, t, f: t.layer < m.n_layer // 16,
    "more-bits layer": lambda m, t, f: more_bits(t.layer, m.n_layer),
    "middle layer": lambda m, t, f: m.n_layer // 8 <= t.layer < 7 * m.n_layer // 8,
}

_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")  # llama.cpp's very-low-bit branch
_ANY = ("*",)

# (category, file types, conditions that must all hold, type): the first matching rule decides, none keeps
# the default. The order follows llama-quant.cpp's if/else cascade, whose branches for one category never
# overlap in file type, so a flat first-match table is the same decision.
RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    # the tied embedding gets the output head's rules
    (EMBD, ("MXFP4_MOE",), (), "q8_0"),
    (EMBD, _ANY, ("row not a multiple of the default block",), "q8_0"),
    (EMBD, (*_IQ_LOW, "IQ3_XXS"), (), "q5_K"),
    (EMBD, _ANY, ("default is not q8_0",), "q6_K"),
    (EMBD, _ANY, (), "<default>"),
    # MXFP4_MOE: experts mxfp4, every other quantized tensor q8_0
    ("*", ("MXFP4_MOE",), ("expert tensor",), "mxfp4"),
    ("*", ("MXFP4_MOE",), (), "q8_0"),
    # the very-low-bit file types
    (ATTN_V, _IQ_LOW, ("gqa>=4 or experts>=4",), "q4_K"),
    (ATTN_V, ("IQ2_S", "IQ2_M"), (), "iq3_s"),
    (ATTN_V, _IQ_LOW, (), "q2_K"),
    (ATTN_K, _IQ_LOW, ("8 experts",), "q4_K"),
    (FFN_DOWN, ("IQ2_S", "IQ2_M"), ("first eighth of ffn_down tensors",), "iq3_s"),
    (FFN_DOWN, _IQ_LOW, ("first eighth of ffn_down tensors",), "q2_K"),
    (ATTN_OUT, _IQ_LOW, ("8 experts",), "q5_K"),
    (ATTN_OUT, ("IQ1_S", "IQ1_M"), (), "iq2_xxs"),
    (ATTN_OUT, ("IQ2_S", "IQ2_M"), (), "iq3_s"),
    ("*", _IQ_LOW, (), "<default>"),
    # attn_v (the 8-expert bump overrides whatever the cascade chose)
    (ATTN_V, _ANY, ("8 experts",), "q8_0"),
    (ATTN_V, ("Q2_K",), ("gqa>=4",), "q4_K"),
    (ATTN_V, ("Q2_K",), (), "q3_K"),
    (ATTN_V, ("Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ3_S"), ("gqa>=4",), "q4_K"),
    (ATTN_V, ("IQ3_XXS",), ("no imatrix",), "iq3_s"),
    (ATTN_V, ("IQ3_M",), (), "q4_K"),
    (ATTN_V, ("Q3_K_M",), ("first 2 attn_v",), "q5_K"),
    (ATTN_V, ("Q3_K_M",), (), "q4_K"),
    (ATTN_V, ("Q3_K_L",), (), "q5_K"),
    (ATTN_V, ("IQ4_NL", "IQ4_XS"), ("gqa>=4",), "q5_K"),
    (ATTN_V, ("Q4_K_M", "Q5_K_M"), ("more-bits attn_v",), "q6_K"),
    (ATTN_V, ("Q4_K_S",), ("first 4 attn_v",), "q5_K"),
    # attn_k, attn_q
    (ATTN_K, _ANY, ("8 experts",), "q8_0"),
    (ATTN_K, ("IQ3_XS",), (), "iq3_xxs"),
    (ATTN_K, ("IQ3_XXS",), (), "iq2_s"),
    (ATTN_Q, ("IQ3_XS",), (), "iq3_xxs"),
    (ATTN_Q, ("IQ3_XXS",), (), "iq2_s"),
    # ffn_down (dense and experts) by layer
    (FFN_DOWN, ("Q2_K",), (), "q3_K"),
    (FFN_DOWN, ("Q2_K_S",), ("first eighth",), "q4_K"),
    (FFN_DOWN, ("IQ3_XXS",), ("no imatrix", "first eighth"), "q4_K"),
    (FFN_DOWN, ("IQ3_XXS",), ("no imatrix",), "q3_K"),
    (FFN_DOWN, ("Q3_K_M",), ("first sixteenth",), "q5_K"),
    (FFN_DOWN, ("Q3_K_M",), (), "q4_K"),
    (FFN_DOWN, ("IQ3_M",), ("first eighth",), "q4_K"),
    (FFN_DOWN, ("IQ3_M",), ("8 experts", "more-bits layer"), "q4_K"),
    (FFN_DOWN, ("Q3_K_L",), (), "q5_K"),
    (FFN_DOWN, ("Q4_K_M", "Q5_K_M"), ("more-bits layer",), "q6_K"),
    (FFN_DOWN, ("IQ4_NL", "IQ4_XS"), ("first eighth", "no imatrix"), "q5_K"),
    (FFN_DOWN, ("Q4_K_S",), ("first eighth",), "q5_K"),
    (FFN_DOWN, ("Q4_0",), ("imatrix", "first eighth"), "q4_1"),
    (FFN_DOWN, ("Q5_0",), ("imatrix", "first eighth"), "q5_1"),
    # attn_output
    (ATTN_OUT, ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M",
                "IQ4_XS"), ("8 experts",), "q5_K"),
    (ATTN_OUT, ("Q2_K",), ("not 8 experts",), "q3_K"),
    (ATTN_OUT, ("IQ3_XXS",), ("not 8 experts",), "iq3_s"),
    (ATTN_OUT, ("Q3_K_M", "IQ3_M"), ("not 8 experts",), "q4_K"),
    (ATTN_OUT, ("Q3_K_L",), ("not 8 experts",), "q5_K"),
    # ffn_gate / ffn_up (ffn_gate_up_exps counts as ffn_gate)
    (FFN_GATE, ("IQ3_XS",), ("middle layer",), "iq3_xxs"),
    (FFN_UP, ("IQ3_XS",), ("middle layer",), "iq3_xxs"),
)


def mixture_type(ft: FileType, model: Model, t: Tensor, output_tensor_type: str | None = None) -> str:
    """The type llama.cpp's mixture rules give tensor `t` in file type `ft` (before the shape fallback)."""
    cat = category(t.name)
    if cat == EMBD and output_tensor_type is not None:  # --output-tensor-type reaches the tied head here
        return output_tensor_type
    for c, fts, conds, out in RULES:
        if (c in ("*", cat) and (fts == _ANY or ft.name in fts)
                and all(CONDITIONS[k](model, t, ft) for k in conds)):
            return ft.default if out == "<default>" else out
    return ft.default


# ---- shape fallback and imatrix requirement --------------------------------------------------------------

# llama.cpp's tensor_type_fallback when the row length is not a multiple of the type's block; types with
# blocks of 32 or less keep their type, and a fallback that still does not fit becomes f16.
FALLBACK = {**dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"),
                            "iq4_nl"),
            **dict.fromkeys(("q2_K", "q3_K", "tq1_0", "tq2_0"), "q4_0"),
            "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}


def shape_fallback(type_name: str, ne0: int) -> str:
    """The type llama.cpp uses instead of `type_name` for rows of `ne0` values (itself when it fits)."""
    if type_name in ("f32", "f16", "bf16") or ne0 % block_size(type_name) == 0:
        return type_name
    new = FALLBACK.get(type_name, type_name)
    if block_size(type_name) > 32 and type_name not in FALLBACK:
        raise Error(f"llama.cpp defines no fallback for {type_name} rows of {ne0} values")
    return new if ne0 % block_size(new) == 0 else "f16"


# Types llama-quantize refuses to make without importance data (the head never needs it).
NEEDS_IMATRIX = frozenset({"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"})


def requires_imatrix(name: str, type_name: str, ft: FileType | None) -> bool:
    """llama.cpp's tensor_requires_imatrix (Q2_K only counts inside a Q2_K_S file)."""
    if name == "token_embd.weight":
        return False
    return type_name in NEEDS_IMATRIX or (type_name == "q2_K" and ft is not None and ft.name == "Q2_K_S")


# ---- one file's choices ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """The type a tensor gets: `wanted` before the shape fallback, `type` after; `why` names the rule."""

    wanted: str
    type: str
    why: str


_BLK = re.compile(r"^blk\.(\d+)\.")


def llama_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's tensor order (its weights map): by block index (non-block tensors first), then by name."""
    def key(n: str) -> tuple[int, str]:
        m = _BLK.match(n)
        return (int(m.group(1)) if m else -1, n)
    return sorted(names, key=key)


def choose_types(ft: FileType, model: Model, tensors: Sequence[tuple[str, int, int]], *,
                 overrides: Sequence[tuple[re.Pattern, str]] = (), token_embedding_type: str | None = None,
                 output_tensor_type: str | None = None, pure: bool = False) -> dict[str, Choice]:
    """llama.cpp's llama_tensor_get_type for every quantizable tensor (name, ne0, n_mat) of one output file.

    overrides: --tensor-type patterns, tried in order with `search` (a match skips the mixture rules but not
    the shape fallback); they, the mixture and `pure` only apply when the default type is quantized, as in
    llama.cpp. token_embedding_type wins over everything and skips the mixture.
    """
    quantized = ft.default not in ("f32", "f16", "bf16")
    counts = {ATTN_V: 0, FFN_DOWN: 0, FFN_GATE: 0, FFN_UP: 0}  # tensors the mixture has seen, per category
    out: dict[str, Choice] = {}
    by_name = {t[0]: t for t in tensors}
    for name in llama_order(list(by_name)):
        _, ne0, n_mat = by_name[name]
        if token_embedding_type is not None and name == "token_embd.weight":
            out[name] = Choice(token_embedding_type, shape_fallback(token_embedding_type, ne0),
                               "token embedding type")
            continue
        if not quantized:
            out[name] = Choice(ft.default, ft.default, ft.name)
            continue
        wanted, why = None, ""
        for rx, ty in overrides:
            if rx.search(name):
                wanted, why = ty, f"tensor type {rx.pattern}"
                break
        if wanted is None and pure:
            wanted, why = ft.default, "pure"
        if wanted is None:
            cat = category(name)
            m = _BLK.match(name)
            layer = int(m.group(1)) if m and model.n_expert > 1 else counts.get(cat, 0)
            t = Tensor(name, ne0, n_mat, layer, counts[ATTN_V], counts[FFN_DOWN])
            wanted, why = mixture_type(ft, model, t, output_tensor_type), ft.name
            if cat in counts:
                counts[cat] += 1
        out[name] = Choice(wanted, shape_fallback(wanted, ne0), why)
    return out
