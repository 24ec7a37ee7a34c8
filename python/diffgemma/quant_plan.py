"""Each tensor's fate in a quantization: its output name (--prune-layers), its output type (the file type's
mixture, the rules, the shape fallback), its importance weights, and the notes and refusals these lead to.

Norms, scales, rope_freqs and the MoE router are never quantized (kept as stored, F32 in published files).
When a type's block does not divide a tensor's row length, the type falls back as llama-quantize does
(Q5_K->Q5_1, Q4_K->Q5_0, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, IQ*->IQ4_NL, then F16) and the report records it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gguf import LlamaFileType as FT

from . import binding as B
from . import ftypes, gguf_file, layout
from . import imatrix_file as imx
from .binding import type_name as _tn
from .errors import Error
from .quant_recipes import TYPE_IDS, Rule, Spec

_lib, _ffi = B.lib, B.ffi


@dataclasses.dataclass
class Plan:
    """One source tensor's place in the output: its name there, its role, the type asked for and the type used."""

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


def shape_fallback(t: int, ne0: int) -> tuple[int, str | None]:
    """The type usable for rows of `ne0` values, and why it differs from `t` (None if it does not)."""
    new = TYPE_IDS[ftypes.shape_fallback(_tn(t), ne0)]
    if new == t:
        return t, None
    return new, f"row length {ne0} is not a multiple of the {_tn(t)} block ({_lib.ggml_blck_size(t)})"


def ftype_for(plans: list[Plan]) -> int:
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


def pruned_names(names: Sequence[str], hp: layout.HParams, prune_layers: Sequence[int] | None
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


def choose(gf: gguf_file.GGUFFile, hp: layout.HParams, out_names: dict[str, str], spec: Spec,
            ovr: list[Rule], token_embedding_type: int | None, output_tensor_type: int | None, pure: bool,
            has_imatrix: bool) -> list[Plan]:
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
            chosen[info.name] = (TYPE_IDS[c.wanted], TYPE_IDS[c.type], c.why)
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
            chosen[info.name] = (wanted, shape_fallback(wanted, info.shape[0])[0], rule)
    plans = []
    for info in kept:
        wanted, dst, rule = chosen.get(info.name, (info.type, info.type, roles[info.name]))
        plans.append(Plan(info, out_names[info.name], roles[info.name], wanted, dst, rule))
    return plans


def filter_imatrix(imat: imx.ImatrixData | None, include: Sequence[str] | None,
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


def kv_overrides(override_kv: Any) -> dict[str, Any]:
    if override_kv is None:
        return {}
    if isinstance(override_kv, Mapping):
        return dict(override_kv)
    if isinstance(override_kv, str | bytes):
        raise Error(f"override_kv takes a list of KEY=TYPE:VALUE strings or a mapping, got {override_kv!r}")
    return dict(parse_kv_override(o) for o in override_kv)


def output_metadata(gf: gguf_file.GGUFFile, hp_out: layout.HParams, pruned: bool,
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


def attach_imatrix(plans: list[Plan], imat: imx.ImatrixData | None, file_type: ftypes.FileType | None,
                    require_imatrix: bool, dry_run: bool, notes: list[str]
                    ) -> tuple[list[str], dict[str, float]]:
    """Give each quantized tensor its importance weights; refuse (warn in a dry run) where a type needs
    them and there are none. Returns the tensors without data and the partial expert coverage."""
    no_imatrix: list[str] = []
    partial: dict[str, float] = {}
    missing: list[Plan] = []
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


def flag_notes(plans: list[Plan], spec: Spec, ovr: list[Rule], leave_output_tensor: bool) -> list[str]:
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


def refuse_requantize(plans: list[Plan], allow_requantize: bool) -> None:
    """An Error when a quantized tensor would be converted to another type and that is not allowed (or not
    possible: a type without a dequantizer)."""
    refused = [p for p in plans if not p.copy and _lib.ggml_is_quantized(p.info.type)
               and (not allow_requantize or _lib.ggml_get_type_traits(p.info.type).to_float == _ffi.NULL)]
    if refused:
        ex = ", ".join(f"{p.info.name} ({p.info.type_name}->{_tn(p.dst)})" for p in refused[:3])
        msg = f"{len(refused)} tensor(s) would be requantized from an already quantized type, e.g. {ex}; "
        raise Error(msg + "pass allow_requantize=True (quality suffers) or start from an f16/bf16/f32 file",
                    cli=msg + "drop --no-requantize (quality suffers) or start from an f16/bf16/f32 file")

