"""llama-quantize's file types as recipes: the per-tensor choice of every one, on four layouts, checked against
types derived by hand from llama.cpp's rules (src/llama-quant.cpp of the pinned source) and against the
pinned libllama's own dry run (`llama_model_quantize`, what llama-quantize calls) on a gemma4-renamed copy."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import llama_reference as ref
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from diffgemma import Error, ftypes, gguf_file, layout, testing
from diffgemma import imatrix_file as imx
from diffgemma import quantizer as qz

LAYOUTS = {
    # the released model's tensors (a small vocabulary: the rules only look at token_embd's row length)
    "26b": dataclasses.replace(layout.full_26b_a4b(), n_vocab=512),
    # 6 layers, the last global (5 attn_v), 16 experts
    "mid": testing.tiny_hparams(n_embd=512, n_expert=16, n_ff=512, n_ff_exp=128, head_dim=64, head_dim_swa=64),
    # exactly 8 experts: llama.cpp's 8-expert rules
    "e8": testing.tiny_hparams(n_embd=512, n_expert=8, n_ff=512, n_ff_exp=256, head_dim=64, head_dim_swa=64),
    # a global layer first: layer 0's GQA ratio (4 heads : 1 kv head) is the one llama.cpp looks at
    "g1": testing.tiny_hparams(n_embd=256, n_layer=8, n_ff=256, n_ff_exp=256, head_dim=64, head_dim_swa=64,
                               swa_layers=(False,) + (True,) * 6 + (False,)),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftypes")
    out = {}
    for k, hp in LAYOUTS.items():
        p = testing.write_model(d / f"{k}.gguf", hp, wtype="f16", sparse=True)
        out[k] = (p, ref.gemma4_copy(p, d / f"{k}-gemma4.gguf"))
    return out


def _one_entry_imatrix(hp: layout.HParams) -> imx.ImatrixData:
    """An imatrix with one entry: enough for llama.cpp's "has an imatrix" rules."""
    return imx.ImatrixData({"blk.0.attn_q.weight": imx.Entry(np.ones((1, hp.n_embd)), np.ones(1, np.int64))})


def _types(path, recipe, imatrix=None, **kw) -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-imatrix warning of IQ dry runs
        r = qz.quantize(path, path.with_name("never.gguf"), recipe=recipe, imatrix=imatrix, dry_run=True, **kw)
    return {n: t for n, _, _, t in r.tensors}


# (layout, recipe, with imatrix, {tensor: type}) worked out from llama-quant.cpp by hand
EXPECTED = [
    # attn_v's "more bits" positions count attn_v tensors (25: global layers have none), not layers:
    # positions 0,1,2,5,8,...,20 and 21-24 are layers 0,1,2,6,9,...,24 and 25-28
    ("26b", "Q4_K_M", False, {
        "token_embd.weight": "q6_K", "blk.0.attn_v.weight": "q6_K", "blk.3.attn_v.weight": "q4_K",
        "blk.6.attn_v.weight": "q6_K", "blk.9.attn_v.weight": "q6_K", "blk.8.attn_v.weight": "q4_K",
        "blk.24.attn_v.weight": "q6_K", "blk.28.attn_v.weight": "q6_K", "blk.23.attn_k.weight": "q4_K",
        # ffn_down uses the layer number; 2112 and 704 columns fall back (q6_K->q8_0, q4_K->q5_0)
        "blk.5.ffn_down.weight": "q8_0", "blk.3.ffn_down.weight": "q5_0", "blk.2.ffn_down_exps.weight": "q8_0",
        "blk.4.ffn_down_exps.weight": "q5_0", "blk.4.ffn_gate_up_exps.weight": "q4_K",
        "self_cond_gate.weight": "q4_K", "self_cond_down.weight": "q5_0", "blk.0.ffn_gate_inp.weight": "f32"}),
    ("26b", "Q3_K_M", False, {
        "blk.0.attn_v.weight": "q5_K", "blk.1.attn_v.weight": "q5_K", "blk.2.attn_v.weight": "q4_K",
        "blk.0.ffn_down.weight": "q5_1", "blk.0.ffn_down_exps.weight": "q5_1", "blk.1.ffn_down.weight": "q5_0",
        "blk.7.attn_output.weight": "q4_K", "blk.7.attn_q.weight": "q3_K", "token_embd.weight": "q6_K"}),
    # very low bit: the embedding head q5_K, attn_v q4_K (>= 4 experts), and q2_K for the first n_layer/8 = 3
    # ffn_down tensors in llama.cpp's order (blk.0.ffn_down, blk.0.ffn_down_exps, blk.1.ffn_down)
    ("26b", "IQ2_XXS", True, {
        "token_embd.weight": "q5_K", "blk.0.attn_v.weight": "q4_K", "blk.0.ffn_down.weight": "q4_0",
        "blk.0.ffn_down_exps.weight": "q4_0", "blk.1.ffn_down.weight": "q4_0",
        "blk.1.ffn_down_exps.weight": "iq4_nl", "blk.7.attn_output.weight": "iq2_xxs",
        "blk.7.attn_q.weight": "iq2_xxs", "blk.7.ffn_gate_up_exps.weight": "iq2_xxs"}),
    ("26b", "IQ2_S", True, {  # IQ2_S's default type is iq2_xs
        "blk.7.attn_q.weight": "iq2_xs", "blk.7.attn_output.weight": "iq3_s", "blk.0.ffn_down.weight": "iq4_nl",
        "token_embd.weight": "q5_K"}),
    ("26b", "IQ3_XXS", False, {
        "blk.0.attn_v.weight": "iq3_s", "blk.0.attn_k.weight": "iq2_s", "blk.0.attn_q.weight": "iq2_s",
        "blk.2.ffn_down_exps.weight": "q5_0", "blk.3.ffn_down_exps.weight": "q4_0",
        "blk.0.attn_output.weight": "iq3_s", "token_embd.weight": "q5_K"}),
    ("26b", "IQ3_XXS", True, {"blk.0.attn_v.weight": "iq3_xxs", "blk.0.ffn_down_exps.weight": "iq4_nl"}),
    ("26b", "Q4_0", True, {"blk.2.ffn_down.weight": "q4_1", "blk.3.ffn_down.weight": "q4_0",
                           "token_embd.weight": "q6_K"}),
    ("26b", "Q4_0", False, {"blk.2.ffn_down.weight": "q4_0"}),
    ("26b", "IQ4_NL", False, {"token_embd.weight": "q6_K", "blk.2.ffn_down.weight": "q5_1",
                              "blk.3.ffn_down.weight": "iq4_nl", "blk.0.attn_v.weight": "iq4_nl"}),
    ("26b", "Q2_K_S", True, {"blk.2.ffn_down_exps.weight": "q5_0", "blk.3.ffn_down_exps.weight": "q4_0",
                             "blk.0.attn_v.weight": "q2_K"}),
    ("26b", "MXFP4_MOE", False, {"blk.0.ffn_gate_up_exps.weight": "mxfp4", "blk.0.ffn_down_exps.weight": "mxfp4",
                                 "blk.0.attn_q.weight": "q8_0", "token_embd.weight": "q8_0"}),
    ("26b", "asym-2bitexp", True, {
        "blk.0.ffn_gate_up_exps.weight": "iq2_s", "blk.0.ffn_down_exps.weight": "iq4_nl",
        "blk.0.attn_v.weight": "q5_K", "blk.0.ffn_down.weight": "q5_1", "token_embd.weight": "q6_K",
        "self_cond_up.weight": "q4_K", "self_cond_down.weight": "q5_0"}),
    # 5 attn_v: "more bits" positions 2 and 4 (layers 2 and 4); ffn_down by layer of 6: 2 and 5
    ("mid", "Q4_K_M", False, {
        "blk.2.attn_v.weight": "q6_K", "blk.4.attn_v.weight": "q6_K", "blk.0.attn_v.weight": "q4_K",
        "blk.3.attn_v.weight": "q4_K", "blk.2.ffn_down.weight": "q6_K", "blk.5.ffn_down.weight": "q6_K",
        "blk.4.ffn_down.weight": "q4_K", "blk.5.ffn_down_exps.weight": "q8_0", "blk.0.ffn_down_exps.weight": "q5_0"}),
    ("mid", "Q4_K_S", False, {"blk.3.attn_v.weight": "q5_K", "blk.4.attn_v.weight": "q4_K",
                              "blk.0.ffn_down.weight": "q4_K"}),
    ("e8", "Q4_K_M", False, {"blk.0.attn_v.weight": "q8_0", "blk.1.attn_k.weight": "q8_0",
                             "blk.5.attn_k.weight": "q8_0", "blk.3.attn_output.weight": "q5_K"}),
    ("e8", "IQ2_XS", True, {"blk.1.attn_k.weight": "q4_K", "blk.1.attn_output.weight": "q5_K"}),
    ("e8", "IQ3_M", False, {"blk.2.ffn_down.weight": "q4_K", "blk.1.ffn_down.weight": "iq3_s"}),
    # layer 0 is global: 4 heads on 1 kv head is GQA 4; the 6 attn_v start at layer 1
    ("g1", "Q2_K", False, {"blk.1.attn_v.weight": "q4_K", "blk.1.ffn_down.weight": "q3_K"}),
    ("g1", "IQ4_NL", False, {"blk.1.attn_v.weight": "q5_K"}),
    ("g1", "Q4_K_M", False, {"blk.3.attn_v.weight": "q6_K", "blk.6.attn_v.weight": "q6_K",
                             "blk.2.attn_v.weight": "q4_K", "blk.3.ffn_down.weight": "q6_K",
                             "blk.4.ffn_down.weight": "q4_K"}),
    ("g1", "IQ3_XS", False, {"blk.1.ffn_gate_up_exps.weight": "iq3_xxs", "blk.0.ffn_gate_up_exps.weight": "iq3_s",
                             "blk.7.ffn_gate_up_exps.weight": "iq3_s", "blk.1.attn_k.weight": "iq3_xxs"}),
]


@pytest.mark.parametrize("lay,recipe,with_imatrix,expected", EXPECTED,
                         ids=[f"{e[0]}-{e[1]}{'-imatrix' if e[2] else ''}" for e in EXPECTED])
def test_choices_derived_from_llama_rules(files, lay, recipe, with_imatrix, expected):
    got = _types(files[lay][0], recipe, _one_entry_imatrix(LAYOUTS[lay]) if with_imatrix else None)
    assert {n: got[n] for n in expected} == expected


# file types whose rules ask whether there is an imatrix (llama-quant.cpp's has_imatrix)
_IMATRIX_RULES = ("IQ3_XXS", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0")


def test_every_file_type_matches_libllama_on_every_layout(files):
    cases = [(lay, ft, False) for lay in LAYOUTS for ft in ftypes.FILE_TYPES.values()]
    cases += [(lay, ftypes.FILE_TYPES[n.lower()], True) for lay in LAYOUTS for n in _IMATRIX_RULES]
    jobs = [{"path": str(files[lay][1]), "ftype": ft.ftype,
             "imatrix": ["blk.0.attn_q.weight", LAYOUTS[lay].n_embd] if im else None} for lay, ft, im in cases]
    theirs = ref.dry_runs(jobs)
    for (lay, ft, im), llama in zip(cases, theirs, strict=True):
        ours = _types(files[lay][0], ft.name, _one_entry_imatrix(LAYOUTS[lay]) if im else None)
        assert len(ours) == len(llama), (lay, ft.name)
        diff = {n: (t, llama.get(n)) for n, t in ours.items() if llama.get(n) != t}
        assert not diff, f"{lay} {ft.name} imatrix={im}: ours vs libllama {diff}"


def test_flags_match_libllama(files):
    """--tensor-type (a match skips the mixture and its attn_v count), --token-embedding-type,
    --output-tensor-type (reaches the tied head), --pure and --prune-layers."""
    path, g4 = files["mid"]
    q = {n: int(QT[n.upper()]) for n in ("q8_0", "q5_K", "iq4_nl", "q4_0", "q3_K")}
    cases = [
        ("Q4_K_M", dict(overrides=[(r"blk\.0\.attn_v", "q8_0"), ("exps", "iq4_nl")]),
         dict(tensor_types=[[r"blk\.0\.attn_v", q["q8_0"]], ["exps", q["iq4_nl"]]])),
        ("Q4_K_M", dict(token_embedding_type="q4_0"), dict(token_embedding_type=q["q4_0"])),
        ("Q3_K_M", dict(output_tensor_type="q5_K"), dict(output_tensor_type=q["q5_K"])),
        ("Q4_K_M", dict(pure=True), dict(pure=True)),
        ("Q3_K_L", dict(pure=True, overrides=[("attn_k", "q8_0")]), dict(pure=True,
                                                                       tensor_types=[["attn_k", q["q8_0"]]])),
        ("Q4_K_M", dict(prune_layers=[1, 3]), dict(prune=[1, 3])),
        ("F16", dict(overrides=[("attn_k", "q8_0")]), dict(tensor_types=[["attn_k", q["q8_0"]]])),
    ]
    theirs = ref.dry_runs([{"path": str(g4), "ftype": ftypes.file_type(r).ftype, **kw} for r, _, kw in cases])
    for (recipe, kw, _), llama in zip(cases, theirs, strict=True):
        assert _types(path, recipe, **kw) == llama, (recipe, kw)
    pruned = _types(path, "Q4_K_M", prune_layers=[1, 3])
    # layers 0, 2, 4, 5 become 0-3; the new layer 3 is the global one (no attn_v)
    assert "blk.2.attn_v.weight" in pruned and "blk.3.attn_v.weight" not in pruned
    assert "blk.3.attn_q.weight" in pruned and "blk.4.attn_q.weight" not in pruned


def test_asym_2bitexp_is_q5_k_s_with_the_published_overrides(files):
    """The same choices as llama-quantize --tensor-type ... --token-embedding-type q6_K ... Q5_K_S."""
    path, g4 = files["26b"]
    r = qz.RECIPES["asym-2bitexp"]
    assert r.file_type.name == "Q5_K_S"
    tt = [[p, int(QT[t.upper()])] for p, t in r.overrides]
    llama = ref.dry_runs([{"path": str(g4), "ftype": r.file_type.ftype, "tensor_types": tt,
                           "token_embedding_type": int(QT.Q6_K)}])[0]
    assert _types(path, "asym-2bitexp") == llama


def test_names_as_llama_quantize_spells_them(files):
    path = files["mid"][0]
    assert _types(path, "q4_k_m") == _types(path, "Q4_K_M") == _types(path, "Q4_K")  # its alias
    assert ftypes.file_type("q5_k").name == "Q5_K_M" and ftypes.file_type("Q9_K") is None
    assert {"asym-2bitexp", "Q4_K_M", "IQ2_XXS", "TQ1_0", "MXFP4_MOE", "Q8_0"} <= set(qz.recipes())
    # a uniform type= stays uniform; the IQ4_NL file type gives the tied head q6_K as llama.cpp does
    assert _types(path, None, type="iq4_nl")["token_embd.weight"] == "iq4_nl"
    assert _types(path, "IQ4_NL")["token_embd.weight"] == "q6_K"


def test_more_bits_and_fallback_rules():
    assert [i for i in range(30) if ftypes.more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(25) if ftypes.more_bits(i, 25)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23, 24]
    fb = ftypes.shape_fallback
    assert (fb("q6_K", 2112), fb("q4_K", 704), fb("iq2_s", 704), fb("tq1_0", 704), fb("q4_K", 48)) == (
        "q8_0", "q5_0", "iq4_nl", "q4_0", "f16")
    assert fb("q8_0", 40) == "f16" and fb("q8_0", 64) == "q8_0" and fb("mxfp4", 704) == "mxfp4"
    assert ftypes.category("blk.0.ffn_gate_up_exps.weight") == ftypes.FFN_GATE
    assert ftypes.category("self_cond_down.weight") == ftypes.OTHER
    q2ks = ftypes.FILE_TYPES["q2_k_s"]
    assert ftypes.requires_imatrix("blk.0.attn_q.weight", "q2_K", q2ks)
    assert not ftypes.requires_imatrix("blk.0.attn_q.weight", "q2_K", ftypes.FILE_TYPES["q2_k"])
    assert not ftypes.requires_imatrix("token_embd.weight", "iq2_xxs", q2ks)


def test_imatrix_requirement_and_filters(files, tmp_path):
    path = files["mid"][0]
    with pytest.raises(Error, match="importance data"):  # Q2_K in a Q2_K_S file needs one, as in llama.cpp
        qz.quantize(path, tmp_path / "x.gguf", recipe="Q2_K_S", progress=False)
    path, imat = files["26b"][0], _one_entry_imatrix(LAYOUTS["26b"])
    # --exclude-weights removing the only entry leaves no imatrix: the no-imatrix rules apply
    assert _types(path, "Q4_0", imat, exclude_weights=["attn_q"])["blk.2.ffn_down.weight"] == "q4_0"
    assert _types(path, "Q4_0", imat, include_weights=["attn_q"])["blk.2.ffn_down.weight"] == "q4_1"
    with pytest.raises(Error, match="together"):
        _types(path, "Q4_0", imat, include_weights=["a"], exclude_weights=["b"])


def test_prune_and_override_kv_write_a_loadable_file(tmp_path):
    hp = testing.tiny_hparams()
    src = testing.write_model(tmp_path / "src.gguf", hp)
    out = tmp_path / "pruned.gguf"
    r = qz.quantize(src, out, recipe="F32", prune_layers=[0, 2], progress=False,
                    override_kv=["general.name=str:pruned", "diffusion-gemma.context_length=int:-2048"])
    g = gguf_file.read(out)
    hp_out = gguf_file.validate(g)  # per-layer arrays follow block_count
    assert hp_out.n_layer == 4 and hp_out.swa_layers == tuple(hp.swa_layers[i] for i in (1, 3, 4, 5))
    assert g.metadata["general.name"] == "pruned" and hp_out.context_length == 2048  # ints as u32 of |v|
    assert len(r.tensors) == len(layout.tensor_specs(hp_out))
    assert json.loads(g.metadata[qz.RECIPE_KEY]) == {"recipe": "F32", "prune_layers": [0, 2]}
    w_src = gguf_file.read(src).tensors["blk.3.attn_q.weight"]
    w_out = g.tensors["blk.1.attn_q.weight"]  # old layer 3 is the new layer 1
    a = np.fromfile(src, np.uint8, w_src.nbytes, offset=w_src.offset)
    assert np.array_equal(a, np.fromfile(out, np.uint8, w_out.nbytes, offset=w_out.offset))
    with pytest.raises(Error, match="cannot run"):  # the last layer must stay global
        qz.quantize(src, tmp_path / "x.gguf", recipe="Q8_0", prune_layers=[5], dry_run=True)
    with pytest.raises(Error, match="KEY=TYPE:VALUE"):
        qz.quantize(src, tmp_path / "x.gguf", recipe="Q8_0", override_kv=["general.name"], dry_run=True)
    with pytest.raises(Error, match="would not load"):
        qz.quantize(src, tmp_path / "x.gguf", recipe="Q8_0", override_kv=["diffusion-gemma.block_count=int:3"],
                    dry_run=True)
    with pytest.raises(Error, match="0..5"):
        qz.quantize(src, tmp_path / "x.gguf", recipe="Q8_0", prune_layers=[9], dry_run=True)
    assert not re.search(r"tmp|\.x\.gguf", " ".join(p.name for p in tmp_path.iterdir()))
