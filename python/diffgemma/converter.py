"""Convert a Hugging Face `DiffusionGemmaForBlockDiffusion` checkpoint into a `diffusion-gemma` GGUF file.

The conversion streams: safetensors files are memory-mapped (their headers are parsed here, so bf16 needs no
torch), each tensor is converted on its own, in row chunks, and written before the next one is read. The
output appears under its final name only once it is complete; on any error or interrupt the partial file is
removed.

HF checkpoint → GGUF, in short (see `layout.tensor_specs` for the order and ggml shapes):

* the text weights live under `model.decoder.*` (the encoder's are tied to them and not stored); only the
  encoder's per-layer `layer_scalar` buffers are read from `model.encoder.language_model.layers.N.*`;
* ggml shapes are the numpy shapes reversed, so the bytes are copied without any transposition; the fused
  expert tensor `experts.gate_up_proj` [E, 2·I, H] (gate rows first) stays fused;
* `rope_freqs.weight` is generated (proportional RoPE of the full-attention layers);
* the vision tower and everything else under `model.encoder.*` is left out of the text file; `mmproj=` writes
  the tower to its own file (diffgemma.mmproj).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import TokenType

from . import ftypes, gguf_file, layout, outputs
from .errors import Error, GGUFError
from .sampler import SamplerSettings
from .tokenizer import VOCAB_MODEL

HF_ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"

# outtype → (ggml type of the matrices, llama ftype written as general.file_type)
OUTTYPES: dict[str, tuple[QT, int]] = {n: (QT[n.upper()], ftypes.FILE_TYPES[n].ftype)
                                       for n in ("f32", "f16", "bf16", "q8_0")}

_CONTROL_SCORE = -1000.0  # score stored for control tokens (the published files do the same)
_CHUNK_ELEMS = 1 << 23  # elements converted at once (32 MiB of float32)
_MAX_HEADER = 1 << 28  # sanity bound on a safetensors JSON header

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# HF rope defaults of DiffusionGemmaTextConfig (used when config.json has no rope_parameters)
_ROPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# GGUF per-layer tensor suffix → HF per-layer suffix (under model.decoder.layers.N.)
_LAYER_MAP: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "layer_output_scale.weight": "layer_scalar",
}

_GLOBAL_MAP: dict[str, str] = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "self_cond_pre_norm.weight": "self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": "self_conditioning.gate_proj.weight",
    "self_cond_up.weight": "self_conditioning.up_proj.weight",
    "self_cond_down.weight": "self_conditioning.down_proj.weight",
}

_DECODER = "model.decoder."
_ENCODER_TEXT = "model.encoder.language_model."


# ---- small JSON helpers ---------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise Error(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Error(f"{what} {path} is not valid JSON: {e}") from None


def _read_optional_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise Error(f"{what} {path} does not hold a JSON object")
    return data


def _num(d: Mapping[str, Any], key: str, default: Any, kind: type, what: str) -> Any:
    """d[key] converted to `kind` (int/float); `default` when absent or null."""
    v = d.get(key)
    if v is None:
        return default
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or (kind is int and v != int(v)):
        raise Error(f"{what}: {key} must be a number{' (integer)' if kind is int else ''}, got {v!r}")
    return kind(v)


# ---- hyper-parameters -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RopeInfo:
    partial_rotary_factor: float


def _merged_text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    tc = config.get("text_config") or {}
    if not isinstance(tc, dict):
        raise Error("config.json: text_config must be an object")
    merged = {k: v for k, v in config.items() if k != "text_config"}
    merged.update(tc)
    return merged


def _layer_types(cfg: Mapping[str, Any], n_layer: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        pattern = _num(cfg, "sliding_window_pattern", 6, int, "config.json")
        if pattern <= 0:
            raise Error("config.json: sliding_window_pattern must be > 0")
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer:
        raise Error(f"config.json: layer_types must list {n_layer} entries (num_hidden_layers)")
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")}, key=str)
    if bad:
        raise Error(f"config.json: unsupported layer types {bad}")
    types = list(types)
    types[-1] = "full_attention"  # transformers forces the last layer to be global
    return types


def _per_layer_overrides(cfg: Mapping[str, Any], types: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Per-layer geometry overrides, as transformers' DiffusionGemmaTextConfig resolves them."""
    plc = cfg.get("per_layer_config")
    if plc:
        if not isinstance(plc, dict):
            raise Error("config.json: per_layer_config must be an object")
        out: dict[int, dict[str, Any]] = {}
        for k, v in plc.items():
            try:
                il = int(k)
            except (TypeError, ValueError):
                raise Error(f"config.json: per_layer_config key {k!r} is not a layer index") from None
            if not isinstance(v, dict):
                raise Error(f"config.json: per_layer_config[{k!r}] must be an object")
            unknown = set(v) - {"head_dim", "num_key_value_heads", "num_attention_heads"}
            if unknown:
                raise Error(f"config.json: per_layer_config[{k!r}] overrides unsupported {sorted(unknown)}")
            out[il] = v
        return out
    # Released configs carry the two extra keys that __post_init__ turns into per_layer_config.
    overrides: dict[str, Any] = {"head_dim": _num(cfg, "global_head_dim", 512, int, "config.json")}
    n_global_kv = _num(cfg, "num_global_key_value_heads", None, int, "config.json")
    if n_global_kv is not None:
        overrides["num_key_value_heads"] = n_global_kv
    return {il: dict(overrides) for il, t in enumerate(types) if t == "full_attention"}


def _rope(cfg: Mapping[str, Any]) -> tuple[float, float, _RopeInfo]:
    rp = cfg.get("rope_parameters")
    if rp is None:
        rp = _ROPE_DEFAULTS
    if not isinstance(rp, dict) or "rope_type" in rp:
        raise Error("config.json: rope_parameters must map sliding_attention/full_attention to parameters")
    full = rp.get("full_attention") or _ROPE_DEFAULTS["full_attention"]
    swa = rp.get("sliding_attention") or _ROPE_DEFAULTS["sliding_attention"]
    what = "config.json rope_parameters"
    if not isinstance(full, dict) or not isinstance(swa, dict):
        raise Error(f"{what}: full_attention / sliding_attention must be objects")
    for lt, p in (("full_attention", full), ("sliding_attention", swa)):
        if _num(p, "factor", 1.0, float, what) != 1.0:
            raise Error(f"{what}: a scaling factor on {lt} is not supported")
    swa_partial = _num(swa, "partial_rotary_factor", 1.0, float, what)
    if swa.get("rope_type", "default") != "default" or swa_partial != 1.0:
        raise Error(f"{what}: sliding_attention must use plain (default, full-width) RoPE")
    ftype = full.get("rope_type", "default")
    prf = _num(full, "partial_rotary_factor", 1.0, float, what)
    if ftype not in ("proportional", "default") or (ftype == "default" and prf != 1.0):
        raise Error(f"{what}: full_attention rope_type {ftype!r} (partial {prf}) is not supported")
    if not 0.0 < prf <= 1.0:
        raise Error(f"{what}: partial_rotary_factor {prf} out of range")
    base = _num(full, "rope_theta", _ROPE_DEFAULTS["full_attention"]["rope_theta"], float, what)
    base_swa = _num(swa, "rope_theta", _ROPE_DEFAULTS["sliding_attention"]["rope_theta"], float, what)
    return base, base_swa, _RopeInfo(prf)


def sampler_from_hf(gen: Mapping[str, Any]) -> SamplerSettings:
    """The sampler settings of a parsed generation_config.json (written as the file's diffusion.eb_* keys); the
    reference default for each absent or null one."""
    what = "generation_config.json"
    vals: dict[str, Any] = {}
    for f in dataclasses.fields(SamplerSettings):
        *parents, key = f.metadata["hf"].split(".")  # entropy_bound sits in sampler_config
        d = gen
        for p in parents:
            d = d.get(p) or {}
            if not isinstance(d, dict):
                raise Error(f"{what}: {p} must be an object")
        v = _num(d, key, None, type(f.default), what)
        if v is not None:
            vals[f.name] = v
    try:
        return SamplerSettings(**vals)
    except Error as e:
        raise Error(f"{what}: {e}") from None


def hparams_from_hf(config: Mapping[str, Any]) -> tuple[layout.HParams, float]:
    """(hyper-parameters, partial rotary factor of the global layers) from a parsed config.json."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or HF_ARCHITECTURE not in archs:
        raise Error(f"config.json: architectures is {archs!r}; expected it to contain {HF_ARCHITECTURE!r}")
    cfg = _merged_text_config(config)
    what = "config.json"

    def req(key: str, *alts: str) -> int:
        for k in (key, *alts):
            v = _num(cfg, k, None, int, what)
            if v is not None:
                return int(v)
        raise Error(f"config.json lacks {key}")

    n_layer = req("num_hidden_layers")
    n_embd = req("hidden_size")
    n_vocab = req("vocab_size")
    n_head = req("num_attention_heads")
    n_head_kv_base = req("num_key_value_heads")
    head_dim_base = _num(cfg, "head_dim", None, int, what) or n_embd // max(n_head, 1)
    if cfg.get("tie_word_embeddings") is False or config.get("tie_word_embeddings") is False:
        raise Error("config.json: tie_word_embeddings=false (a separate lm_head) is not supported")
    if cfg.get("attention_bias"):
        raise Error("config.json: attention_bias=true is not supported (the layout has no biases)")
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise Error(f"config.json: hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    if cfg.get("use_bidirectional_attention") == "all":
        raise Error("config.json: use_bidirectional_attention='all' (bidirectional encoder) is not supported")

    types = _layer_types(cfg, n_layer)
    overrides = _per_layer_overrides(cfg, types)
    dims: dict[bool, set[int]] = {True: set(), False: set()}
    n_head_kv: list[int] = []
    for il, t in enumerate(types):
        o = overrides.get(il, {})
        where = f"config.json per_layer_config[{il}]"
        if _num(o, "num_attention_heads", n_head, int, where) != n_head:
            raise Error(f"{where} overrides num_attention_heads (not supported)")
        dims[t == "sliding_attention"].add(_num(o, "head_dim", head_dim_base, int, where))
        n_head_kv.append(_num(o, "num_key_value_heads", n_head_kv_base, int, where))
    for swa, ds in dims.items():
        if len(ds) > 1:
            kind = "sliding" if swa else "full"
            raise Error(f"config.json: {kind} layers have different head dims {sorted(ds)}")
    head_dim = dims[False].pop()
    head_dim_swa = dims[True].pop() if dims[True] else head_dim_base

    rope_base, rope_base_swa, rope = _rope(cfg)
    softcap = _num(cfg, "final_logit_softcapping", 30.0, float, what)
    hp = layout.HParams(
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_head=n_head,
        n_head_kv=tuple(n_head_kv),
        head_dim=head_dim,
        head_dim_swa=head_dim_swa,
        n_ff=req("intermediate_size"),
        n_ff_exp=req("moe_intermediate_size", "expert_intermediate_size"),
        n_expert=req("num_experts"),
        n_expert_used=req("top_k_experts", "num_experts_per_tok"),
        sliding_window=req("sliding_window"),
        swa_layers=tuple(t == "sliding_attention" for t in types),
        rope_base=rope_base,
        rope_base_swa=rope_base_swa,
        rope_dim=head_dim,
        rope_dim_swa=head_dim_swa,
        rms_eps=_num(cfg, "rms_norm_eps", 1e-6, float, what),
        softcap=softcap,
        canvas_length=_num(cfg, "canvas_length", 256, int, what),
        context_length=_num(cfg, "max_position_embeddings", 131072, int, what),
    )
    layout.check_hparams_or_raise(hp)
    return hp, rope.partial_rotary_factor


# ---- tokenizer ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizerData:
    """Everything the GGUF stores about the tokenizer."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: list[int] = dataclasses.field(default_factory=list)
    pad_id: int | None = None
    unk_id: int | None = None
    mask_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None

    def metadata(self) -> dict[str, Any]:
        md: dict[str, Any] = {
            "tokenizer.ggml.model": VOCAB_MODEL,
            "tokenizer.ggml.pre": "gemma4",
            "tokenizer.ggml.tokens": self.tokens,
            "tokenizer.ggml.scores": self.scores,
            "tokenizer.ggml.token_type": self.token_types,
            "tokenizer.ggml.add_space_prefix": False,
        }
        if self.merges:
            md["tokenizer.ggml.merges"] = self.merges
        for key, v in (("bos", self.bos_id), ("eos", self.eos_id), ("padding", self.pad_id),
                       ("unknown", self.unk_id), ("mask", self.mask_id)):
            if v is not None:
                md[f"tokenizer.ggml.{key}_token_id"] = v
        if self.add_bos is not None:
            md["tokenizer.ggml.add_bos_token"] = self.add_bos
        if self.add_eos is not None:
            md["tokenizer.ggml.add_eos_token"] = self.add_eos
        if self.chat_template:
            md["tokenizer.chat_template"] = self.chat_template
        if self.eos_ids:
            md["diffusion.eos_token_ids"] = self.eos_ids
        return md


class _PairsDict(dict):  # type: ignore[type-arg]
    """A JSON object that also remembers every (key, value) pair, duplicates included."""

    pairs: list[tuple[str, Any]]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _PairsDict:
    d = _PairsDict(pairs)
    d.pairs = pairs
    return d


def _token_content(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _id(v: Any) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _chat_template(hf_dir: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Error(f"cannot read {jinja}: {e}") from None
    ct = tok_cfg.get("chat_template")
    if isinstance(ct, str):
        return ct
    if isinstance(ct, list):  # [{"name": ..., "template": ...}, ...]
        named = {c.get("name"): c.get("template") for c in ct if isinstance(c, dict)}
        t = named.get("default") or next((v for v in named.values() if isinstance(v, str)), None)
        return t if isinstance(t, str) else None
    return None


def _post_processor_adds(tok: Mapping[str, Any], token_id: int | None) -> bool | None:
    pp = tok.get("post_processor")
    if not isinstance(pp, dict) or token_id is None:
        return None
    procs = pp.get("processors") if pp.get("type") == "Sequence" else [pp]
    for p in procs or []:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            for piece in p.get("single") or []:
                sp = piece.get("SpecialToken") if isinstance(piece, dict) else None
                if isinstance(sp, dict):
                    ids = (p.get("special_tokens") or {}).get(sp.get("id"), {}).get("ids") or []
                    if token_id in ids:
                        return True
            return False
    return None


def read_tokenizer(hf_dir: str | os.PathLike[str], n_vocab: int) -> TokenizerData:
    """Read tokenizer.json (a byte-fallback BPE) and friends into GGUF tokenizer data of exactly `n_vocab`
    tokens (padded with user-defined `<unusedN>` tokens when the tokenizer is smaller)."""
    d = Path(hf_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise Error(f"{d} has no tokenizer.json (needed for the GGUF vocabulary)")
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f, object_pairs_hook=_pairs_hook)
    except OSError as e:
        raise Error(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Error(f"{path} is not valid JSON: {e}") from None
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise Error(f"{path}: expected a BPE tokenizer model, found {kind!r}")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise Error(f"{path}: model.vocab must be an object")

    by_id: dict[int, str] = {}
    for content, tid in getattr(vocab, "pairs", list(vocab.items())):
        if not isinstance(tid, int) or tid < 0:
            raise Error(f"{path}: token {content!r} has an invalid id {tid!r}")
        by_id.setdefault(tid, content)
    added: dict[int, bool] = {}  # id → special
    for at in tok.get("added_tokens") or []:
        ok = isinstance(at, dict) and isinstance(at.get("id"), int) and isinstance(at.get("content"), str)
        if not ok:
            raise Error(f"{path}: malformed added_tokens entry {at!r}")
        by_id[at["id"]] = at["content"]
        added[at["id"]] = bool(at.get("special", False))
    n_tok = max(by_id) + 1 if by_id else 0
    if n_tok > n_vocab:
        raise Error(f"{path} defines {n_tok} tokens but config.json vocab_size is {n_vocab}")

    present = set(by_id.values())
    counter = 0

    def placeholder() -> str:
        nonlocal counter
        while f"<unused{counter}>" in present:
            counter += 1
        name = f"<unused{counter}>"
        present.add(name)
        return name

    unk_content = model.get("unk_token") if isinstance(model.get("unk_token"), str) else None
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(placeholder())
            types.append(TokenType.USER_DEFINED)
            continue
        tokens.append(t)
        if i in added:
            types.append(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED)
        elif _BYTE_TOKEN.match(t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    if unk_content is not None and unk_content in present:
        types[tokens.index(unk_content)] = TokenType.UNKNOWN
    scores = [_CONTROL_SCORE if ty == TokenType.CONTROL else 0.0 for ty in types]

    merges: list[str] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise Error(f"{path}: malformed merge {m!r}")

    tok_cfg = _read_optional_json(d / "tokenizer_config.json", "tokenizer config")
    gen = _read_optional_json(d / "generation_config.json", "generation config")
    cfg = _merged_text_config(_read_optional_json(d / "config.json", "model config"))
    first: dict[str, int] = {}
    for i, t in enumerate(tokens):
        first.setdefault(t, i)

    def by_name(key: str) -> int | None:
        c = _token_content(tok_cfg.get(key))
        return first.get(c) if c is not None else None

    def pick(*cands: int | None) -> int | None:
        return next((c for c in cands if c is not None), None)

    eos_list = gen.get("eos_token_id")
    eos_ids = [int(x) for x in (eos_list if isinstance(eos_list, list) else [eos_list])
               if isinstance(x, int) and not isinstance(x, bool)]
    data = TokenizerData(
        tokens=tokens,
        scores=scores,
        token_types=types,
        merges=merges,
        bos_id=pick(by_name("bos_token"), _id(gen.get("bos_token_id")), _id(cfg.get("bos_token_id"))),
        eos_id=pick(_id(eos_list), by_name("eos_token"), _id(cfg.get("eos_token_id"))),
        pad_id=pick(_id(gen.get("pad_token_id")), by_name("pad_token"), _id(cfg.get("pad_token_id"))),
        unk_id=pick(first.get(unk_content) if unk_content is not None else None, by_name("unk_token")),
        mask_id=pick(by_name("mask_token"), first.get("<mask>")),
        chat_template=_chat_template(d, tok_cfg),
    )
    data.eos_ids = eos_ids or ([data.eos_id] if data.eos_id is not None else [])
    add_bos = tok_cfg.get("add_bos_token")
    data.add_bos = add_bos if isinstance(add_bos, bool) else _post_processor_adds(tok, data.bos_id)
    add_eos = tok_cfg.get("add_eos_token")
    data.add_eos = add_eos if isinstance(add_eos, bool) else None
    for name, v in (("bos", data.bos_id), ("eos", data.eos_id), ("pad", data.pad_id), ("unk", data.unk_id),
                    ("mask", data.mask_id), *(("eos list", e) for e in data.eos_ids)):
        if v is not None and not 0 <= v < n_vocab:
            raise Error(f"{name} token id {v} is outside the vocabulary (size {n_vocab})")
    return data


# ---- safetensors (streaming, no torch) ----------------------------------------------------------------

_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 with << 16
    "F64": np.dtype("<f8"),
}


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
        if dtype in _ST_DTYPES and end - begin != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
            raise Error(f"{p}: tensor {name!r} has {end - begin} bytes, expected {shape} of {dtype}")
        out[name] = SourceTensor(name, p, dtype, shape, base + begin, end - begin)
    return out


def _checkpoint_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = _read_json(index, "safetensors index")
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


class _Mapper:
    """Memory-maps checkpoint files on demand."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap[Any, np.dtype[np.uint8]]] = {}

    def array(self, t: SourceTensor) -> np.ndarray[Any, Any]:
        mm = self._maps.get(t.path)
        if mm is None:
            mm = np.memmap(t.path, dtype=np.uint8, mode="r")
            self._maps[t.path] = mm
        return mm[t.offset:t.offset + t.nbytes].view(_ST_DTYPES[t.dtype]).reshape(t.shape)

    def close(self) -> None:
        for mm in self._maps.values():
            mmap_obj = getattr(mm, "_mmap", None)
            if mmap_obj is not None:
                try:
                    mmap_obj.close()
                except (BufferError, ValueError):
                    pass  # a view is still alive; the GC will release it
        self._maps.clear()


# ---- numeric conversion ------------------------------------------------------------------------------


def to_f32(a: np.ndarray[Any, Any], st_dtype: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A safetensors array (BF16 given as raw uint16 bits) as float32."""
    return gguf_file.bf16_bits_to_f32(a) if st_dtype == "BF16" else a.astype(np.float32)


def _out_row(ne0: int, qtype: QT) -> tuple[int, np.dtype[Any]]:
    """(items per output row, numpy dtype of the output array)"""
    if qtype == QT.F32:
        return ne0, np.dtype(np.float32)
    if qtype == QT.F16:
        return ne0, np.dtype(np.float16)
    if qtype == QT.BF16:
        return ne0, np.dtype(np.uint16)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return ne0 // block * size, np.dtype(np.uint8)


def convert_array(src: np.ndarray[Any, Any], st_dtype: str, qtype: QT) -> np.ndarray[Any, Any]:
    """Encode a source array (numpy order; BF16 given as raw uint16 bits) as `qtype`, row chunk by row chunk.
    Returns a 2-D array [rows, items per row] (bytes per row for block types)."""
    ne0 = src.shape[-1] if src.ndim else 1
    rows = src.reshape(-1, ne0)
    same = {("F32", QT.F32), ("F16", QT.F16), ("BF16", QT.BF16)}
    if (st_dtype, qtype) in same:
        return rows  # stored bytes are already what the GGUF wants
    n_row, dtype = _out_row(ne0, qtype)
    out = np.empty((rows.shape[0], n_row), dtype=dtype)
    step = max(1, _CHUNK_ELEMS // max(ne0, 1))
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = gguf_file.encode(to_f32(rows[i:i + step], st_dtype), qtype)
    return out


# ---- the conversion plan ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Planned:
    spec: layout.TensorSpec
    qtype: QT
    source: SourceTensor | None = None
    generated: np.ndarray[Any, Any] | None = None

    @property
    def np_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.spec.shape))

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.spec.shape) // block * size


def _source_candidates(spec: layout.TensorSpec) -> list[str]:
    name = spec.name
    if spec.layer is None:
        hf = _GLOBAL_MAP[name]
        return [_DECODER + hf] + ([_ENCODER_TEXT + hf] if not hf.startswith("self_conditioning") else [])
    suffix = name.split(".", 2)[2]
    il = spec.layer
    if suffix == "enc_layer_output_scale.weight":
        return [f"{_ENCODER_TEXT}layers.{il}.layer_scalar", f"model.encoder.layers.{il}.layer_scalar"]
    hf = _LAYER_MAP[suffix]
    cands = [f"{_DECODER}layers.{il}.{hf}"]
    if suffix != "layer_output_scale.weight":  # the encoder copy of the other weights is tied (identical)
        cands.append(f"{_ENCODER_TEXT}layers.{il}.{hf}")
    return cands


def stored_type(spec: layout.TensorSpec, outtype: str) -> QT:
    """The ggml type of a tensor in a file whose matrices are `outtype`: norms, scales and the router stay F32; a
    matrix whose rows are not whole blocks of the outtype is stored F16."""
    qtype = OUTTYPES[outtype][0]
    if spec.role in (layout.VECTOR, layout.ROUTER) or len(spec.shape) == 1:
        return QT.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if spec.shape[0] % block:
        return QT.F16
    return qtype


def plan_tensors(
    hp: layout.HParams, index: Mapping[str, SourceTensor], outtype: str, partial_rotary_factor: float
) -> list[_Planned]:
    """Match every tensor of the layout with its source, in layout order; raise GGUFError listing what is
    missing or misshapen."""
    plans: list[_Planned] = []
    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    for spec in layout.tensor_specs(hp):
        p = _Planned(spec, stored_type(spec, outtype))
        if spec.name == "rope_freqs.weight":
            p.generated = np.asarray(layout.rope_freq_factors(hp, partial_rotary_factor), dtype=np.float32)
            plans.append(p)
            continue
        cands = _source_candidates(spec)
        src = next((index[c] for c in cands if c in index), None)
        if src is None:
            missing.append(f"{spec.name} (from {cands[0]})")
            continue
        used.add(src.name)
        if src.shape != p.np_shape:
            mismatched.append(f"{src.name}: shape {list(src.shape)}, expected {list(p.np_shape)}")
        elif src.dtype not in _ST_DTYPES:
            mismatched.append(f"{src.name}: unsupported dtype {src.dtype}")
        p.source = src
        plans.append(p)
    # Decoder tensors nobody asked for mean config.json and the weights disagree (e.g. a v_proj on a layer
    # the config calls global): refuse rather than silently drop weights.
    unused = sorted(n for n in index if n.startswith(_DECODER) and n not in used)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint:\n  " + "\n  ".join(missing))
    if mismatched:
        problems.append("tensor(s) that do not match config.json:\n  " + "\n  ".join(mismatched))
    if unused:
        problems.append("checkpoint tensor(s) config.json does not account for:\n  " + "\n  ".join(unused))
    if problems:
        raise GGUFError("cannot convert this checkpoint: " + "\n".join(problems))
    return plans


# ---- metadata ---------------------------------------------------------------------------------------


def build_metadata(hp: layout.HParams, sampler: SamplerSettings, tok: TokenizerData, *, name: str,
                   outtype: str) -> dict[str, Any]:
    """All key/values of the output file, in the order they are written."""
    md: dict[str, Any] = {"general.architecture": layout.ARCH, "general.name": name}
    md.update(layout.hparams_to_metadata(hp))
    md.update(sampler.to_metadata())
    md["general.file_type"] = OUTTYPES[outtype][1]
    md["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    md.update(tok.metadata())
    return md


# ---- driver ------------------------------------------------------------------------------------------


def _progress(total: int, enabled: bool, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if enabled else True, leave=False)


def _resolve_out(hf_dir: Path, out: Path, outtype: str) -> Path:
    if out.is_dir():
        out = out / f"{hf_dir.resolve().name}-{outtype}.gguf"
    if not out.parent.is_dir():
        raise Error(f"output directory {out.parent} does not exist")
    return out


def convert(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    outtype: str = "bf16",
    progress: bool = True,
    mmproj: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face DiffusionGemma checkpoint directory into one `diffusion-gemma` GGUF file.

    outtype: "f32", "f16", "bf16" or "q8_0" for the matrices (norms, scales, rope_freqs and the router stay
    F32; a q8_0 matrix whose rows are not a multiple of 32 is stored F16). `out` may be a directory, in which
    case the file is named after the checkpoint. mmproj: also write the vision tower there, in llama.cpp's
    `gemma4v` mmproj layout (see diffgemma.mmproj.convert). An existing output (either) is an Error unless
    overwrite=True. Returns the path of the text file.
    """
    if outtype not in OUTTYPES:
        raise Error(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    d = Path(hf_dir)
    if not d.is_dir():
        raise Error(f"{d} is not a directory (expected a Hugging Face checkpoint)")
    if not (d / "config.json").is_file():
        raise Error(f"{d} has no config.json")
    config = _read_json(d / "config.json", "model config")
    if not isinstance(config, dict):
        raise Error(f"{d / 'config.json'} does not hold a JSON object")
    gen = _read_optional_json(d / "generation_config.json", "generation config")
    hp, prf = hparams_from_hf(config)
    sampler = sampler_from_hf(gen)
    tok = read_tokenizer(d, hp.n_vocab)
    plans = plan_tensors(hp, read_checkpoint_index(d), outtype, prf)
    out_path = outputs.check_new(_resolve_out(d, Path(out), outtype), overwrite)
    metadata = build_metadata(hp, sampler, tok, name=d.resolve().name, outtype=outtype)
    if mmproj is not None:
        from . import mmproj as vision_file

        if Path(mmproj).resolve() == out_path.resolve():
            raise Error("mmproj and the text output are the same file")
        outputs.check_new(mmproj, overwrite)
        vision_file.hparams_from_hf(config)  # a checkpoint without a usable tower fails before anything is written
    _write(out_path, metadata, plans, progress)
    if mmproj is not None:
        vision_file.convert(d, mmproj, outtype=outtype)
    return out_path


def _write(out_path: Path, metadata: Mapping[str, Any], plans: Sequence[_Planned], progress: bool) -> None:
    """Stream the planned tensors, one at a time, into a complete file (or none: see gguf_file.Writer)."""
    writer = gguf_file.Writer(out_path)
    writer.set_all(metadata)
    for p in plans:
        writer.add_tensor(p.spec.name, p.spec.shape, p.qtype)
    by_name = {p.spec.name: p for p in plans}
    mapper = _Mapper()
    bar = _progress(sum(p.nbytes for p in plans), progress, out_path.name)
    try:
        writer.write(lambda name: _encode(by_name[name], mapper), progress=None if bar is None else bar.update)
    except OSError as e:
        raise Error(f"writing {out_path} failed: {e.strerror or e}") from e
    finally:
        if bar is not None:
            bar.close()
        mapper.close()


def _encode(p: _Planned, mapper: _Mapper) -> np.ndarray[Any, Any]:
    """The bytes of one planned tensor (an array in its stored type)."""
    if p.generated is not None:
        return convert_array(p.generated, "F32", p.qtype)
    assert p.source is not None
    return convert_array(mapper.array(p.source), p.source.dtype, p.qtype)

