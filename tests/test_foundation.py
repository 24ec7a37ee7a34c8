"""Package foundation: binding, GGUF loading and validation, tokenizer, tiny-model factory, info."""

import subprocess
import sys

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import binding as B
from diffgemma import cli, gguf_file, layout, testing
from diffgemma.gguf_file import Writer


def test_binding_matmul_equals_numpy():
    lib, ffi = B.lib, B.ffi
    rng = np.random.default_rng(0)
    a = rng.standard_normal((48, 64), dtype=np.float32)  # weight: 48 rows of 64
    b = rng.standard_normal((5, 64), dtype=np.float32)  # 5 tokens
    ctx = B.ggml_context(1 << 20, no_alloc=False)
    try:
        ta = lib.ggml_new_tensor_2d(ctx, 0, 64, 48)
        tb = lib.ggml_new_tensor_2d(ctx, 0, 64, 5)
        ffi.memmove(ta.data, a.tobytes(), a.nbytes)
        ffi.memmove(tb.data, b.tobytes(), b.nbytes)
        out = lib.ggml_mul_mat(ctx, ta, tb)
        g = lib.ggml_new_graph_custom(ctx, 16, False)
        lib.ggml_build_forward_expand(g, out)
        be = lib.ggml_backend_dev_init(lib.ggml_backend_dev_by_type(B.DEV_TYPE_CPU), ffi.NULL)
        assert lib.ggml_backend_graph_compute(be, g) == 0
        lib.ggml_backend_free(be)
        got = np.frombuffer(ffi.buffer(out.data, 5 * 48 * 4), dtype=np.float32).reshape(5, 48).copy()
    finally:
        lib.ggml_free(ctx)
    np.testing.assert_allclose(got, b @ a.T, rtol=1e-5, atol=1e-5)


def test_layout_check_names_the_expected_version():
    class Fake:
        def __getattr__(self, name):
            return getattr(B.lib, name)

        def ggml_tensor_overhead(self):
            return 1

    with pytest.raises(dg.Error, match="0.3.36"):
        B._check_layout(Fake())


def test_backends_lists_cpu():
    assert "CPU" in dg.backends()
    out = subprocess.run([sys.executable, "-m", "diffgemma.cli", "info", "--devices"], capture_output=True,
                         text=True, check=True).stdout
    assert "CPU" in out and "llama-cpp-python 0.3.36" in out


@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16", "q8_0"])
def test_tiny_files_of_every_type_load(tiny_dir, wtype):
    hp = testing.tiny_hparams()
    calm = testing.random_weights(hp, seed=3, calm=True)
    path = testing.write_model(tiny_dir / f"t-{wtype}.gguf", hp, wtype=wtype, weights=calm)
    with dg.load(path) as m:
        assert m.hparams == hp
        assert m.metadata["general.architecture"] == "diffusion-gemma"
        assert m.devices == ["CPU"]
        lg = m.logits([2, 40, 41, 42], list(range(100, 100 + hp.canvas_length)))
    assert lg.shape == (hp.canvas_length, hp.n_vocab) and lg.dtype == np.float32
    assert np.isfinite(lg).all() and np.abs(lg).max() <= hp.softcap
    with dg.load(testing.write_model(tiny_dir / "calm-f32.gguf", hp, weights=calm)) as ref:
        want = ref.logits([2, 40, 41, 42], list(range(100, 100 + hp.canvas_length)))
    # bounds: about 3x what was measured (f16 3e-3 / 4e-4, bf16 0.13 / 7e-3, q8_0 0.24 / 0.018: max / mean)
    max_tol, mean_tol = {"f32": (1e-6, 1e-7), "f16": (1e-2, 2e-3), "bf16": (0.4, 0.02), "q8_0": (0.7, 0.05)}[wtype]
    assert np.abs(lg - want).max() <= max_tol and np.abs(lg - want).mean() <= mean_tol


def test_split_gate_up_fallback_loads(tmp_path):
    hp = testing.tiny_hparams()
    src = testing.write_model(tmp_path / "fused.gguf", hp)
    gf = gguf_file.read(src)
    w = Writer(tmp_path / "split.gguf", copy_kv_from=src)
    data = src.read_bytes()
    fe = hp.n_ff_exp
    parts = {}
    for t in gf.tensors.values():
        if t.name.endswith("ffn_gate_up_exps.weight"):
            arr = np.frombuffer(data, np.float32, t.nbytes // 4, t.offset).reshape(hp.n_expert, 2 * fe, hp.n_embd)
            base = t.name.removesuffix("ffn_gate_up_exps.weight")
            for part, rows in (("ffn_gate_exps.weight", arr[:, :fe]), ("ffn_up_exps.weight", arr[:, fe:])):
                parts[base + part] = np.ascontiguousarray(rows)
                w.add_tensor(base + part, (hp.n_embd, fe, hp.n_expert), 0)
        else:
            parts[t.name] = np.frombuffer(data, np.uint8, t.nbytes, t.offset)
            w.add_tensor(t.name, t.shape, t.type)
    w.write(lambda n: parts[n])
    with dg.load(src) as a, dg.load(tmp_path / "split.gguf") as b:
        ids, canvas = [2, 7, 8], list(range(50, 50 + hp.canvas_length))
        np.testing.assert_allclose(a.logits(ids, canvas), b.logits(ids, canvas), atol=1e-6)


# ---- broken inputs ----------------------------------------------------------------------------------


def _rewrite(src, dst, *, drop=(), reshape=None, retype=None, md=None):
    """Copy a GGUF with tensors dropped, re-declared with another shape or type, or keys changed."""
    reshape, retype = reshape or {}, retype or {}
    gf = gguf_file.read(src)
    w = Writer(dst, copy_kv_from=src)
    for k, v in (md or {}).items():
        w.set(k, v)
    data = {}
    for t in gf.tensors.values():
        if t.name in drop:
            continue
        shape, ty = reshape.get(t.name, t.shape), retype.get(t.name, t.type)
        w.add_tensor(t.name, shape, ty)
        n = B.lib.ggml_row_size(ty, shape[0]) * int(np.prod(shape[1:]))
        data[t.name] = np.zeros(n, np.uint8)
    w.write(lambda n: data[n])
    return dst


def test_nonexistent_path():
    with pytest.raises(dg.GGUFError, match="no such file"):
        dg.load("/nonexistent/model.gguf")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(dg.GGUFError, match="empty"):
        dg.load(p)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(dg.GGUFError, match="not a GGUF"):
        dg.load(p)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file(tmp_path, tiny_f32, keep):
    data = tiny_f32.read_bytes()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(dg.GGUFError, match="truncated|unreadable"):
        dg.load(p)


def test_wrong_architecture(tmp_path, tiny_f32):
    p = _rewrite(tiny_f32, tmp_path / "llama.gguf", md={"general.architecture": "llama"})
    with pytest.raises(dg.GGUFError, match="'llama'.*not a DiffusionGemma"):
        dg.load(p)


def test_missing_keys_all_listed(tmp_path, tiny_f32):
    gf = gguf_file.read(tiny_f32)
    md = {k: v for k, v in gf.metadata.items() if k not in ("diffusion.canvas_length",
                                                             "diffusion-gemma.expert_count")}
    md["general.architecture"] = "diffusion-gemma"
    w = Writer(tmp_path / "nokeys.gguf")
    w.set_all(md)
    w.write()
    with pytest.raises(dg.GGUFError) as e:
        dg.load(tmp_path / "nokeys.gguf")
    assert "diffusion.canvas_length" in str(e.value) and "expert_count" in str(e.value)


def test_missing_tensor_wrong_shape_wrong_type_all_reported(tmp_path, tiny_f32):
    p = _rewrite(tiny_f32, tmp_path / "bad.gguf", drop={"blk.2.attn_v.weight"},
                 reshape={"blk.0.attn_q.weight": (64, 32)}, retype={"blk.1.ffn_norm.weight": 1})
    with pytest.raises(dg.GGUFError) as e:
        dg.load(p)
    msg = str(e.value)
    assert "missing tensor blk.2.attn_v.weight" in msg
    assert "blk.0.attn_q.weight: shape [64, 32], expected [64, 64]" in msg
    assert "blk.1.ffn_norm.weight: type f16 not allowed" in msg
    assert "3 problem(s)" in msg


def test_global_layer_with_v_is_rejected(tmp_path, tiny_f32):
    p = _rewrite(tiny_f32, tmp_path / "v.gguf", retype={})
    gf = gguf_file.read(p)
    hp = gguf_file.validate(gf)
    il = hp.swa_layers.index(False)
    w = Writer(tmp_path / "v2.gguf", copy_kv_from=p)
    for t in gf.tensors.values():
        w.add_tensor(t.name, t.shape, t.type)
    w.add_tensor(f"blk.{il}.attn_v.weight", (64, 32), 0)
    w.write(lambda n: np.zeros(64 * 32 * 4 if n.endswith(f"{il}.attn_v.weight") else gf.tensors[n].nbytes, np.uint8))
    with pytest.raises(dg.GGUFError, match=f"unexpected tensor blk.{il}.attn_v.weight"):
        dg.load(tmp_path / "v2.gguf")


def test_bad_load_parameters(tiny_f32):
    with pytest.raises(dg.Error, match="threads"):
        dg.load(tiny_f32, threads=0)
    with pytest.raises(dg.Error, match="flash_attn"):
        dg.load(tiny_f32, flash_attn="maybe")


def test_bad_logits_input(tiny_f32):
    with dg.load(tiny_f32) as m:
        with pytest.raises(dg.Error, match="token ids"):
            m.logits([1, 2], [99999] * 16)
        with pytest.raises(dg.Error, match="empty"):
            m.logits([1, 2], [])
        with pytest.raises(dg.Error, match="self_cond must have shape"):
            m.logits([1, 2], [3] * 16, self_cond=np.zeros((3, 3)))


# ---- tokenizer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["the quick brown fox", "  two  spaces\n\nand newlines\t tab",
                                  "Unicode: Wörld ✓ 漢字 🙂", "", "x"])
def test_tokenizer_round_trip(tiny_f32, text):
    with dg.load(tiny_f32) as m:
        ids = m.tokenize(text)
        assert ids[0] == testing.BOS
        assert m.detokenize(ids) == text
        assert m.tokenize(text, add_special=False) == ids[1:]


def test_tokenizer_byte_fallback_and_specials(tiny_f32):
    vocab = testing.tiny_vocab(512)
    with dg.load(tiny_f32) as m:
        ids = m.tokenize("漢", add_special=False)  # not in the tiny vocab: three UTF-8 byte tokens
        assert [vocab.tokens[i] for i in ids] == ["<0xE6>", "<0xBC>", "<0xA2>"]
        ids = m.tokenize("<|turn>user\nhi<turn|>\n", add_special=False)
        assert ids[0] == testing.TURN_START and testing.TURN_END in ids
        assert m.detokenize(ids, special=True) == "<|turn>user\nhi<turn|>\n"
        assert m.detokenize(ids) == "user\nhi\n"  # control tokens dropped
        assert m.tokenizer.is_eog(testing.EOS)
        with pytest.raises(dg.Error):
            m.detokenize([10**6])


# ---- the published 26B-A4B layout ----------------------------------------------------------------------

PUBLISHED_Q8_0_BYTES = 26_869_753_568


def test_full_layout_sparse_sizes(tmp_path):
    hp = layout.full_26b_a4b()
    specs = layout.tensor_specs(hp)
    assert len(specs) == 692
    p = testing.write_model(tmp_path / "full-q8_0.gguf", hp, wtype="q8_0", sparse=True)
    gf = gguf_file.read(p)
    assert gguf_file.validate(gf) == hp
    assert len(gf.tensors) == 692
    types = [t.type_name for t in gf.tensors.values()]
    assert gguf_file.census(types) == "f32:423, q8_0:269"
    # tensor data is fixed by the layout; the rest is metadata (our placeholder vocabulary strings)
    assert sum(t.nbytes for t in gf.tensors.values()) == 26_863_004_912
    assert abs(gf.file_size - PUBLISHED_Q8_0_BYTES) / PUBLISHED_Q8_0_BYTES < 1e-4
    assert p.stat().st_blocks * 512 < 64 << 20  # written sparse: metadata only on disk
    text = cli.info_text(str(p))
    assert "f32:423, q8_0:269" in text and "26.87 GB" in text and "experts 128 (top 8" in text


def test_info_cli(tiny_f32):
    r = subprocess.run([sys.executable, "-m", "diffgemma.cli", "info", str(tiny_f32)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "diffusion-gemma" in r.stdout and "canvas 16" in r.stdout and "f32:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "diffgemma.cli", "info", "/nonexistent.gguf"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no such file" in r.stderr
