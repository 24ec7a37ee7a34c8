"""The Gemma-4 vision tower's `gemma4v` mmproj GGUF (llama.cpp's layout): keys, tensor inventory, validation,
writing, and the loaded tower (weights on the text model's backends, one graph per image size).

See ../shared/spec/vision.md §4. Shapes are in ggml order (ne0 first). Facts the llama.cpp layout does not store
(RoPE theta, the pooling kernel, the bidirectional image block in the text encoder) are the architecture's
constants or our own extra keys, which llama.cpp ignores.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import binding as B
from . import gguf_file
from .converter import OUTTYPES, read_checkpoint_index, to_f32
from .errors import Error, GGUFError
from .gguf_file import GGUFFile, Writer

_lib, _ffi = B.lib, B.ffi

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


# ---- the loaded tower ------------------------------------------------------------------------------

class Tower:
    """A gemma4v tower loaded next to a text model: its weights on the model's backends, its own scheduler,
    one cached graph per image grid."""

    def __init__(self, path: str | os.PathLike, *, backends: list[Any], gpu_dev: Any):
        from .vision import build_encoder  # the graph module

        self._build = build_encoder
        self.path = pathlib.Path(path)
        self._file = gguf_file.read(self.path)
        self.hparams = validate(self._file)
        self.metadata = self._file.metadata
        self._bufs: list[Any] = []
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = _ffi.from_buffer(self._mmap)
        infos = list(self._file.tensors.values())
        self._ctx = B.ggml_context(_lib.ggml_tensor_overhead() * (len(infos) + 8))
        self.weights, buf = B.map_weights(self._ctx, infos, self._base, len(self._mmap), gpu_dev,
                                          oom="not enough GPU memory for the vision tower")
        self._bufs.append(buf)
        # Clamp bounds and layer scalars are graph constants read on the host (infinite bounds: no clamp).
        self.scalars = {i.name: float(self._host(i.name)[0]) for i in infos
                        if i.name.endswith(BOUNDS) or i.name.endswith(".out_scale.weight")}
        self._backends = _ffi.new("ggml_backend_t[]", backends)
        self.sched = _lib.ggml_backend_sched_new(self._backends, _ffi.NULL, len(backends), 8192, False, True)
        self._graph: tuple[tuple[int, int], Any, dict[str, Any]] | None = None
        self.flash = True
        self._closed = False

    def _host(self, name: str) -> np.ndarray:
        info = self._file.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.float32, count=info.nbytes // 4, offset=info.offset)

    def encode(self, patches: np.ndarray, cols: int, rows: int) -> np.ndarray:
        """Projected embeddings [n_tokens, n_proj] of one image's patches [rows*cols, 3 p^2] (HF layout: raster
        pixels with interleaved RGB inside each patch, values in [0, 1], patches in row-major order)."""
        hp = self.hparams
        p = hp.patch_size
        if cols % hp.pool or rows % hp.pool:
            raise Error(f"the patch grid {cols}x{rows} is not a multiple of the pooling kernel {hp.pool}")
        if cols > hp.n_pos or rows > hp.n_pos:
            raise Error(f"the patch grid {cols}x{rows} exceeds the position tables ({hp.n_pos})")
        if patches.shape != (rows * cols, 3 * p * p):
            raise Error(f"patches must have shape {(rows * cols, 3 * p * p)}, got {patches.shape}")
        key = (cols, rows)
        if self._graph is None or self._graph[0] != key:
            if self._graph is not None:
                self._graph[1].free()
                self._graph = None
            from .graph import Ctx

            _lib.ggml_backend_sched_reset(self.sched)
            g = Ctx(8192)
            io = self._build(g, self.weights, hp, self.scalars, cols, rows, self.flash)
            if not _lib.ggml_backend_sched_alloc_graph(self.sched, g.graph):
                g.free()
                raise Error("ggml could not allocate the vision graph (out of memory?)")
            self._graph = (key, g, io)
        _, g, io = self._graph
        # The kernel's flattening is channel-major (C, H, W inside a patch): the llama.cpp conv layout.
        chw = np.ascontiguousarray(patches.reshape(-1, p, p, 3).transpose(0, 3, 1, 2), dtype=np.float32)
        n = rows * cols
        _set(io["pixels"], chw)
        _set(io["pos_x"], np.tile(np.arange(cols, dtype=np.int32), rows))
        _set(io["pos_y"], np.repeat(np.arange(rows, dtype=np.int32), cols))
        if _lib.ggml_backend_sched_graph_compute(self.sched, g.graph) != 0:
            raise Error("ggml vision graph computation failed")
        out = np.empty((n // hp.pool ** 2, hp.n_proj), dtype=np.float32)
        _lib.ggml_backend_tensor_get(io["out"], _ffi.from_buffer(out), 0, out.nbytes)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._graph is not None:
            self._graph[1].free()
        _lib.ggml_backend_sched_free(self.sched)
        for buf in self._bufs:
            _lib.ggml_backend_buffer_free(buf)
        _lib.ggml_free(self._ctx)
        del self._base
        self._mmap.close()


def _set(t: Any, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(arr), 0, arr.nbytes)


# ---- conversion from a Hugging Face checkpoint -------------------------------------------------------

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


_FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class _HFWeights(Mapping[str, np.ndarray]):
    """The gemma4v tensors of a checkpoint in numpy order, read (and transformed) one at a time."""

    def __init__(self, hp: VisionHParams, sources: Mapping[str, Any]):
        self.hp, self.sources = hp, sources
        prefixes = {"tower": _TOWER_PREFIXES, "embed": _EMBED_PREFIXES}
        self.names: dict[str, Any] = {}
        missing = []
        for spec in tensor_specs(hp):
            rel, part = hf_names(hp)[spec.name]
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
        if src.dtype not in _FLOAT_DTYPES:
            raise Error(f"{src.name}: dtype {src.dtype} is not a float type")
        raw = np.memmap(src.path, dtype=np.uint8, mode="r", offset=src.offset, shape=(src.nbytes,))
        a = raw.view(_FLOAT_DTYPES[src.dtype])
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
    import json

    d = pathlib.Path(hf_dir)
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Error(f"cannot read {d / 'config.json'}: {e}") from e
    hp = hparams_from_hf(config)
    weights = _HFWeights(hp, read_checkpoint_index(d))
    outtype = "f16" if outtype == "bf16" else outtype  # as llama.cpp's converter: its conv path wants f16/f32
    return write(out, hp, weights, wtype=outtype, name=d.resolve().name + "-mmproj")
