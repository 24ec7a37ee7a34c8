"""The quantizer: recipes, shape fallbacks, imatrix use, streaming output, byte-exactness against ggml."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

import diffgemma as dg
from diffgemma import Error, GGUFError, gguf_file, layout, testing
from diffgemma import binding as B
from diffgemma import imatrix_file as imx
from diffgemma import quantizer as qz
from diffgemma.model import load

# Tiny shapes that still fit 256-element K-quant blocks, with rows of 128 (sliding attn_output) and 320
# (ffn_down, self_cond_down) that do not, so the fallbacks show up.
HP = dict(n_embd=256, n_ff=320, n_ff_exp=128, head_dim=64, head_dim_swa=32)

# Relative L2 error of the logits against the f32 source on the calm tiny model (measured: f16 0.001,
# bf16 0.014, q8_0 0.027, q6_K 0.069, q5_K 0.14, q4_K 0.25, iq4_nl 0.27, q4_k_m 0.21, asym-2bitexp 0.30),
# with some headroom for other CPUs' SIMD paths.
BOUNDS = {"f16": 0.005, "bf16": 0.03, "q8_0": 0.06, "q6_K": 0.12, "q5_K": 0.25, "q4_K": 0.4, "iq4_nl": 0.4,
          "q4_k_m": 0.35, "asym-2bitexp": 0.45}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def hp():
    return testing.tiny_hparams(**HP)


@pytest.fixture(scope="module")
def src(work, hp):
    return testing.write_model(work / "src-f32.gguf", hp, weights=testing.random_weights(hp, calm=True))


@pytest.fixture(scope="module")
def imatrix(work, src):
    """A synthetic imatrix like the collector would produce: every matmul weight but token_embd and the
    self-conditioning MLP, with one expert of each expert tensor never routed to."""
    rng = np.random.default_rng(7)
    ents = {}
    for name, t in gguf_file.read(src).tensors.items():
        if len(t.shape) < 2 or "gate_inp" in name or name == "token_embd.weight" or name.startswith("self_cond"):
            continue
        n_mat = t.shape[2] if len(t.shape) > 2 else 1
        counts = np.full(n_mat, 40)
        counts[-1] = 0 if n_mat > 1 else 40
        ents[name] = (rng.uniform(0.2, 2.0, size=(n_mat, t.shape[0])) * counts[:, None], counts)
    return imx.save(work / "synthetic.imatrix.gguf", ents, datasets=["synthetic.txt"], chunk_count=3,
                    chunk_size=512)


@pytest.fixture(scope="module")
def ids(hp):
    rng = np.random.default_rng(1)
    return list(rng.integers(10, hp.n_vocab, 12)), list(rng.integers(10, hp.n_vocab, hp.canvas_length))


@pytest.fixture(scope="module")
def ref_logits(src, ids):
    with load(src, n_gpu_layers=0) as m:
        return m.logits(*ids)


def _f32_rows(raw: np.ndarray, t: int, shape: tuple[int, ...]) -> np.ndarray:
    """Source tensor as f32 [n_mat, rows, ne0], dequantized by gguf-py (an implementation independent of ours)."""
    np_shape = tuple(reversed(shape))
    if t == 0:
        x = raw.view(np.float32)
    else:
        x = gq.dequantize(raw.reshape(-1, raw.size // int(np.prod(np_shape[:-1]))), QT(t))
    ne0 = shape[0]
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, (shape[1] if len(shape) > 1 else 1), ne0)


def _direct(x: np.ndarray, dst: int, imat: np.ndarray | None) -> bytes:
    """ggml_quantize_chunk over each expert with that expert's importance slice: the reference bytes."""
    lib, ffi = B.lib, B.ffi
    out = []
    n_mat, rows, ne0 = x.shape
    for e in range(n_mat):
        buf = np.empty(rows * lib.ggml_row_size(dst, ne0), dtype=np.uint8)
        im = ffi.NULL if imat is None else ffi.from_buffer("float[]", np.ascontiguousarray(imat[e]))
        lib.ggml_quantize_chunk(dst, ffi.from_buffer("float[]", np.ascontiguousarray(x[e])),
                                ffi.from_buffer(buf), 0, rows, ne0, im)
        out.append(buf.tobytes())
    return b"".join(out)


def _check_bytes(src_path, out_path, imat: imx.ImatrixData | None) -> int:
    """Every output tensor equals a direct ggml quantization of the source (or its bytes when unchanged)."""
    gs, go = gguf_file.read(src_path), gguf_file.read(out_path)
    ms, mo = np.memmap(src_path, np.uint8, mode="r"), np.memmap(out_path, np.uint8, mode="r")
    n_checked = 0
    for name, ts in gs.tensors.items():
        to = go.tensors[name]
        assert to.shape == ts.shape
        raw_s = np.array(ms[ts.offset: ts.offset + ts.nbytes])
        got = bytes(mo[to.offset: to.offset + to.nbytes])
        if to.type == ts.type:
            assert got == raw_s.tobytes(), name
            continue
        x = _f32_rows(raw_s, ts.type, ts.shape)
        w = None
        if imat is not None and B.lib.ggml_is_quantized(to.type):
            w = imat.weights(name, ts.shape[0], x.shape[0]) if name in imat else None
        assert got == _direct(x, to.type, w), name
        n_checked += 1
    return n_checked


# ---- the full 26B-A4B layout ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_q8(work):
    return testing.write_model(work / "full-q8_0.gguf", layout.full_26b_a4b(), wtype="q8_0", sparse=True)


def test_dry_run_full_model_asym_2bitexp(work, full_q8):
    before = set(work.iterdir())
    with pytest.warns(UserWarning, match="imatrix"):
        r = qz.quantize(full_q8, work / "never.gguf", recipe="asym-2bitexp", dry_run=True)
    assert r.census == {"f32": 423, "q5_K": 175, "q5_1": 30, "iq4_nl": 30, "iq2_s": 30, "q6_K": 1, "q4_K": 2,
                        "q5_0": 1}
    assert len(r.tensors) == 692 and r.census_str.startswith("f32:423, q5_K:175")
    assert abs(r.size_bytes - 10.98e9) / 10.98e9 < 0.01
    assert r.dry_run and r.ftype == 16  # LLAMA_FTYPE_MOSTLY_Q5_K_S: the file type the recipe starts from
    assert set(work.iterdir()) == before  # nothing written, not even a temporary file
    assert len(r.fallbacks) == 31
    assert ("self_cond_down.weight", "q4_K", "q5_0") in [f[:3] for f in r.fallbacks]
    assert all(f[1:3] == ("q5_K", "q5_1") for f in r.fallbacks if f[0].endswith("ffn_down.weight"))
    assert "iq2_s" in r.summary() and "10.97" in r.summary()


def test_dry_run_full_model_q4_k_m(work, full_q8):
    r = qz.quantize(full_q8, work / "never.gguf", recipe="Q4_K_M", dry_run=True)
    assert r.census == {"f32": 423, "q4_K": 194, "q5_0": 33, "q8_0": 28, "q6_K": 14}
    assert r.ftype == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {n: t for n, _, _, t in r.tensors}
    more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]  # llama-quantize's use_more_bits for 30 layers
    assert [il for il in range(30) if types[f"blk.{il}.ffn_down.weight"] == "q8_0"] == more  # q6_K -> q8_0
    assert types["blk.3.ffn_down_exps.weight"] == "q5_0"  # q4_K -> q5_0 (704 columns)
    assert types["blk.0.attn_v.weight"] == "q6_K" and types["blk.3.attn_v.weight"] == "q4_K"
    assert types["blk.6.attn_v.weight"] == "q6_K"  # the 6th attn_v (blk.5 has none): a "more bits" position
    assert types["token_embd.weight"] == "q6_K" and types["blk.0.ffn_gate_inp.weight"] == "f32"


def test_dry_run_predicts_the_written_size(work, src):
    dry = qz.quantize(src, work / "d.gguf", type="q4_K", dry_run=True)
    real = qz.quantize(src, work / "d.gguf", type="q4_K", progress=False)
    assert dry.size_bytes == real.size_bytes == (work / "d.gguf").stat().st_size
    assert dry.census == real.census


# ---- byte-exactness and metadata --------------------------------------------------------------------------

def test_asym_2bitexp_bytes_equal_ggml_with_imatrix_slices(work, src, imatrix, monkeypatch):
    # tiny work items and copy pieces, so that experts are split into several chunks across both threads
    monkeypatch.setattr(qz, "CHUNK_ELEMENTS", 700)
    monkeypatch.setattr(qz, "COPY_PIECE", 1000)
    out = work / "asym.gguf"
    r = qz.quantize(src, out, recipe="asym-2bitexp", imatrix=imatrix, threads=2, progress=False)
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    imat = imx.load(imatrix)
    assert _check_bytes(src, out, imat) > 50
    assert r.size_bytes == out.stat().st_size

    # the per-expert slice matters: expert 0's weights for every expert give different bytes
    gs, go = gguf_file.read(src), gguf_file.read(out)
    name = "blk.0.ffn_gate_up_exps.weight"
    ts, to = gs.tensors[name], go.tensors[name]
    x = _f32_rows(np.fromfile(src, np.uint8, ts.nbytes, offset=ts.offset), 0, ts.shape)
    w = imat.weights(name, ts.shape[0], x.shape[0])
    got = np.fromfile(out, np.uint8, to.nbytes, offset=to.offset).tobytes()
    assert got != _direct(x, to.type, np.repeat(w[:1], len(w), axis=0))

    md_s, md_o = gs.metadata, go.metadata
    assert md_o["general.file_type"] == 16 and md_o["general.quantization_version"] == 2
    assert md_o["quantize.imatrix.file"] == str(imatrix)
    assert md_o["quantize.imatrix.dataset"] == "synthetic.txt"
    assert md_o["quantize.imatrix.entries_count"] == len(imat.entries)
    assert md_o["quantize.imatrix.chunks_count"] == 3
    assert json.loads(md_o[qz.RECIPE_KEY]) == {"recipe": "asym-2bitexp"}
    for k, v in md_s.items():
        if k not in ("general.file_type", "general.quantization_version"):
            assert md_o[k] == v, k

    # what the report says: the self-conditioning MLP and token_embd had no importance data
    assert set(r.no_imatrix) == {"token_embd.weight", "self_cond_gate.weight", "self_cond_up.weight",
                                 "self_cond_down.weight"}
    assert r.imatrix_partial["blk.0.ffn_down_exps.weight"] == 0.75
    assert r.census["iq2_s"] == 6 and r.census["f32"] == sum(
        1 for s in layout.tensor_specs(testing.tiny_hparams(**HP)) if s.role in (layout.VECTOR, layout.ROUTER))


@pytest.mark.parametrize("target", ["f16", "bf16", "q8_0", "q6_K", "q5_K", "q4_K", "iq4_nl", "q4_k_m",
                                    "asym-2bitexp"])
def test_quantized_logits_close_to_source(work, src, imatrix, ids, ref_logits, target):
    out = work / f"logits-{target}.gguf"
    if target in ("q4_k_m", "asym-2bitexp"):
        qz.quantize(src, out, recipe=target, imatrix=imatrix, progress=False)
    else:
        qz.quantize(src, out, type=target, progress=False)
    with load(out, n_gpu_layers=0) as m:
        got = m.logits(*ids)
    rel = float(np.linalg.norm(got - ref_logits) / np.linalg.norm(ref_logits))
    assert rel < BOUNDS[target], f"{target}: relative logit error {rel:.4f}"
    assert (got.argmax(-1) == ref_logits.argmax(-1)).mean() >= 0.9


def test_requantize_from_q8_0(work, hp):
    src8 = testing.write_model(work / "src-q8_0.gguf", hp, wtype="q8_0",
                               weights=testing.random_weights(hp, calm=True))
    out = work / "from-q8.gguf"
    r = qz.quantize(src8, out, type="q4_K", progress=False)
    assert r.census["q4_K"] > 0
    assert _check_bytes(src8, out, None) > 20  # dequantized through ggml's to_float, then quantized
    with pytest.raises(Error, match="allow_requantize"):
        qz.quantize(src8, work / "refused.gguf", type="q4_K", allow_requantize=False, progress=False)
    assert not (work / "refused.gguf").exists()
    # same type as the source is a copy, allowed either way
    r = qz.quantize(src8, work / "same.gguf", type="Q8_0", allow_requantize=False, progress=False)
    assert _check_bytes(src8, work / "same.gguf", None) == 0
    assert r.no_imatrix == []


# ---- rules, fallbacks, imatrix requirement -----------------------------------------------------------------

def test_fallbacks_down_to_f16(work):
    hp48 = testing.tiny_hparams(n_ff_exp=48)  # expert down rows of 48: no q5_0 block fits, so f16
    small = testing.write_model(work / "small.gguf", hp48)
    r = qz.quantize(small, work / "small-q4k.gguf", type="q4_K", progress=False)
    fb = {n: (a, b) for n, a, b, _ in r.fallbacks}
    assert fb["blk.0.ffn_down_exps.weight"] == ("q4_K", "f16")
    assert fb["blk.0.attn_q.weight"] == ("q4_K", "q5_0")  # 64 columns
    assert all("not a multiple" in why for *_, why in r.fallbacks)
    assert "q4_K" not in r.census and r.census["f16"] == hp48.n_layer
    assert _check_bytes(small, work / "small-q4k.gguf", None) > 0


def test_rule_lists_and_overrides(work, src):
    r = qz.quantize(src, work / "rules.gguf", recipe=[(r"attn_q\.", "q8_0"), "ffn_=Q4_0", (".", "f16")],
                    overrides={r"blk\.0\.attn_q\.": "bf16"}, dry_run=True)
    t = {n: d for n, _, _, d in r.tensors}
    assert t["blk.0.attn_q.weight"] == "bf16" and t["blk.1.attn_q.weight"] == "q8_0"
    assert t["blk.1.ffn_down_exps.weight"] == "q4_0" and t["blk.1.attn_k.weight"] == "f16"
    assert t["blk.1.ffn_gate_inp.weight"] == "f32" and t["blk.1.attn_norm.weight"] == "f32"  # never quantized
    assert json.loads(r.recipe) == {"rules": [[r"attn_q\.", "q8_0"], ["ffn_", "q4_0"], [".", "f16"]],
                                               "overrides": [[r"blk\.0\.attn_q\.", "bf16"]]}
    # overrides alone: everything else keeps its source type
    r = qz.quantize(src, work / "o.gguf", overrides=[("token_embd", "q8_0")], dry_run=True)
    assert r.census == {"f32": len(r.tensors) - 1, "q8_0": 1}


def test_missing_imatrix_refused_unless_overridden(work, src, imatrix):
    out = work / "no-imatrix.gguf"
    with pytest.raises(Error, match="imatrix"):
        qz.quantize(src, out, recipe="asym-2bitexp", progress=False)
    assert not out.exists()
    with pytest.raises(Error, match="imatrix"):  # ggml itself would abort for iq2_xxs: never reach it
        qz.quantize(src, out, type="iq2_xxs", progress=False)
    # an imatrix without the expert entries is not enough either
    partial = imx.load(imatrix)
    partial.entries = {k: v for k, v in partial.entries.items() if "gate_up_exps" not in k}
    with pytest.raises(Error, match="no entry"):
        qz.quantize(src, out, recipe="asym-2bitexp", imatrix=partial, progress=False)
    # overriding the IQ2_S tensors lifts the requirement
    r = qz.quantize(src, out, recipe="asym-2bitexp", overrides=[("ffn_gate_up_exps", "q2_K")], progress=False)
    assert "iq2_s" not in r.census and r.census["q2_K"] == 6
    assert "blk.0.ffn_gate_up_exps.weight" in r.no_imatrix and "without importance data" in r.summary()
    assert "quantize.imatrix.file" not in gguf_file.read(out).metadata
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            qz.quantize(src, out, recipe="asym-2bitexp", dry_run=True)


def test_interrupt_leaves_no_file(work, src, monkeypatch):
    calls = {"n": 0}
    real = qz._encode_chunk

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(qz, "_encode_chunk", flaky)
    before = set(work.iterdir())
    with pytest.raises(KeyboardInterrupt):
        qz.quantize(src, work / "interrupted.gguf", type="q4_K", threads=2, progress=False)
    assert set(work.iterdir()) == before


def test_bad_data_fails_validation_without_output(work, hp):
    w = testing.random_weights(hp)
    w["blk.2.attn_k.weight"][3, 5] = np.nan
    bad = testing.write_model(work / "nan.gguf", hp, weights=w)
    before = set(work.iterdir())
    with pytest.raises(Error, match="blk.2.attn_k.weight"):
        qz.quantize(bad, work / "nan-q4.gguf", type="q4_0", progress=False)
    assert set(work.iterdir()) == before


def test_bad_inputs(work, src, imatrix):
    out = work / "bad.gguf"
    with pytest.raises(GGUFError):
        qz.quantize(work / "missing.gguf", out, type="q8_0")
    with pytest.raises(Error):  # an imatrix file is not a diffusion-gemma model
        qz.quantize(imatrix, out, type="q8_0")
    with pytest.raises(Error, match="unknown recipe"):
        qz.quantize(src, out, recipe="nonsense")
    with pytest.raises(Error, match="unknown quantization type"):
        qz.quantize(src, out, type="q9_9")
    with pytest.raises(Error, match="recipe="):
        qz.quantize(src, out, type="q4_k_m")
    with pytest.raises(Error, match="bad regex"):
        qz.quantize(src, out, type="q8_0", overrides=[("attn_(q", "f16")])
    with pytest.raises(Error, match="regex, type"):
        qz.quantize(src, out, recipe=[("only-a-regex",)])
    with pytest.raises(Error, match="not both"):
        qz.quantize(src, out, recipe="q4_k_m", type="q8_0")
    with pytest.raises(Error, match="nothing to do"):
        qz.quantize(src, out)
    with pytest.raises(Error, match="threads"):
        qz.quantize(src, out, type="q8_0", threads=0)
    with pytest.raises(Error, match="directory"):
        qz.quantize(src, work / "no" / "such" / "dir.gguf", type="q8_0")
    with pytest.raises(Error, match="is a directory"):
        qz.quantize(src, work, type="q8_0")
    with pytest.raises(Error, match="replace the source"):
        qz.quantize(src, src, type="q8_0")
    with pytest.raises(GGUFError):
        qz.quantize(src, out, type="q8_0", imatrix=work / "missing.imatrix")
    assert not out.exists()


def test_recipes_and_type_names():
    rs = qz.recipes()
    assert {"asym-2bitexp", "Q4_K_M"} <= set(rs) and all(len(d) > 40 for d in rs.values())
    assert qz.type_id("Q4_K") == qz.type_id("q4_k") == 12 and qz.type_id("IQ2_S") == 22
    assert set(qz.TYPE_NAMES) == set(qz._TYPE_ID)  # every advertised type is known to this ggml


def test_public_function_survives_the_module_import(work, src):
    assert isinstance(dg.recipes(), dict)
    r = dg.quantize(src, work / "public.gguf", type="q8_0", progress=True)  # the package attribute may now
    assert r.census["q8_0"] > 0  # be the module: it must still quantize
    assert dg.quantize(src, work / "public.gguf", recipe="q4_k_m", dry_run=True).ftype == 15


def test_require_imatrix_false_forces_what_ggml_allows(work, src):
    out = work / "forced.gguf"
    r = qz.quantize(src, out, recipe="asym-2bitexp", require_imatrix=False, progress=False)
    assert r.census["iq2_s"] == 6 and "blk.0.ffn_gate_up_exps.weight" in r.no_imatrix
    with dg.load(out) as m:  # it loads and runs
        assert np.isfinite(m.logits([2, 40, 41], np.arange(m.hparams.canvas_length) + 50)).all()
    with pytest.raises(Error, match="imatrix"):  # ggml itself needs importance data for iq2_xxs: still refused
        qz.quantize(src, work / "x.gguf", type="iq2_xxs", require_imatrix=False, progress=False)
    assert not (work / "x.gguf").exists()
