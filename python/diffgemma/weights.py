"""Typed weight records of a DiffusionGemma model, built once at load from the layout table.

`ModelWeights.build` walks `layout.tensor_specs` (the one list of tensor names): every tensor the layout
names must exist and land in a field of `LayerWeights` / `ModelWeights`, so a name missing from the file or
from these records is an Error at load, never a KeyError while a graph is built. Field names are the GGUF
names without `blk.N.` and `.weight` ("." -> "_" in the `.scale` names); a field typed float is a one-value
tensor read on the host (it goes into the graphs as a constant).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from . import layout
from .errors import GGUFError

Tensor = Any  # a `struct ggml_tensor *` (cffi)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerWeights:
    """The tensors of one decoder layer. attn_v is None on global (full-attention) layers, whose V is the raw
    K projection; the experts' gate and up are either fused (ffn_gate_up_exps) or split (ffn_gate_exps,
    ffn_up_exps), the others None."""

    attn_norm: Tensor
    attn_q: Tensor
    attn_k: Tensor
    attn_v: Tensor | None = None
    attn_output: Tensor
    attn_q_norm: Tensor
    attn_k_norm: Tensor
    post_attention_norm: Tensor
    ffn_norm: Tensor
    ffn_gate: Tensor
    ffn_up: Tensor
    ffn_down: Tensor
    post_ffw_norm_1: Tensor
    pre_ffw_norm_2: Tensor
    post_ffw_norm_2: Tensor
    post_ffw_norm: Tensor
    ffn_gate_inp: Tensor  # the router
    ffn_gate_inp_scale: Tensor
    ffn_gate_up_exps: Tensor | None = None
    ffn_gate_exps: Tensor | None = None
    ffn_up_exps: Tensor | None = None
    ffn_down_exps: Tensor
    ffn_down_exps_scale: Tensor
    layer_output_scale: float  # decoder
    enc_layer_output_scale: float  # encoder


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelWeights:
    """Every tensor of a text model: the global ones and one LayerWeights per layer."""

    token_embd: Tensor  # also the tied LM head
    output_norm: Tensor
    rope_freqs: Tensor  # proportional RoPE of the global layers
    self_cond_pre_norm: Tensor
    self_cond_gate: Tensor
    self_cond_up: Tensor
    self_cond_down: Tensor
    layers: tuple[LayerWeights, ...]

    @classmethod
    def build(cls, hp: layout.HParams, tensors: Mapping[str, Tensor],
              scalar: Callable[[str], float]) -> ModelWeights:
        """The records of `tensors` (ggml tensors by GGUF name) for the layout of `hp`; scalar(name) reads a
        one-value tensor on the host. Every missing, unexpected or unplaceable name is listed in one Error."""
        specs = layout.tensor_specs(hp, fused_gate_up=layout.fused_gate_up(tensors))
        problems = [f"unexpected tensor {n}" for n in sorted(set(tensors) - {s.name for s in specs})]
        top: dict[str, Any] = {}
        per_layer: list[dict[str, Any]] = [{} for _ in range(hp.n_layer)]
        named: dict[str, set[str]] = {cls.__name__: {"layers"}, LayerWeights.__name__: set()}  # fields the layout fills
        for s in specs:
            record, values = (cls, top) if s.layer is None else (LayerWeights, per_layer[s.layer])
            name = field_name(s.name)
            named[record.__name__].add(name)
            if name not in _fields(record):
                problems.append(f"{s.name}: no field {name!r} in {record.__name__}")
            elif s.name not in tensors:
                problems.append(f"missing tensor {s.name}")
            else:
                values[name] = scalar(s.name) if _fields(record)[name] == "float" else tensors[s.name]
        for record in (cls, LayerWeights):
            for name in _required(record) - named[record.__name__]:
                problems.append(f"{record.__name__}.{name}: the layout names no tensor for it")
        if problems:
            raise GGUFError(f"{len(problems)} problem(s) with the weights:\n  " + "\n  ".join(problems))
        return cls(**top, layers=tuple(LayerWeights(**v) for v in per_layer))


@functools.cache
def _fields(record: type) -> dict[str, str]:
    """Field name -> annotation (a string: this module postpones annotations)."""
    return {f.name: f.type for f in dataclasses.fields(record)}


@functools.cache
def _required(record: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(record) if f.default is dataclasses.MISSING)


def field_name(gguf_name: str) -> str:
    """The record field of a GGUF tensor name: 'blk.3.attn_q.weight' -> 'attn_q', 'blk.3.ffn_gate_inp.scale' ->
    'ffn_gate_inp_scale', 'self_cond_gate.weight' -> 'self_cond_gate'."""
    stem = re.sub(r"^blk\.\d+\.", "", gguf_name)
    return stem.removesuffix(".weight").replace(".", "_")


# ---- products: graph nodes named after the weight they multiply ---------------------------------------

def product_name(weight_name: str) -> str:
    """The graph node name of `weight_name`'s product (llama.cpp's "<name>-<layer>" scheme):
    'blk.3.attn_q.weight' -> 'attn_q-3', 'self_cond_gate.weight' -> 'self_cond_gate'."""
    il = layout.layer_of(weight_name)
    return field_name(weight_name) + ("" if il is None else f"-{il}")


_PRODUCT_RE = re.compile(r"^([a-z0-9_]+?)(?:-(\d+))?$")


@functools.cache
def _matrices() -> tuple[frozenset[str], frozenset[str]]:
    """(layer fields, global fields) whose tensors are multiplied (matrix and router roles in the layout)."""
    hp = layout.full_26b_a4b()
    layer, top = set(), set()
    for fused in (True, False):
        for s in layout.tensor_specs(hp, fused_gate_up=fused):
            if s.role in (layout.MATRIX, layout.ROUTER):
                (top if s.layer is None else layer).add(field_name(s.name))
    return frozenset(layer), frozenset(top)


def weight_of_product(node_name: str) -> str | None:
    """The GGUF name of the matrix whose product node is called `node_name` ('attn_q-3' ->
    'blk.3.attn_q.weight'), or None for any other node (norms, activations, views, the LM head)."""
    m = _PRODUCT_RE.match(node_name)
    if m is None:
        return None
    layer, top = _matrices()
    name, il = m.group(1), m.group(2)
    if il is not None and name in layer:
        return f"blk.{il}.{name}.weight"
    if il is None and name in top:
        return f"{name}.weight"
    return None
