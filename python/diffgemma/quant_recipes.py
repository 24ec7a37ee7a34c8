"""What a quantization is asked to do: the target ggml types, the named recipes (llama-quantize's file types and
asym-2bitexp) and the ordered (regex, type) rules of a custom recipe or of overrides (--tensor-type).

A custom recipe is an ordered list of (regex, type) rules: the first rule whose regex matches a tensor name
(`re.search`) decides its type, and a tensor no rule matches keeps its source type. Overrides are tried before
the recipe's own rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gguf import GGMLQuantizationType as QT

from . import ftypes
from .binding import type_name as _tn
from .errors import Error

# Target types: every ggml type with a quantizer that the CPU backend can use as a weight.
TYPE_NAMES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K",
              "q6_K", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "iq1_s", "iq1_m",
              "tq1_0", "tq2_0", "mxfp4")


def _type_ids() -> dict[str, int]:
    # ids from gguf's enum (ggml has no bounds check to enumerate types safely), confirmed against ggml's names
    out = {}
    for n in TYPE_NAMES:
        t = int(QT[n.upper()])
        if _tn(t) == n:
            out[n] = t
    return out


TYPE_IDS = _type_ids()
_TYPE_BY_LOWER = {n.lower(): t for n, t in TYPE_IDS.items()}


# In a recipe regex, this placeholder becomes the layers llama-quantize's "use_more_bits" rule gives extra
# bits: the first and last eighth of the layers and every third layer between them.
MORE_BITS = "<more_bits>"


def type_id(name: str | int) -> int:
    """The ggml type id of a target type name (case-insensitive, e.g. 'Q4_K', 'iq2_s'); Error if unknown."""
    if isinstance(name, int) and not isinstance(name, bool) and name in TYPE_IDS.values():
        return name
    key = str(name).strip().lower()
    if key in _TYPE_BY_LOWER:
        return _TYPE_BY_LOWER[key]
    if find_recipe(key) is not None:
        raise Error(f"{name!r} is a recipe, not a ggml type: pass recipe={key!r}",
                    cli=f"{name!r} is a recipe, not a ggml type: use --recipe {key}")
    raise Error(f"unknown quantization type {name!r}; known types: {', '.join(TYPE_NAMES)}")


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
class Rule:
    pattern: str
    regex: re.Pattern
    type: int
    origin: str  # "recipe", "override" or "type"


def parse_rules(rules: Any, origin: str, n_layer: int) -> list[Rule]:
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
        out.append(Rule(pat, rx, type_id(t), origin))
    return out


@dataclasses.dataclass
class Spec:
    """What decides the types: a llama file type (mixture + overrides) or plain first-match rules."""

    desc: dict[str, Any]
    file_type: ftypes.FileType | None = None
    rules: list[Rule] = dataclasses.field(default_factory=list)  # recipe's overrides or regex rules
    token_embedding_type: int | None = None


def _resolve_recipe(recipe: Any, type: Any, n_layer: int) -> Spec:
    if recipe is not None and type is not None:
        raise Error("give either recipe= or type=, not both")
    if type is not None:
        t = type_id(type)
        return Spec({"type": _tn(t)}, rules=[Rule(".", re.compile("."), t, "type")])
    if recipe is None:
        return Spec({})
    if isinstance(recipe, int) and not isinstance(recipe, bool):  # a llama_ftype number, as on the CLI
        recipe = str(recipe)
    if isinstance(recipe, str):
        r = find_recipe(recipe)
        if r is not None:
            return Spec({"recipe": r.name}, r.file_type, parse_rules(r.overrides, "recipe", n_layer),
                         type_id(r.token_embedding_type) if r.token_embedding_type else None)
        if recipe.strip().lower() in _TYPE_BY_LOWER:  # a bare type name works as a uniform recipe
            return _resolve_recipe(None, recipe, n_layer)
        raise Error(f"unknown recipe {recipe!r}; named recipes: {', '.join(RECIPES)} "
                    f"(or a list of (regex, type) rules, or type=one of {', '.join(TYPE_NAMES)})",
                    cli=f"unknown recipe {recipe!r}; named recipes: {', '.join(RECIPES)} "
                    f"(or --type one of {', '.join(TYPE_NAMES)})")
    rules = parse_rules(recipe, "recipe", n_layer)
    return Spec({"rules": [[r.pattern, _tn(r.type)] for r in rules]}, rules=rules)


def make_spec(recipe: Any, type: Any, overrides: Any, token_embedding_type: str | None,
              output_tensor_type: str | None, pure: bool, n_layer: int
              ) -> tuple[Spec, list[Rule], int | None, int | None]:
    """The recipe, the override rules and the embedding/output types, each recorded in the recipe's description
    (what the file's diffgemma.quantize.recipe key says was asked for)."""
    spec = _resolve_recipe(recipe, type, n_layer)
    ovr = parse_rules(overrides, "overrides", n_layer)
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

