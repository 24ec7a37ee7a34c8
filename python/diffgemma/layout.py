"""The published `diffusion-gemma` GGUF layout: metadata keys, hyper-parameters and the tensor inventory.

One source of truth for the loader (validation), the tiny-model factory, the converter and the quantizer.
Shapes are in GGUF/ggml order (ne0 first).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from . import sampler
from .errors import GGUFError

ARCH = "diffusion-gemma"


@dataclasses.dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a DiffusionGemma text model (its architecture), read from (or written to) GGUF
    metadata. The sampler's settings are sampler.SamplerSettings."""

    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer: sliding and global layers differ
    head_dim: int  # global (full-attention) layers
    head_dim_swa: int  # sliding layers
    n_ff: int  # dense MLP width, also the self-conditioning MLP width
    n_ff_exp: int  # per-expert width
    n_expert: int
    n_expert_used: int
    sliding_window: int
    swa_layers: tuple[bool, ...]  # True = sliding layer
    rope_base: float = 1e6
    rope_base_swa: float = 1e4
    rope_dim: int = 0  # rotated dims of global layers as stored (informational; rope_freqs decides)
    rope_dim_swa: int = 0
    rms_eps: float = 1e-6
    softcap: float = 30.0
    canvas_length: int = 256
    context_length: int = 262144

    def is_swa(self, il: int) -> bool:
        return self.swa_layers[il]

    def layer_head_dim(self, il: int) -> int:
        return self.head_dim_swa if self.swa_layers[il] else self.head_dim

    @property
    def n_global(self) -> int:
        return sum(1 for s in self.swa_layers if not s)


def full_26b_a4b() -> HParams:
    """Hyper-parameters of the released google/diffusiongemma-26B-A4B-it."""
    swa = tuple((i + 1) % 6 != 0 for i in range(30))
    return HParams(
        n_layer=30, n_embd=2816, n_vocab=262144, n_head=16,
        n_head_kv=tuple(8 if s else 2 for s in swa), head_dim=512, head_dim_swa=256,
        n_ff=2112, n_ff_exp=704, n_expert=128, n_expert_used=8, sliding_window=1024, swa_layers=swa,
        rope_dim=512, rope_dim_swa=256,
    )


# ---- metadata keys ------------------------------------------------------------------------------

def _k(name: str) -> str:
    return f"{ARCH}.{name}"


# (hparams field, key, required)
_KEYS: list[tuple[str, str, bool]] = [
    ("n_layer", _k("block_count"), True),
    ("context_length", _k("context_length"), True),
    ("n_embd", _k("embedding_length"), True),
    ("n_ff", _k("feed_forward_length"), True),
    ("n_ff_exp", _k("expert_feed_forward_length"), True),
    ("n_expert", _k("expert_count"), True),
    ("n_expert_used", _k("expert_used_count"), True),
    ("n_head", _k("attention.head_count"), True),
    ("n_head_kv", _k("attention.head_count_kv"), True),
    ("head_dim", _k("attention.key_length"), True),
    ("head_dim_swa", _k("attention.key_length_swa"), True),
    ("sliding_window", _k("attention.sliding_window"), True),
    ("swa_layers", _k("attention.sliding_window_pattern"), True),
    ("rms_eps", _k("attention.layer_norm_rms_epsilon"), True),
    ("rope_base", _k("rope.freq_base"), True),
    ("rope_base_swa", _k("rope.freq_base_swa"), False),
    ("rope_dim", _k("rope.dimension_count"), False),
    ("rope_dim_swa", _k("rope.dimension_count_swa"), False),
    ("softcap", _k("final_logit_softcapping"), False),
    ("canvas_length", "diffusion.canvas_length", True),
]  # the sampler's diffusion.eb_* keys: sampler.SamplerSettings

def metadata_key(field: str) -> str:
    """The GGUF key that stores HParams field `field`, e.g. 'n_layer' -> 'diffusion-gemma.block_count'."""
    return next(k for f, k, _ in _KEYS if f == field)


# Keys whose value must equal another's (the loader of the reference fork throws otherwise).
_EQUAL_KEYS = [
    (_k("attention.value_length"), _k("attention.key_length")),
    (_k("attention.value_length_swa"), _k("attention.key_length_swa")),
]


def hparams_from_metadata(md: Mapping[str, Any], n_vocab: int | None = None) -> tuple[HParams | None, list[str]]:
    """Read hyper-parameters from GGUF key/values; returns (hparams or None, list of problems)."""
    problems: list[str] = []
    arch = md.get("general.architecture")
    if arch != ARCH:
        return None, [f"general.architecture is {arch!r}, expected {ARCH!r} (this is not a DiffusionGemma file)"]
    vals: dict[str, Any] = {}
    for field, key, required in _KEYS:
        if key in md:
            vals[field] = md[key]
        elif required:
            problems.append(f"missing required key {key}")
    for a, b in _EQUAL_KEYS:
        if a in md and b in md and md[a] != md[b]:
            problems.append(f"{a}={md[a]} differs from {b}={md[b]}")
    problems += sampler.metadata_problems(md)  # so that a file which loads has usable sampler defaults
    if n_vocab is None:
        toks = md.get("tokenizer.ggml.tokens")
        n_vocab = len(toks) if isinstance(toks, list) else None
    if n_vocab is None:
        problems.append("missing tokenizer.ggml.tokens (vocabulary size unknown)")
    if problems:
        return None, problems
    vals["n_vocab"] = n_vocab
    n_layer = int(vals["n_layer"])
    for field in ("n_head_kv", "swa_layers"):
        v = vals[field]
        if not isinstance(v, list):
            v = [v] * n_layer
        if len(v) != n_layer:
            problems.append(f"{field} has {len(v)} entries, expected block_count={n_layer}")
        vals[field] = tuple(bool(x) if field == "swa_layers" else int(x) for x in v)
    ints = {"n_vocab", "n_layer", "n_embd", "n_head", "head_dim", "head_dim_swa", "n_ff", "n_ff_exp", "n_expert",
            "n_expert_used", "sliding_window", "rope_dim", "rope_dim_swa", "canvas_length", "context_length"}
    for f in dataclasses.fields(HParams):
        if f.name in vals and f.name not in ("n_head_kv", "swa_layers"):
            try:
                v = vals[f.name]
                # float32 keys come back as e.g. 0.4000000059604645: keep the value the writer meant
                vals[f.name] = int(v) if f.name in ints else float(f"{float(v):.7g}")
            except (TypeError, ValueError):
                problems.append(f"{f.name} has a non-numeric value {vals[f.name]!r}")
    if problems:
        return None, problems
    hp = HParams(**vals)
    problems += check_hparams(hp)
    return (hp if not problems else None), problems


def check_hparams(hp: HParams) -> list[str]:
    p = []
    for name in ("n_layer", "n_embd", "n_head", "head_dim", "head_dim_swa", "n_ff", "n_ff_exp", "n_expert",
                 "n_expert_used", "sliding_window", "canvas_length", "context_length", "n_vocab"):
        if getattr(hp, name) <= 0:
            p.append(f"{name} must be > 0 (got {getattr(hp, name)})")
    if hp.n_expert_used > hp.n_expert:
        p.append(f"expert_used_count {hp.n_expert_used} > expert_count {hp.n_expert}")
    for il, kv in enumerate(hp.n_head_kv):
        if kv <= 0 or hp.n_head % kv:
            p.append(f"layer {il}: head_count {hp.n_head} is not a multiple of head_count_kv {kv}")
    if hp.swa_layers and hp.swa_layers[-1]:
        p.append("the last layer must be a global (full-attention) layer")
    if hp.head_dim % 2 or hp.head_dim_swa % 2:
        p.append("head dims must be even (NeoX rope pairs i with i+d/2)")
    return p


def hparams_to_metadata(hp: HParams) -> dict[str, Any]:
    """Key/values (without tokenizer) describing `hp`, as the published files store them."""
    md: dict[str, Any] = {"general.architecture": ARCH}
    for field, key, _ in _KEYS:
        v = getattr(hp, field)
        md[key] = list(v) if isinstance(v, tuple) else v
    md[_k("attention.value_length")] = hp.head_dim
    md[_k("attention.value_length_swa")] = hp.head_dim_swa
    md[_k("attention.shared_kv_layers")] = 0
    md[_k("embedding_length_per_layer_input")] = 0
    md[_k("attention.causal")] = False
    return md


# ---- tensors --------------------------------------------------------------------------------------

# Roles decide which stored types are acceptable.
VECTOR = "vector"  # norms, scales, rope_freqs: F32 only
ROUTER = "router"  # F32/F16/BF16 (never quantized by the recipes, but accepted if float)
MATRIX = "matrix"  # any float or quantized type whose block divides ne0
EMBED = "embed"  # token embedding: matrix rules


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order
    role: str
    layer: int | None = None


def tensor_specs(hp: HParams, fused_gate_up: bool = True) -> list[TensorSpec]:
    """Every tensor of the published layout, in the order the published files store them."""
    H, V, FF = hp.n_embd, hp.n_vocab, hp.n_ff
    out = [
        TensorSpec("token_embd.weight", (H, V), EMBED),
        TensorSpec("output_norm.weight", (H,), VECTOR),
        TensorSpec("rope_freqs.weight", (hp.head_dim // 2,), VECTOR),
        TensorSpec("self_cond_pre_norm.weight", (H,), VECTOR),
        TensorSpec("self_cond_gate.weight", (H, FF), MATRIX),
        TensorSpec("self_cond_up.weight", (H, FF), MATRIX),
        TensorSpec("self_cond_down.weight", (FF, H), MATRIX),
    ]
    for il in range(hp.n_layer):
        d, kv, E, FE = hp.layer_head_dim(il), hp.n_head_kv[il], hp.n_expert, hp.n_ff_exp
        q = hp.n_head * d

        def t(name: str, shape: tuple[int, ...], role: str, il: int = il) -> None:
            out.append(TensorSpec(f"blk.{il}.{name}", shape, role, il))

        t("attn_norm.weight", (H,), VECTOR)
        t("attn_q.weight", (H, q), MATRIX)
        t("attn_k.weight", (H, kv * d), MATRIX)
        if hp.is_swa(il):
            t("attn_v.weight", (H, kv * d), MATRIX)
        t("attn_output.weight", (q, H), MATRIX)
        t("attn_q_norm.weight", (d,), VECTOR)
        t("attn_k_norm.weight", (d,), VECTOR)
        t("post_attention_norm.weight", (H,), VECTOR)
        t("ffn_norm.weight", (H,), VECTOR)
        t("ffn_gate.weight", (H, FF), MATRIX)
        t("ffn_up.weight", (H, FF), MATRIX)
        t("ffn_down.weight", (FF, H), MATRIX)
        t("post_ffw_norm_1.weight", (H,), VECTOR)
        t("pre_ffw_norm_2.weight", (H,), VECTOR)
        t("post_ffw_norm_2.weight", (H,), VECTOR)
        t("post_ffw_norm.weight", (H,), VECTOR)
        t("ffn_gate_inp.weight", (H, E), ROUTER)
        t("ffn_gate_inp.scale", (H,), VECTOR)
        if fused_gate_up:
            t("ffn_gate_up_exps.weight", (H, 2 * FE, E), MATRIX)
        else:
            t("ffn_gate_exps.weight", (H, FE, E), MATRIX)
            t("ffn_up_exps.weight", (H, FE, E), MATRIX)
        t("ffn_down_exps.weight", (FE, H, E), MATRIX)
        t("ffn_down_exps.scale", (E,), VECTOR)
        t("layer_output_scale.weight", (1,), VECTOR)
        t("enc_layer_output_scale.weight", (1,), VECTOR)
    return out


_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def rope_freq_factors(hp: HParams, partial_rotary_factor: float = 0.25) -> list[float]:
    """Frequency factors of the global layers' proportional RoPE: 1 for rotated pairs, 1e30 (frozen) else."""
    n_rot = int(partial_rotary_factor * hp.head_dim) // 2
    return [1.0] * n_rot + [1e30] * (hp.head_dim // 2 - n_rot)


def check_hparams_or_raise(hp: HParams) -> HParams:
    problems = check_hparams(hp)
    if problems:
        raise GGUFError("invalid hyper-parameters:\n  " + "\n  ".join(problems))
    return hp


def fused_gate_up(names: Iterable[str]) -> bool:
    """Whether a file stores the experts' gate and up fused (ffn_gate_up_exps, as published) or split."""
    return "blk.0.ffn_gate_exps.weight" not in names
