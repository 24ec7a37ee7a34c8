"""The vision tower of a Hugging Face DiffusionGemma (or Gemma-4) checkpoint -> a `gemma4v` mmproj GGUF
(diffgemma.mmproj's layout). diffgemma.converter calls this for `convert(..., mmproj=OUT)`."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoint import ST_DTYPES, read_checkpoint_index, read_config, to_f32
from .errors import Error
from .mmproj import BOI_ID, BOUNDS, EOI_ID, IMAGE_ID, ROPE_THETA, VisionHParams, tensor_specs, write

# HF per-layer suffix (under <tower>.encoder.layers.N.) -> gemma4v suffix (under v.blk.N.)
_HF_LAYER = {
    "input_layernorm.weight": "ln1.weight",
    "self_attn.q_proj.linear": "attn_q",
    "self_attn.k_proj.linear": "attn_k",
    "self_attn.v_proj.linear": "attn_v",
    "self_attn.o_proj.linear": "attn_out",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "attn_post_norm.weight",  # the sandwich norm, not ln2
    "pre_feedforward_layernorm.weight": "ln2.weight",
    "mlp.gate_proj.linear": "ffn_gate",
    "mlp.up_proj.linear": "ffn_up",
    "mlp.down_proj.linear": "ffn_down",
    "post_feedforward_layernorm.weight": "ffn_post_norm.weight",
}
# Where the tower sits: DiffusionGemma nests it under the encoder, Gemma-4 at the top.
_TOWER_PREFIXES = ("model.encoder.vision_tower.", "model.vision_tower.")
_EMBED_PREFIXES = ("model.encoder.embed_vision.", "model.embed_vision.")


def hparams_from_hf(config: Mapping[str, Any]) -> VisionHParams:
    """The tower's hyper-parameters from a DiffusionGemma (or Gemma-4) config.json."""
    vc, tc = config.get("vision_config"), config.get("text_config", config)
    if not isinstance(vc, dict):
        raise Error("config.json has no vision_config: this checkpoint has no vision tower")

    def num(d: Mapping[str, Any], key: str, default: Any) -> Any:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise Error(f"config.json: {key} must be a number, got {v!r}")
        return v

    rope = vc.get("rope_parameters") or {}
    if isinstance(rope, dict) and float(rope.get("rope_theta", ROPE_THETA)) != ROPE_THETA:
        raise Error(f"vision rope_theta {rope.get('rope_theta')} is not supported (the gemma4v layout fixes 100)")
    if num(vc, "num_key_value_heads", num(vc, "num_attention_heads", 12)) != num(vc, "num_attention_heads", 12):
        raise Error("vision towers with grouped K/V heads are not supported by the gemma4v layout")
    return VisionHParams(
        n_embd=int(num(vc, "hidden_size", 768)), n_ff=int(num(vc, "intermediate_size", 3072)),
        n_layer=int(num(vc, "num_hidden_layers", 16)), n_head=int(num(vc, "num_attention_heads", 12)),
        head_dim=int(num(vc, "head_dim", 64)), n_proj=int(num(tc, "hidden_size", 2304)),
        patch_size=int(num(vc, "patch_size", 16)), n_pos=int(num(vc, "position_embedding_size", 10240)),
        pool=int(num(vc, "pooling_kernel_size", 3)), eps=float(num(vc, "rms_norm_eps", 1e-6)),
        clipped=bool(vc.get("use_clipped_linears", False)), standardize=bool(vc.get("standardize", False)),
        bidirectional=tc.get("use_bidirectional_attention") == "vision",
        boi_id=int(num(config, "boi_token_id", BOI_ID)), image_id=int(num(config, "image_token_id", IMAGE_ID)),
        eoi_id=int(num(config, "eoi_token_id", EOI_ID)))


def hf_names(hp: VisionHParams) -> dict[str, tuple[str, str]]:
    """GGUF name -> (HF name relative to the tower or embedder, 'tower' | 'embed')."""
    out = {"mm.input_projection.weight": ("embedding_projection.weight", "embed"),
           "v.patch_embd.weight": ("patch_embedder.input_proj.weight", "tower"),
           "v.position_embd.weight": ("patch_embedder.position_embedding_table", "tower"),
           "v.std_bias": ("std_bias", "tower"), "v.std_scale": ("std_scale", "tower")}
    for il in range(hp.n_layer):
        for hf, gg in _HF_LAYER.items():
            src = f"encoder.layers.{il}.{hf}"
            if hf.endswith(".linear"):
                out[f"v.blk.{il}.{gg}.weight"] = (src + ".weight", "tower")
                for bound in BOUNDS:
                    out[f"v.blk.{il}.{gg}.{bound}"] = (src[: -len(".linear")] + "." + bound, "tower")
            else:
                out[f"v.blk.{il}.{gg}"] = (src, "tower")
    return out


class _HFWeights(Mapping[str, np.ndarray]):
    """The gemma4v tensors of a checkpoint in numpy order, read (and transformed) one at a time."""

    def __init__(self, hp: VisionHParams, sources: Mapping[str, Any]):
        self.hp, self.sources = hp, sources
        prefixes = {"tower": _TOWER_PREFIXES, "embed": _EMBED_PREFIXES}
        self.names: dict[str, Any] = {}
        missing = []
        names = hf_names(hp)
        for spec in tensor_specs(hp):
            rel, part = names[spec.name]
            src = next((sources[p + rel] for p in prefixes[part] if p + rel in sources), None)
            if src is None:
                missing.append(f"{prefixes[part][0]}{rel}")
            elif math.prod(src.shape) != math.prod(spec.shape):
                missing.append(f"{src.name}: shape {list(src.shape)} does not fit {spec.name} {list(spec.shape)}")
            else:
                self.names[spec.name] = src
        if missing:
            raise Error("the checkpoint's vision tower does not match its config:\n  " + "\n  ".join(missing))

    def __getitem__(self, name: str) -> np.ndarray:
        src = self.names[name]
        if src.dtype not in ST_DTYPES:
            raise Error(f"{src.name}: dtype {src.dtype} is not a float type")
        raw = np.memmap(src.path, dtype=np.uint8, mode="r", offset=src.offset, shape=(src.nbytes,))
        a = raw.view(ST_DTYPES[src.dtype])
        a = to_f32(a, src.dtype)
        if name == "v.patch_embd.weight":  # (D, p*p*3) raster/RGB -> (D, 3, p, p): the conv kernel's OIHW
            p = self.hp.patch_size
            return a.reshape(-1, p, p, 3).transpose(0, 3, 1, 2)
        return a.reshape(-1) if src.shape == () else a.reshape(src.shape)

    def __iter__(self) -> Any:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def convert(hf_dir: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f16") -> pathlib.Path:
    """Write the vision tower of a Hugging Face DiffusionGemma (or Gemma-4) checkpoint as a gemma4v mmproj."""
    d = pathlib.Path(hf_dir)
    hp = hparams_from_hf(read_config(d))
    weights = _HFWeights(hp, read_checkpoint_index(d))
    outtype = "f16" if outtype == "bf16" else outtype  # as llama.cpp's converter: its conv path wants f16/f32
    return write(out, hp, weights, wtype=outtype, name=d.resolve().name + "-mmproj")
