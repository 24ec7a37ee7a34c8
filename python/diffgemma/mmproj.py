"""The Gemma-4 vision tower's `gemma4v` mmproj GGUF (llama.cpp's layout): keys, tensor inventory, validation,
description and writing. The tower's graph and runtime are diffgemma.vision; the conversion from a Hugging Face
checkpoint is diffgemma.vision_convert.

See ../shared/spec/vision.md §4. Shapes are in ggml order (ne0 first). Facts the llama.cpp layout does not store
(RoPE theta, the pooling kernel, the bidirectional image block in the text encoder) are the architecture's
constants or our own extra keys, which llama.cpp ignores.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import binding as B
from . import gguf_file
from .checkpoint import OUTTYPES
from .errors import Error, GGUFError
from .gguf_file import GGUFFile, Writer

_lib = B.lib

PROJECTOR = "gemma4v"
ROPE_THETA = 100.0  # not stored by llama.cpp's layout: the tower's constant
DEFAULT_POOL = 3
# Token ids of the released model (DiffusionGemmaConfig); files may override them with our keys below.
BOI_ID, IMAGE_ID, EOI_ID = 255999, 258880, 258882
BOI_TEXT, IMAGE_TEXT, EOI_TEXT = "<|image>", "<|image|>", "<image|>"

# The seven projections that carry ClippableLinear bounds, and the four bound names.
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down")
BOUNDS = ("input_min", "input_max", "output_min", "output_max")

# Our own keys (llama.cpp ignores unknown keys; `scale_factor` is the one it reads as the pooling kernel).
KEY_POOL = "clip.vision.projector.scale_factor"
KEY_HEAD_DIM = "diffgemma.vision.head_dim"
KEY_BIDIRECTIONAL = "diffgemma.vision.bidirectional_attention"
KEY_IDS = {"boi": "diffgemma.vision.boi_token_id", "image": "diffgemma.vision.image_token_id",
           "eoi": "diffgemma.vision.eoi_token_id"}

VECTOR, MATRIX, SCALAR = "vector", "matrix", "scalar"


@dataclasses.dataclass(frozen=True)
class VisionHParams:
    """Shapes and switches of a Gemma-4 vision tower (what the mmproj file says, or config.json's vision part)."""

    n_embd: int  # D, tower width
    n_ff: int  # F
    n_layer: int
    n_head: int
    head_dim: int
    n_proj: int  # projection output width = the text model's n_embd
    patch_size: int = 16
    n_pos: int = 10240  # rows of each position table
    pool: int = DEFAULT_POOL
    eps: float = 1e-6
    clipped: bool = False  # ClippableLinear bounds present
    standardize: bool = False  # std_bias / std_scale present
    bidirectional: bool = True  # the text encoder lets an image's soft tokens see each other
    boi_id: int | None = None  # None: look the token up in the text vocabulary
    image_id: int | None = None
    eoi_id: int | None = None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str


def tensor_specs(hp: VisionHParams) -> list[TensorSpec]:
    """Every tensor of the gemma4v layout, in the order llama.cpp's converter writes them."""
    D, F, p, q = hp.n_embd, hp.n_ff, hp.patch_size, hp.n_head * hp.head_dim
    out = [TensorSpec("mm.input_projection.weight", (D, hp.n_proj), MATRIX),
           TensorSpec("v.patch_embd.weight", (p, p, 3, D), MATRIX),
           TensorSpec("v.position_embd.weight", (D, hp.n_pos, 2), MATRIX)]
    if hp.standardize:
        out += [TensorSpec("v.std_bias", (D,), VECTOR), TensorSpec("v.std_scale", (D,), VECTOR)]
    shapes = {"attn_q": (D, q), "attn_k": (D, q), "attn_v": (D, q), "attn_out": (q, D),
              "ffn_gate": (D, F), "ffn_up": (D, F), "ffn_down": (F, D)}
    for il in range(hp.n_layer):
        b = f"v.blk.{il}."
        out.append(TensorSpec(b + "ln1.weight", (D,), VECTOR))
        for name in PROJECTIONS:
            out.append(TensorSpec(f"{b}{name}.weight", shapes[name], MATRIX))
            if hp.clipped:
                out += [TensorSpec(f"{b}{name}.{bound}", (1,), SCALAR) for bound in BOUNDS]
        out += [TensorSpec(b + "attn_q_norm.weight", (hp.head_dim,), VECTOR),
                TensorSpec(b + "attn_k_norm.weight", (hp.head_dim,), VECTOR),
                TensorSpec(b + "attn_post_norm.weight", (D,), VECTOR),
                TensorSpec(b + "ln2.weight", (D,), VECTOR),
                TensorSpec(b + "ffn_post_norm.weight", (D,), VECTOR)]
    return out


def metadata(hp: VisionHParams, name: str = "diffgemma-vision") -> dict[str, Any]:
    """Key/values of an mmproj file for `hp`: llama.cpp's gemma4v keys plus ours."""
    md: dict[str, Any] = {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.name": name,
        "clip.has_vision_encoder": True,
        "clip.vision.projector_type": PROJECTOR,
        "clip.vision.projection_dim": hp.n_proj,
        "clip.vision.image_size": 224,  # llama.cpp's converter writes this placeholder; the tower has no fixed size
        "clip.vision.patch_size": hp.patch_size,
        "clip.vision.embedding_length": hp.n_embd,
        "clip.vision.feed_forward_length": hp.n_ff,
        "clip.vision.block_count": hp.n_layer,
        "clip.vision.attention.head_count": hp.n_head,
        "clip.vision.attention.layer_norm_epsilon": hp.eps,
        "clip.vision.image_mean": [0.0, 0.0, 0.0],
        "clip.vision.image_std": [1.0, 1.0, 1.0],
        "clip.use_gelu": True,  # the tower's MLP is tanh-GELU; without this key llama.cpp uses quick-GELU
        KEY_POOL: hp.pool,
        KEY_HEAD_DIM: hp.head_dim,
        KEY_BIDIRECTIONAL: hp.bidirectional,
    }
    for role, key in KEY_IDS.items():
        v = getattr(hp, f"{role}_id")
        if v is not None:
            md[key] = int(v)
    return md


def _int(md: Mapping[str, Any], key: str, problems: list[str], default: int | None = None) -> int:
    v = md.get(key, default)
    if v is None:
        problems.append(f"missing required key {key}")
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        problems.append(f"{key} must be a positive integer, got {v!r}")
        return 0
    return int(v)


def hparams_from_file(gf: GGUFFile) -> tuple[VisionHParams | None, list[str]]:
    """Read a gemma4v tower's hyper-parameters from an mmproj file (head_dim, table size, clamps and
    standardize are inferred from the tensors when no key says them)."""
    md, ts = gf.metadata, gf.tensors
    if md.get("general.architecture") != "clip":
        return None, [f"general.architecture is {md.get('general.architecture')!r}, expected 'clip' (this is "
                      "not an mmproj file)"]
    ptype = md.get("clip.projector_type", md.get("clip.vision.projector_type"))
    if ptype != PROJECTOR:
        return None, [f"projector type is {ptype!r}, expected {PROJECTOR!r} (not a Gemma-4 vision tower)"]
    if md.get("clip.has_vision_encoder") is False:
        return None, ["clip.has_vision_encoder is false"]
    problems: list[str] = []
    D = _int(md, "clip.vision.embedding_length", problems)
    F = _int(md, "clip.vision.feed_forward_length", problems)
    L = _int(md, "clip.vision.block_count", problems)
    H = _int(md, "clip.vision.attention.head_count", problems)
    p = _int(md, "clip.vision.patch_size", problems)
    pool = _int(md, KEY_POOL, problems, DEFAULT_POOL)
    qn, pos, proj = ts.get("v.blk.0.attn_q_norm.weight"), ts.get("v.position_embd.weight"), ts.get(
        "mm.input_projection.weight")
    # The layout has no head_dim key: the q-norm's length is it (hidden / heads is wrong in general).
    head_dim = md.get(KEY_HEAD_DIM, qn.shape[0] if qn is not None else None)
    if head_dim is None:
        problems.append("cannot tell head_dim: no v.blk.0.attn_q_norm.weight")
    if pos is None or len(pos.shape) != 3:
        problems.append("missing tensor v.position_embd.weight (expected shape [D, n_pos, 2])")
    if proj is None or len(proj.shape) != 2:
        problems.append("missing tensor mm.input_projection.weight (expected shape [D, n_text_embd])")
    n_proj = _int(md, "clip.vision.projection_dim", problems, proj.shape[1] if proj is not None else None)
    eps = md.get("clip.vision.attention.layer_norm_epsilon", 1e-6)
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < 1:
        problems.append(f"clip.vision.attention.layer_norm_epsilon must be in (0, 1), got {eps!r}")
    bidir = md.get(KEY_BIDIRECTIONAL, True)
    ids = {}
    for role, key in KEY_IDS.items():
        v = md.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            problems.append(f"{key} must be a token id, got {v!r}")
            v = None
        ids[f"{role}_id"] = v
    if problems:
        return None, problems
    if head_dim % 4:
        problems.append(f"head_dim {head_dim} must be a multiple of 4 (2-D RoPE rotates pairs in two halves)")
    hp = VisionHParams(n_embd=D, n_ff=F, n_layer=L, n_head=H, head_dim=int(head_dim), n_proj=n_proj,
                       patch_size=p, n_pos=pos.shape[1], pool=pool, eps=float(f"{float(eps):.7g}"),
                       clipped="v.blk.0.attn_q.input_min" in ts, standardize="v.std_bias" in ts,
                       bidirectional=bool(bidir), **ids)
    return (hp if not problems else None), problems


def _type_ok(spec: TensorSpec, t: gguf_file.TensorInfo) -> str | None:
    if spec.role in (VECTOR, SCALAR):
        return None if t.type == int(QT.F32) else f"{t.name}: type {t.type_name} not allowed (must be f32)"
    if spec.name == "v.position_embd.weight":  # read with get_rows: float types only
        return None if t.type in gguf_file.FLOAT_TYPES else f"{t.name}: type {t.type_name} not allowed (f32/f16/bf16)"
    if not t.type_name or t.type in gguf_file.NOT_WEIGHT_TYPES:
        return f"{t.name}: type {t.type_name or t.type} cannot be a weight"
    if t.shape[0] % _lib.ggml_blck_size(t.type):
        return f"{t.name}: row length {t.shape[0]} is not a multiple of the {t.type_name} block"
    return None


def validate(gf: GGUFFile) -> VisionHParams:
    """Check keys and every tensor of an mmproj file; all problems in one GGUFError."""
    hp, problems = hparams_from_file(gf)
    if hp is None:
        raise GGUFError(f"{gf.path}: not a valid {PROJECTOR} mmproj file:\n  " + "\n  ".join(problems))
    expected = tensor_specs(hp)
    names = {s.name for s in expected}
    for spec in expected:
        t = gf.tensors.get(spec.name)
        if t is None:
            problems.append(f"missing tensor {spec.name} (expected shape {list(spec.shape)})")
        elif t.shape != spec.shape:
            problems.append(f"{spec.name}: shape {list(t.shape)}, expected {list(spec.shape)}")
        elif why := _type_ok(spec, t):
            problems.append(why)
    for name in gf.tensors:
        # out_scale: a per-layer output scalar some Gemma-4 towers have (llama.cpp multiplies by it)
        if name not in names and not name.endswith(".out_scale.weight"):
            problems.append(f"unexpected tensor {name}")
    if problems:
        raise GGUFError(f"{gf.path}: {len(problems)} problem(s) with this {PROJECTOR} mmproj file:\n  "
                        + "\n  ".join(problems))
    return hp


def describe(gf: GGUFFile, hp: VisionHParams) -> dict[str, Any]:
    """What `diffgemma info` shows for an mmproj file."""
    n_params = sum(math.prod(t.shape) for t in gf.tensors.values())
    return {"projector": PROJECTOR, "width": hp.n_embd, "layers": hp.n_layer, "heads": hp.n_head,
            "head_dim": hp.head_dim, "ffn": hp.n_ff, "patch_size": hp.patch_size, "pooling": hp.pool,
            "text_width": hp.n_proj, "clipped_linears": hp.clipped, "standardize": hp.standardize,
            "parameters": n_params, "tensors": gguf_file.census(t.type_name for t in gf.tensors.values())}


# ---- writing --------------------------------------------------------------------------------------

def stored_type(spec: TensorSpec, wtype: str) -> int:
    """The GGML type of a tensor in a file whose matrices are `wtype` (f32, f16, bf16, q8_0)."""
    if spec.role != MATRIX or spec.name == "v.position_embd.weight":
        return int(QT.F32)  # llama.cpp forces the position table to F32 too
    t = OUTTYPES[wtype][0]
    if t == QT.Q8_0 and (spec.shape[0] % 32 or spec.name == "v.patch_embd.weight"):
        t = QT.F16  # patch_embd is a conv kernel for llama.cpp (ne0 = patch size): float only
    return int(t)


def write(path: str | os.PathLike, hp: VisionHParams, weights: Mapping[str, np.ndarray], *, wtype: str = "f32",
          name: str = "diffgemma-vision") -> pathlib.Path:
    """Write an mmproj file from F32 arrays in numpy order (reversed ggml shape), keyed by GGUF name."""
    if wtype not in OUTTYPES:
        raise Error(f"mmproj type must be one of {', '.join(OUTTYPES)}, got {wtype!r}")
    w = Writer(path)
    w.set_all(metadata(hp, name))
    w.set("general.file_type", OUTTYPES[wtype][1])
    w.set("general.quantization_version", gguf.GGML_QUANT_VERSION)
    specs = tensor_specs(hp)
    types = {s.name: stored_type(s, wtype) for s in specs}
    for s in specs:
        w.add_tensor(s.name, s.shape, types[s.name])

    w.write(lambda n: gguf_file.encode(np.ascontiguousarray(weights[n], dtype=np.float32), types[n]))
    return pathlib.Path(path)
