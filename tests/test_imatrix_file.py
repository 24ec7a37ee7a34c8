"""imatrix files: llama.cpp's GGUF layout and the legacy .dat layout, round trips, merging, count-0 experts."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from diffgemma import Error, GGUFError, testing
from diffgemma import imatrix_file as imx

DENSE, EXPS, EMPTY = "blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight", "blk.1.attn_k.weight"


def _entries(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    exp_counts = np.array([40, 0, 7, 12])  # expert 1 saw no token
    exp_sums = rng.uniform(0.5, 3.0, size=(4, 32)) * exp_counts[:, None]
    return {
        DENSE: (rng.uniform(0.5, 3.0, size=(1, 64)) * 100, np.array([100])),
        EXPS: (exp_sums, exp_counts),
        EMPTY: (np.zeros((1, 16)), np.array([0])),  # observed never: GGUF keeps it, .dat drops it
    }


def test_gguf_round_trip_matches_llama_layout(tmp_path):
    ents = _entries()
    p = imx.save(tmp_path / "a.gguf", ents, datasets=["calib.txt", "more.txt"], chunk_count=7, chunk_size=256)
    d = imx.load(p)
    assert d.format == "gguf" and d.datasets == ["calib.txt", "more.txt"]
    assert (d.chunk_count, d.chunk_size) == (7, 256)
    for name, (s, c) in ents.items():
        e = d.entries[name]
        np.testing.assert_allclose(e.sums, s, rtol=1e-6)  # stored as f32
        np.testing.assert_array_equal(e.counts, c)

    # read back with gguf-py (an independent reader): names, shapes, key types as llama.cpp writes them
    r = gguf.GGUFReader(p)
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.datasets").contents() == ["calib.txt", "more.txt"]
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        assert r.get_field(key).types == [gguf.GGUFValueType.UINT32]
    t = {x.name: x for x in r.tensors}
    assert sorted(t) == sorted(n + suf for n in ents for suf in (".in_sum2", ".counts"))
    assert list(t[EXPS + ".in_sum2"].shape) == [32, 4] and list(t[EXPS + ".counts"].shape) == [1, 4]
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    np.testing.assert_array_equal(np.asarray(t[EXPS + ".counts"].data).reshape(-1), [40, 0, 7, 12])


def test_weights_are_per_expert_means_and_count0_is_ones(tmp_path):
    ents = _entries()
    d = imx.load(imx.save(tmp_path / "a.gguf", ents))
    w = d.weights(EXPS, ne0=32, n_mat=4)
    s, c = ents[EXPS]
    assert w.dtype == np.float32 and w.shape == (4, 32)
    for e in (0, 2, 3):
        np.testing.assert_allclose(w[e], s[e] / c[e], rtol=1e-6)
    np.testing.assert_array_equal(w[1], np.ones(32, np.float32))
    assert d.entries[EXPS].coverage == 0.75
    np.testing.assert_array_equal(d.weights(EMPTY), np.ones((1, 16), np.float32))
    assert d.weights("not.there") is None
    with pytest.raises(Error, match="another model"):
        d.weights(EXPS, ne0=64, n_mat=4)


def test_empty_dataset_list_is_a_string_array(tmp_path):
    p = imx.save(tmp_path / "a.gguf", _entries(), datasets=[])
    # key, then value type ARRAY, element type STRING, length 0
    assert b"imatrix.datasets" + struct.pack("<IIQ", 9, 8, 0) in p.read_bytes()
    assert imx.load(p).datasets == []


def test_dat_round_trip(tmp_path):
    ents = _entries()
    p = imx.save(tmp_path / "a.dat", ents, datasets=["calib.txt"], chunk_count=5, chunk_size=16)
    raw = p.read_bytes()
    assert raw[:4] != b"GGUF" and struct.unpack("<i", raw[:4])[0] == 2  # the all-zero entry is dropped
    # first entry (sorted by name): name, ncall = ceil(max count / chunk size), nval
    n = struct.unpack("<i", raw[4:8])[0]
    assert raw[8:8 + n].decode() == DENSE
    ncall, nval = struct.unpack("<ii", raw[8 + n:16 + n])
    assert (ncall, nval) == (7, 64)  # ceil(100 / 16)
    assert raw.endswith(b"calib.txt")

    d = imx.load(p)
    assert d.format == "dat" and d.datasets == ["calib.txt"] and d.chunk_count == 5
    assert EMPTY not in d
    assert d.entries[EXPS].n_mat == 1  # the legacy layout does not know the expert split...
    w = d.weights(EXPS, ne0=32, n_mat=4)  # ...until the entry meets the tensor
    ref = imx.make_entry(*ents[EXPS]).weights()
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    np.testing.assert_array_equal(w[1], np.ones(32, np.float32))
    np.testing.assert_allclose(d.weights(DENSE), imx.make_entry(*ents[DENSE]).weights(), rtol=1e-6)

    # and back to GGUF through the object
    d2 = imx.load(d.save(tmp_path / "b.gguf"))
    np.testing.assert_allclose(d2.weights(EXPS, 32, 4), ref, rtol=1e-6)


def test_format_argument_overrides_suffix(tmp_path):
    p = imx.save(tmp_path / "x.imatrix", _entries(), format="dat")
    assert imx.load(p).format == "dat"
    p = imx.save(tmp_path / "y.dat", _entries(), format="gguf")
    assert p.read_bytes()[:4] == b"GGUF"
    with pytest.raises(Error, match="format"):
        imx.save(tmp_path / "z.gguf", _entries(), format="json")


def test_merge_adds_raw_sums_and_counts(tmp_path):
    a, b = _entries(0), _entries(1)
    pa = imx.save(tmp_path / "a.gguf", a, datasets=["a.txt"], chunk_count=3, chunk_size=512)
    pb = imx.save(tmp_path / "b.gguf", b, datasets=["b.txt"], chunk_count=4, chunk_size=512)
    m = imx.merge(pa, imx.load(pb))
    assert m.datasets == ["a.txt", "b.txt"] and m.chunk_count == 7 and m.chunk_size == 512
    for name in a:
        np.testing.assert_allclose(m.entries[name].sums, a[name][0] + b[name][0], rtol=1e-6)
        np.testing.assert_array_equal(m.entries[name].counts, a[name][1] + b[name][1])
    # an expert without data in both stays at ones; merging saves like any other data
    np.testing.assert_array_equal(m.weights(EXPS, 32, 4)[1], np.ones(32, np.float32))
    back = imx.load(m.save(tmp_path / "m.gguf"))
    np.testing.assert_array_equal(back.entries[EXPS].counts, m.entries[EXPS].counts)


def test_merge_legacy_with_gguf_splits_flat_entries(tmp_path):
    ents = _entries()
    pd = imx.save(tmp_path / "a.dat", ents, chunk_size=4)
    pg = imx.save(tmp_path / "b.gguf", ents)
    m = imx.merge(pd, pg)
    assert m.entries[EXPS].n_mat == 4
    # the legacy half contributes the same means, so the merged means are unchanged
    np.testing.assert_allclose(m.weights(EXPS, 32, 4)[[0, 2, 3]],
                               imx.make_entry(*ents[EXPS]).weights()[[0, 2, 3]], rtol=1e-5)


def test_bad_files_and_inputs(tmp_path):
    with pytest.raises(GGUFError):
        imx.load(tmp_path / "missing.gguf")
    model = testing.write_model(tmp_path / "m.gguf", testing.tiny_hparams())
    with pytest.raises(GGUFError, match="not an imatrix"):
        imx.load(model)
    p = imx.save(tmp_path / "a.dat", _entries())
    (tmp_path / "t.dat").write_bytes(p.read_bytes()[:40])
    with pytest.raises(GGUFError, match="truncated"):
        imx.load(tmp_path / "t.dat")
    (tmp_path / "junk.dat").write_bytes(b"\xff" * 64)
    with pytest.raises(GGUFError):
        imx.load(tmp_path / "junk.dat")
    with pytest.raises(Error, match="counts"):
        imx.save(tmp_path / "x.gguf", {DENSE: (np.ones((2, 8)), np.ones(3))})
    with pytest.raises(Error, match="finite"):
        imx.save(tmp_path / "x.gguf", {DENSE: (np.full((1, 8), np.nan), np.ones(1))})
    with pytest.raises(Error, match="merge"):
        imx.merge(imx.ImatrixData({DENSE: imx.make_entry(np.ones((1, 8)), 1)}),
                  imx.ImatrixData({DENSE: imx.make_entry(np.ones((1, 6)), 1)}))
