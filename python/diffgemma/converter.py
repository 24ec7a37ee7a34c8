"""Convert a Hugging Face `DiffusionGemmaForBlockDiffusion` checkpoint into a `diffusion-gemma` GGUF file.

The conversion streams: safetensors files are memory-mapped (diffgemma.checkpoint parses their headers, so
bf16 needs no torch), each tensor is converted on its own, in row chunks, and written before the next one is
read. The output appears under its final name only once it is complete; on any error or interrupt the partial
file is removed.

HF checkpoint → GGUF, in short (see `layout.tensor_specs` for the order and ggml shapes):

* the text weights live under `model.decoder.*` (the encoder's are tied to them and not stored); only the
  encoder's per-layer `layer_scalar` buffers are read from `model.encoder.language_model.layers.N.*`;
* ggml shapes are the numpy shapes reversed, so the bytes are copied without any transposition; the fused
  expert tensor `experts.gate_up_proj` [E, 2·I, H] (gate rows first) stays fused;
* `rope_freqs.weight` is generated (proportional RoPE of the full-attention layers);
* the vision tower and everything else under `model.encoder.*` is left out of the text file; `mmproj=` writes
  the tower to its own file (diffgemma.vision_convert).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import gguf_file, layout, outputs, vision_convert
from .checkpoint import (
    OUTTYPES,
    ST_DTYPES,
    Mapper,
    SourceTensor,
    merged_text_config,
    number,
    read_checkpoint_index,
    read_config,
    read_optional_json,
    to_f32,
)
from .errors import Error, GGUFError
from .hf_tokenizer import TokenizerData, read_tokenizer
from .sampler import SamplerSettings

HF_ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"

_CHUNK_ELEMS = 1 << 23  # elements converted at once (32 MiB of float32)

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


# ---- hyper-parameters -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RopeInfo:
    partial_rotary_factor: float


def _layer_types(cfg: Mapping[str, Any], n_layer: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        pattern = number(cfg, "sliding_window_pattern", 6, int, "config.json")
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
    overrides: dict[str, Any] = {"head_dim": number(cfg, "global_head_dim", 512, int, "config.json")}
    n_global_kv = number(cfg, "num_global_key_value_heads", None, int, "config.json")
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
        if number(p, "factor", 1.0, float, what) != 1.0:
            raise Error(f"{what}: a scaling factor on {lt} is not supported")
    swa_partial = number(swa, "partial_rotary_factor", 1.0, float, what)
    if swa.get("rope_type", "default") != "default" or swa_partial != 1.0:
        raise Error(f"{what}: sliding_attention must use plain (default, full-width) RoPE")
    ftype = full.get("rope_type", "default")
    prf = number(full, "partial_rotary_factor", 1.0, float, what)
    if ftype not in ("proportional", "default") or (ftype == "default" and prf != 1.0):
        raise Error(f"{what}: full_attention rope_type {ftype!r} (partial {prf}) is not supported")
    if not 0.0 < prf <= 1.0:
        raise Error(f"{what}: partial_rotary_factor {prf} out of range")
    base = number(full, "rope_theta", _ROPE_DEFAULTS["full_attention"]["rope_theta"], float, what)
    base_swa = number(swa, "rope_theta", _ROPE_DEFAULTS["sliding_attention"]["rope_theta"], float, what)
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
        v = number(d, key, None, type(f.default), what)
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
    cfg = merged_text_config(config)
    what = "config.json"

    def req(key: str, *alts: str) -> int:
        for k in (key, *alts):
            v = number(cfg, k, None, int, what)
            if v is not None:
                return int(v)
        raise Error(f"config.json lacks {key}")

    n_layer = req("num_hidden_layers")
    n_embd = req("hidden_size")
    n_vocab = req("vocab_size")
    n_head = req("num_attention_heads")
    n_head_kv_base = req("num_key_value_heads")
    head_dim_base = number(cfg, "head_dim", None, int, what) or n_embd // max(n_head, 1)
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
        if number(o, "num_attention_heads", n_head, int, where) != n_head:
            raise Error(f"{where} overrides num_attention_heads (not supported)")
        dims[t == "sliding_attention"].add(number(o, "head_dim", head_dim_base, int, where))
        n_head_kv.append(number(o, "num_key_value_heads", n_head_kv_base, int, where))
    for swa, ds in dims.items():
        if len(ds) > 1:
            kind = "sliding" if swa else "full"
            raise Error(f"config.json: {kind} layers have different head dims {sorted(ds)}")
    head_dim = dims[False].pop()
    head_dim_swa = dims[True].pop() if dims[True] else head_dim_base

    rope_base, rope_base_swa, rope = _rope(cfg)
    softcap = number(cfg, "final_logit_softcapping", 30.0, float, what)
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
        rms_eps=number(cfg, "rms_norm_eps", 1e-6, float, what),
        softcap=softcap,
        canvas_length=number(cfg, "canvas_length", 256, int, what),
        context_length=number(cfg, "max_position_embeddings", 131072, int, what),
    )
    layout.check_hparams_or_raise(hp)
    return hp, rope.partial_rotary_factor


# ---- numeric conversion ------------------------------------------------------------------------------


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
        elif src.dtype not in ST_DTYPES:
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
    `gemma4v` mmproj layout (see diffgemma.vision_convert.convert). An existing output (either) is an Error unless
    overwrite=True. Returns the path of the text file.
    """
    if outtype not in OUTTYPES:
        raise Error(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    d = Path(hf_dir)
    config = read_config(d)
    gen = read_optional_json(d / "generation_config.json", "generation config")
    hp, prf = hparams_from_hf(config)
    sampler = sampler_from_hf(gen)
    tok = read_tokenizer(d, hp.n_vocab)
    plans = plan_tensors(hp, read_checkpoint_index(d), outtype, prf)
    out_path = outputs.check_new(_resolve_out(d, Path(out), outtype), overwrite)
    metadata = build_metadata(hp, sampler, tok, name=d.resolve().name, outtype=outtype)
    if mmproj is not None:
        if Path(mmproj).resolve() == out_path.resolve():
            raise Error("mmproj and the text output are the same file")
        outputs.check_new(mmproj, overwrite)
        vision_convert.hparams_from_hf(config)  # a checkpoint without a usable tower fails before anything is written
    _write(out_path, metadata, plans, progress)
    if mmproj is not None:
        vision_convert.convert(d, mmproj, outtype=outtype)
    return out_path


def _write(out_path: Path, metadata: Mapping[str, Any], plans: Sequence[_Planned], progress: bool) -> None:
    """Stream the planned tensors, one at a time, into a complete file (or none: see gguf_file.Writer)."""
    writer = gguf_file.Writer(out_path)
    writer.set_all(metadata)
    for p in plans:
        writer.add_tensor(p.spec.name, p.spec.shape, p.qtype)
    by_name = {p.spec.name: p for p in plans}
    mapper = Mapper()
    bar = _progress(sum(p.nbytes for p in plans), progress, out_path.name)
    try:
        writer.write(lambda name: _encode(by_name[name], mapper), progress=None if bar is None else bar.update)
    except OSError as e:
        raise Error(f"writing {out_path} failed: {e.strerror or e}") from e
    finally:
        if bar is not None:
            bar.close()
        mapper.close()


def _encode(p: _Planned, mapper: Mapper) -> np.ndarray[Any, Any]:
    """The bytes of one planned tensor (an array in its stored type)."""
    if p.generated is not None:
        return convert_array(p.generated, "F32", p.qtype)
    assert p.source is not None
    return convert_array(mapper.array(p.source), p.source.dtype, p.qtype)
