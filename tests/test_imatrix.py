"""imatrix collection through the diffusion graph: sums against numpy, expert attribution, modes, files."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import binding as B
from diffgemma import calibration, imatrix_file, layout, testing

TEXT = ("But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief. ") * 8


def _rms(x, w=None, eps=1e-6):
    y = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)
    return y * w if w is not None else y


def test_dense_sums_match_numpy(tmp_path):
    """blk.0.attn_q sees rms(E[ids] s) * attn_norm in the encoder and rms(rms(E[c] s)) * attn_norm in the
    decoder (first step: self-conditioning gated to 0): both computable in numpy from the weights."""
    hp = testing.tiny_hparams()
    w = testing.random_weights(hp, seed=1, calm=True)
    path = testing.write_model(tmp_path / "m.gguf", hp, weights=w)
    with dg.load(path) as m:
        col = calibration.Collector()
        prompt = np.array([2, 40, 41, 42, 43, 44], np.int32)
        canvas = np.arange(100, 100 + hp.canvas_length)
        with m.observe(col):
            m.logits(prompt, canvas)
    s = np.sqrt(hp.n_embd)
    E, wn = w["token_embd.weight"], w["blk.0.attn_norm.weight"]
    enc = _rms(E[prompt] * s, wn)
    dec = _rms(_rms(E[canvas] * s), wn)
    rows = np.concatenate([enc, dec])
    sums, counts = col.sums["blk.0.attn_q.weight"], col.counts["blk.0.attn_q.weight"]
    assert counts.tolist() == [len(prompt) + len(canvas)]
    np.testing.assert_allclose(sums[0], (rows ** 2).sum(0), rtol=1e-4)
    # K and V (sliding layer) share the input of Q
    np.testing.assert_allclose(col.sums["blk.0.attn_k.weight"], sums, rtol=1e-6)


def test_expert_attribution_hand_built():
    """A mul_mat_id node with hand-chosen routing ids: each expert's sums come from exactly its tokens."""
    lib, ffi = B.lib, B.ffi
    ne0, n_exp, n_used, n_tok = 8, 3, 2, 5
    ctx = B.ggml_context(1 << 20)
    be = lib.ggml_backend_dev_init(lib.ggml_backend_dev_by_type(B.DEV_TYPE_CPU), ffi.NULL)
    try:
        W = lib.ggml_new_tensor_3d(ctx, 0, ne0, 4, n_exp)
        lib.ggml_set_name(W, b"blk.0.ffn_gate_up_exps.weight")
        x = lib.ggml_new_tensor_3d(ctx, 0, ne0, 1, n_tok)
        ids = lib.ggml_new_tensor_2d(ctx, 26, n_used, n_tok)
        out = lib.ggml_mul_mat_id(ctx, W, x, ids)
        assert calibration._observed(out) is None  # products are found by name (graph.py), not by their op
        lib.ggml_set_name(out, b"ffn_gate_up_exps-0")
        g = lib.ggml_new_graph_custom(ctx, 16, False)
        lib.ggml_build_forward_expand(g, out)
        buf = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, lib.ggml_backend_cpu_buffer_type())
        xs = np.arange(n_tok * ne0, dtype=np.float32).reshape(n_tok, ne0) / 10
        route = np.array([[0, 2], [1, 2], [2, 0], [1, 0], [0, 1]], np.int32)
        for t, a in ((x, xs), (ids, route), (W, np.ones(ne0 * 4 * n_exp, np.float32))):
            lib.ggml_backend_tensor_set(t, ffi.from_buffer(a), 0, a.nbytes)
        col = calibration.Collector()
        hit = calibration._observed(out)
        assert hit == ("blk.0.ffn_gate_up_exps.weight", True)
        assert lib.ggml_backend_graph_compute(be, g) == 0
        col._accumulate(out, *hit)
        lib.ggml_backend_buffer_free(buf)
    finally:
        lib.ggml_backend_free(be)
        lib.ggml_free(ctx)
    want = np.zeros((n_exp, ne0))
    cnt = np.zeros(n_exp, int)
    for t in range(n_tok):
        for e in route[t]:
            want[e] += xs[t].astype(np.float64) ** 2
            cnt[e] += 1
    np.testing.assert_allclose(col.sums["blk.0.ffn_gate_up_exps.weight"], want, rtol=1e-6)
    assert col.counts["blk.0.ffn_gate_up_exps.weight"].tolist() == cnt.tolist() == [4, 3, 3]


@pytest.mark.parametrize("mode,n_entries", [("denoise", 59 + 3), ("unified", 59)])
def test_modes_files_and_report(tmp_path, random_tiny, mode, n_entries):
    out = tmp_path / f"im-{mode}.gguf"
    r = dg.imatrix(random_tiny, TEXT, out, chunks=4, mode=mode, progress=False)
    assert r.entries == n_entries and r.chunks == 4 and out.exists()
    assert set(r.coverage) == {f"blk.{i}.ffn_{t}_exps.weight" for i in range(6) for t in ("gate_up", "down")}
    assert all(0 < c <= 1 for c in r.coverage.values())
    if mode == "unified":  # self-conditioning never runs: its weights get no data and a warning
        assert r.missing == ["self_cond_down.weight", "self_cond_gate.weight", "self_cond_up.weight"]
    else:
        assert r.missing == []
    data = imatrix_file.load(out)
    assert len(data) == n_entries and data.chunk_count == 4 and data.chunk_size == 32
    e = data.entries["blk.0.ffn_down_exps.weight"]
    assert e.sums.shape == (4, 32) and e.counts.sum() > 0
    # read back by the quantizer (IQ2_S experts need it)
    rep = dg.quantize(random_tiny, tmp_path / "q.gguf", type="q4_0", imatrix=out, progress=False)
    assert rep.census


def test_dat_format_and_bad_inputs(tmp_path, random_tiny):
    r = dg.imatrix(random_tiny, TEXT, tmp_path / "im.dat", chunks=2, progress=False)
    data = imatrix_file.load(tmp_path / "im.dat")
    assert data.format == "dat" and len(data) == r.entries
    with pytest.raises(dg.Error, match="mode"):
        dg.imatrix(random_tiny, TEXT, tmp_path / "x.gguf", mode="causal")
    with pytest.raises(dg.Error, match="tokens"):
        dg.imatrix(random_tiny, "too short", tmp_path / "x.gguf")
    with pytest.raises(dg.Error):
        dg.imatrix(random_tiny, 42, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_full_layout_entry_count(tmp_path):
    p = testing.write_model(tmp_path / "full.gguf", layout.full_26b_a4b(), wtype="q8_0", sparse=True)
    names = calibration.dry_run_entries(p)
    blk = [n for n in names if n.startswith("blk.")]
    assert len(blk) == 295
    assert sorted(set(names) - set(blk)) == ["self_cond_down.weight", "self_cond_gate.weight", "self_cond_up.weight"]


def _llama_quantize():
    import os
    import shutil

    return os.environ.get("DIFFGEMMA_LLAMA_QUANTIZE") or shutil.which("llama-quantize")


@pytest.mark.skipif(not _llama_quantize(), reason="llama.cpp's llama-quantize is not built here "
                    "(set DIFFGEMMA_LLAMA_QUANTIZE; see docs/imatrix.md)")
@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_llama_quantize_loads_our_files(tmp_path, random_tiny, suffix):
    """llama.cpp's own tool reads both formats ("loaded N importance matrix entries"); it then refuses the
    diffusion-gemma architecture, which is expected."""
    import subprocess

    out = tmp_path / f"im{suffix}"
    r = dg.imatrix(random_tiny, TEXT, out, chunks=3, progress=False)
    p = subprocess.run([_llama_quantize(), "--imatrix", str(out), str(random_tiny), str(tmp_path / "q.gguf"),
                        "Q4_K_M"], capture_output=True, text=True)
    assert f"loaded {r.entries} importance matrix entries" in p.stdout + p.stderr


class _Stop(BaseException):
    """Stands for KeyboardInterrupt / SystemExit without stopping pytest itself."""


def test_an_exception_as_the_callback_starts_stops_the_caller(random_tiny):
    """A signal handler runs at the first bytecode of the Python code C calls next, so Ctrl-C or SIGTERM's
    SystemExit is raised as observe()'s cffi callback starts, before any try inside it (issue 29: cffi
    printed "Exception ignored" and imatrix ran on). Raised there from a trace function, it must stop the
    observed call, and the callback is not called again."""
    import sys

    calls = []

    def callback(t, ask):
        calls.append(ask)
        return True

    def tracer(frame, event, arg):  # the next Python function entered after the callback answered once
        if event == "call" and calls:
            sys.settrace(None)
            raise _Stop
        return None

    with dg.load(random_tiny) as m:
        canvas = np.arange(100, 100 + m.hparams.canvas_length)
        want = m.logits([2, 40, 41], canvas)
        with m.observe(callback):
            sys.settrace(tracer)
            try:
                with pytest.raises(_Stop):
                    m.logits([2, 40, 41], canvas)
            finally:
                sys.settrace(None)
            assert len(calls) == 1
            np.testing.assert_array_equal(m.logits([2, 40, 41], canvas), want)  # the model is fine after it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_imatrix_stops_at_the_first_signal(tmp_path, random_tiny, sig):
    """`diffgemma imatrix` stops promptly at one Ctrl-C / SIGTERM (issue 29: it ran to the end), keeping the
    file of its last periodic save whole and no temporary file."""
    calib, out = tmp_path / "calib.txt", tmp_path / "im.gguf"
    calib.write_text(TEXT * 20)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-m", "diffgemma", "imatrix", "-m", str(random_tiny), "-f", str(calib),
                          "-o", str(out), "--chunks", "200", "--save-every", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not out.exists():  # saved after the first chunk: the run is in its chunks
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.02)
    p.send_signal(sig)
    t0 = time.monotonic()
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    assert time.monotonic() - t0 < 10 and p.returncode == 128 + sig, err
    assert "Exception ignored" not in err
    assert 1 <= imatrix_file.load(out).chunk_count < 200
    assert sorted(f.name for f in tmp_path.iterdir()) == ["calib.txt", "im.gguf"]


def test_a_calibration_file_that_is_not_text_is_refused(tmp_path, random_tiny):
    """Issue 29: a binary file given by mistake was decoded with replacement characters and tokenized whole
    (14 GB); a file whose first block holds a NUL byte or is not UTF-8 is an Error naming it."""
    binary, latin1 = tmp_path / "weights.bin", tmp_path / "latin1.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    latin1.write_bytes(("Juliet, caf\xe9 au lait\n" * 100).encode("latin-1"))
    with pytest.raises(dg.Error, match=r"weights\.bin: not a text file \(byte 0x00 at offset 0\)"):
        dg.imatrix(random_tiny, binary, tmp_path / "im.gguf", chunks=1, progress=False)
    with pytest.raises(dg.Error, match=r"latin1\.txt: not a text file \(byte 0xe9 at offset 11\)"):
        dg.imatrix(random_tiny, latin1, tmp_path / "im.gguf", chunks=1, progress=False)
    assert not (tmp_path / "im.gguf").exists()


def test_only_what_the_chunks_need_is_read(tmp_path, random_tiny, monkeypatch):
    """Issue 29: --chunks 1 on 20 MB of text tokenized all of it (565 MB). Now the file is tokenized a block at a
    time until the chunks have their tokens; a file without newlines in pieces of about LONG_LINE."""
    tokenized = []
    real = dg.Model.tokenize

    def spy(self, text, **kw):
        tokenized.append(len(text))
        return real(self, text, **kw)

    monkeypatch.setattr(dg.Model, "tokenize", spy)
    lines, one_line = tmp_path / "lines.txt", tmp_path / "one-line.txt"
    lines.write_text((TEXT + "\n") * 3000)  # 4.5 MB
    one_line.write_text(TEXT * 3000)
    r = dg.imatrix(random_tiny, lines, tmp_path / "a.gguf", chunks=1, progress=False)
    assert r.chunks == 1 and sum(tokenized) < 200_000  # of 4.5 MB
    tokenized.clear()
    r = dg.imatrix(random_tiny, one_line, tmp_path / "b.gguf", chunks=1, progress=False)
    assert r.chunks == 1 and sum(tokenized) < 1_200_000  # a line of 4.5 MB: in pieces of about 1 MB


def test_tokens_read_a_block_at_a_time_are_those_of_the_whole_text(tmp_path, random_tiny, monkeypatch):
    """Cut after newline runs (where gemma4's tokenizer splits anyway) and decoded incrementally, the text gives
    the tokens it gives whole, multi-byte characters across blocks included."""
    text = "".join(f"{TEXT[i % 50:i % 50 + i % 70]} café — 日本 🙂\t{'  ' * (i % 3)}" + "\n" * (1 + i % 3)
                   for i in range(400))
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    with dg.load(random_tiny) as m:
        whole = m.tokenize(text, add_special=False)
        for block in (5, 97, 4096):
            monkeypatch.setattr(calibration, "BLOCK", block)
            assert calibration._calibration_tokens(m, path, None)[0].tolist() == whole
            assert calibration._calibration_tokens(m, text, None)[0].tolist() == whole
            assert calibration._calibration_tokens(m, [text, text], None)[0].tolist() == whole + whole
            assert len(calibration._calibration_tokens(m, path, 100)[0]) < len(whole)
