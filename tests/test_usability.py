"""A new user's first hour (issue 14): outputs never replaced unasked, SIGTERM leaves no temporary files,
paths are never text, -1 seeds, command-line wording, real signatures, short reports, chat commands."""

import functools
import inspect
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import bench, cli, cli_display, gguf_file, outputs, testing

TEXT = ("But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.\n") * 8


@pytest.fixture(scope="module")
def k_shaped(tmp_path_factory):
    """Rows that hold 256-blocks (IQ2_S experts need an imatrix), some that do not (fallbacks)."""
    hp = testing.tiny_hparams(n_embd=256, n_ff=320, n_ff_exp=128, head_dim=64, head_dim_swa=32)
    return testing.write_model(tmp_path_factory.mktemp("k") / "k.gguf", hp,
                               weights=testing.random_weights(hp, calm=True))


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- 1. a calibration path is a path ------------------------------------------------------------------------

def test_imatrix_missing_file_is_an_error(capsys, tmp_path, random_tiny):
    out = tmp_path / "x.imatrix.gguf"
    rc, _, err = run_cli(capsys, "imatrix", "-m", random_tiny, "-f", tmp_path / "NO_SUCH_FILE.txt", "-o", out)
    assert rc == 2 and "no such calibration file" in err and not out.exists()
    with pytest.raises(dg.Error, match="no such calibration file"):
        dg.imatrix(random_tiny, tmp_path / "NO_SUCH_FILE.txt", out, progress=False)


def test_imatrix_str_is_text_and_a_path_is_a_file(capsys, tmp_path, random_tiny):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    with pytest.raises(dg.Error, match="pathlib.Path"):  # a str naming a file is never tokenized as text
        dg.imatrix(random_tiny, str(calib), tmp_path / "a.gguf", progress=False)
    with pytest.raises(dg.Error, match="pathlib.Path"):  # nor is a short one-line str silently used
        dg.imatrix(random_tiny, "calib.txt", tmp_path / "a.gguf", progress=False)
    r = dg.imatrix(random_tiny, calib, tmp_path / "a.gguf", chunks=1, progress=False)
    assert r.chunks == 1
    rc, out, _ = run_cli(capsys, "imatrix", "-m", random_tiny, "-f", calib, "-o", tmp_path / "b.gguf",
                         "--chunks", 1)
    assert rc == 0 and "1 chunks" in out


# ---- 2. bench --compare transformers -----------------------------------------------------------------------

def test_bench_compare_resolves_tiny_and_checks_the_extra_first(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "ours", lambda m, **kw: {"step_ms": 1.0})
    monkeypatch.setattr(bench, "hf_model_from_gguf", lambda path, dtype: seen.append(path) or object())
    monkeypatch.setattr(bench, "transformers_step", lambda ref, **kw: {"prefill_ms": 1.0, "step_ms": 1.0,
                                                                       "effective_tokens_per_s": 1.0})
    r = bench.bench("tiny", prompt_tokens=4, steps=1, n_gpu_layers=0, compare="transformers")
    assert r.transformers and seen and pathlib.Path(seen[0]).is_file()

    monkeypatch.setitem(sys.modules, "torch", None)  # as if the test extra were not installed
    monkeypatch.setattr(bench, "ours", lambda *a, **kw: pytest.fail("timed our half before the check"))
    with pytest.raises(dg.Error, match=r"pip install '\.\[test\]'"):
        bench.bench("tiny", prompt_tokens=4, steps=1, compare="transformers")


# ---- 3. seeds ----------------------------------------------------------------------------------------------

def test_seed_minus_one_is_random_and_bad_seeds_are_errors(capsys, tmp_path, random_tiny):
    rc, out, err = run_cli(capsys, "generate", "hi", "-m", random_tiny, "--seed", -1, "-n", 4, "--steps", 1,
                           "--json")
    assert rc == 0, err
    with dg.load(random_tiny) as m:
        assert m.generate("hi", seed=-1, max_new_tokens=4, steps=1).seed >= 0
        for bad in (-2, 1.5, "7", True):
            with pytest.raises(dg.Error, match="seed"):
                m.generate("hi", seed=bad, max_new_tokens=4, steps=1)
        with pytest.raises(dg.Error, match="seed"):
            dg.imatrix(m, TEXT, tmp_path / "s.gguf", seed=-2, progress=False)


# ---- 4. existing outputs ----------------------------------------------------------------------------------

def test_existing_outputs_are_refused_without_force(capsys, tmp_path, random_tiny):
    dst = tmp_path / "existing.gguf"
    dst.write_bytes(b"mine")
    with pytest.raises(dg.Error, match="overwrite=True"):
        dg.quantize(random_tiny, dst, type="q8_0", progress=False)
    rc, _, err = run_cli(capsys, "quantize", random_tiny, dst, "--type", "q8_0")
    assert rc == 2 and "--force" in err and dst.read_bytes() == b"mine"
    rc, _, err = run_cli(capsys, "quantize", random_tiny, dst, "--type", "q8_0", "--force")
    assert rc == 0 and gguf_file.read(dst).tensors
    rep = dg.quantize(random_tiny, dst, type="q8_0", progress=False, overwrite=True)
    assert rep.size_bytes == dst.stat().st_size

    im = tmp_path / "x.imatrix.gguf"
    im.write_bytes(b"mine too")
    rc, _, err = run_cli(capsys, "imatrix", "-m", random_tiny, "--text", TEXT, "-o", im)
    assert rc == 2 and "--force" in err and im.read_bytes() == b"mine too"
    with pytest.raises(dg.Error, match="already exists"):
        dg.imatrix(random_tiny, TEXT, im, progress=False)
    rc, _, err = run_cli(capsys, "imatrix", "-m", random_tiny, "--text", TEXT, "-o", im, "--chunks", 1, "--force")
    assert rc == 0, err
    report = tmp_path / "report.md"
    report.write_text("notes")
    rc, _, err = run_cli(capsys, "validate", random_tiny, "-o", report)
    assert rc == 2 and "--force" in err and report.read_text() == "notes"


# ---- 5. SIGTERM and stale temporary files -------------------------------------------------------------------

SLOW_QUANTIZE = textwrap.dedent("""
    import sys, time
    from diffgemma import cli, quantizer
    real = quantizer._encode_chunk
    def slow(*a, **kw):
        print("encoding", flush=True)
        time.sleep(0.2)
        return real(*a, **kw)
    quantizer._encode_chunk = slow
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_sigterm_during_quantize_leaves_no_temporary_file(tmp_path, random_tiny):
    dst = tmp_path / "q.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZE, "quantize", str(random_tiny), str(dst), "--type",
                          "q8_0", "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "encoding"  # the temporary file is open and being written
    assert list(tmp_path.glob(".q.gguf.tmp-*"))
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM, p.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path, random_tiny):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".q.gguf.tmp-{dead.pid}"
    live = tmp_path / f".q.gguf.tmp-{os.getppid()}"  # a running process: maybe still writing
    other = tmp_path / f".other.gguf.tmp-{dead.pid}"  # another output's: not ours to judge
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    dg.quantize(random_tiny, tmp_path / "q.gguf", type="q8_0", progress=False)
    assert not stale.exists() and live.exists() and other.exists()
    assert outputs.remove_stale(tmp_path / "other.gguf") == [other]


def test_sigterm_unwinds_only_while_inside():
    before = signal.getsignal(signal.SIGTERM)
    assert before is signal.SIG_DFL  # else the signal below would go to someone else's handler
    with outputs.sigterm_unwinds():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(SystemExit) as ei:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert ei.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before


# ---- 6. the command line names flags --------------------------------------------------------------------------

def test_cli_errors_name_flags_not_keywords(capsys, tmp_path, random_tiny, k_shaped):
    rc, _, err = run_cli(capsys, "quantize", random_tiny, tmp_path / "a.gguf")
    assert rc == 2 and "--recipe, --type or --tensor-type" in err and "recipe=" not in err
    rc, _, err = run_cli(capsys, "quantize", k_shaped, tmp_path / "a.gguf", "--recipe", "asym-2bitexp")
    assert rc == 2 and "--imatrix" in err and "--tensor-type 'ffn_gate_up_exps=q2_K'" in err and "imatrix=" not in err
    q8 = tmp_path / "q8.gguf"
    dg.quantize(random_tiny, q8, type="q8_0", progress=False)
    rc, _, err = run_cli(capsys, "quantize", q8, tmp_path / "b.gguf", "--type", "q4_0", "--no-requantize")
    assert rc == 2 and "--no-requantize" in err and "allow_requantize" not in err
    rc, _, err = run_cli(capsys, "quantize", random_tiny, tmp_path / "a.gguf", "--type", "asym-2bitexp")
    assert rc == 2 and "--recipe asym-2bitexp" in err
    with pytest.raises(dg.Error, match="allow_requantize=True"):  # the API keeps its own wording
        dg.quantize(q8, tmp_path / "b.gguf", type="q4_0", allow_requantize=False, progress=False)


# ---- 7. notebooks: real signatures, short reports ---------------------------------------------------------

def test_public_functions_show_their_real_parameters():
    assert {"recipe", "type", "imatrix", "overrides", "dry_run", "overwrite"} <= set(
        inspect.signature(dg.quantize).parameters)
    assert {"chunks", "mode", "format", "save_every", "overwrite"} <= set(inspect.signature(dg.imatrix).parameters)
    assert {"outtype", "overwrite"} <= set(inspect.signature(dg.convert).parameters)
    model_kw = set(inspect.signature(dg.Model.generate).parameters) - {"self"}
    sig = inspect.signature(dg.generate)
    assert model_kw <= set(sig.parameters) and sig.parameters["model"].default == "tiny"
    for f in (dg.quantize, dg.imatrix, dg.generate, dg.convert):
        assert "**" not in str(inspect.signature(f)) and len(inspect.getdoc(f)) > 200


def test_reports_have_a_short_repr_and_a_full_table(tmp_path, random_tiny, k_shaped):
    rep = dg.quantize(k_shaped, tmp_path / "q.gguf", type="q4_K", progress=False)
    r = repr(rep)
    assert len(r) < 300 and "q4_K" in r and "fallback" in r and "bits per weight" in r
    table = rep.table()
    assert all(name in table for name, *_ in rep.tensors) and "fallback" in table
    im = dg.imatrix(random_tiny, TEXT, tmp_path / "im.gguf", chunks=1, progress=False)
    assert len(repr(im)) < 300 and "entries" in repr(im)


# ---- 8. chat: progress, Ctrl-C cancels the reply, /help -----------------------------------------------------

def test_chat_help_progress_and_cancelled_reply(capsys, monkeypatch, random_tiny):
    lines = iter(["/help", "/nonsense", "first", "second", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    real = dg.Model.stream
    calls = []

    def interrupted():
        yield dg.StepEvent(0, 1, 2, 1.0, 3, 1.0, np.zeros(4, np.int64))  # the progress bar shows this step
        raise KeyboardInterrupt  # Ctrl-C in the middle of the first reply

    def stream(self, messages, **kw):
        calls.append([m["content"] for m in messages])
        return dg.Stream(interrupted(), seed=0) if len(calls) == 1 else real(self, messages, **kw)

    monkeypatch.setattr(dg.Model, "stream", stream)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: progress is shown
    rc = cli.main(["chat", "-m", str(random_tiny), "-n", "4", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    assert calls == [["first"], ["second"]]  # /help and /nonsense never reach the model; "first" was dropped
    assert "/clear forgets" in err and "unknown command /nonsense" in err and "(reply cancelled)" in err
    assert "denoising" in err  # the progress bar


def test_progress_bar_advances_on_committed_canvases(random_tiny):
    with dg.load(random_tiny, threads=1) as m:
        bar = cli_display.StepBar(3)
        with m.stream("hi", max_new_tokens=48, steps=2, stability=None, seed=0) as s:
            for ev in s:
                bar.show(ev)
                if isinstance(ev, dg.StepEvent):  # a step shows where it is; only a commit moves the bar
                    assert bar.bar.n == ev.canvas_index and f"step {ev.step}/2" in bar.bar.postfix
        assert bar.bar.n == len(s.generation.canvases) == 3
        bar.clear()


# ---- 9. consistent defaults, one bits-per-weight, silent mistakes ---------------------------------------------

def test_serve_defaults_to_tiny_like_every_command():
    p = cli.build_parser()
    for cmd in (["serve"], ["generate", "x"], ["chat"], ["bench"]):
        assert p.parse_args(cmd).model == "tiny"


def test_bits_per_weight_is_one_definition(capsys, tmp_path, random_tiny):
    dst = tmp_path / "q.gguf"
    rep = dg.quantize(random_tiny, dst, recipe="q4_k_m", progress=False)
    rc, out, _ = run_cli(capsys, "info", dst)
    assert rc == 0 and f"bits/weight: {rep.bits_per_weight:.3f}" in out
    assert f"({rep.bits_per_weight:.3f} bits per weight)" in rep.summary()
    gf = gguf_file.read(dst)
    n = sum(int(__import__("math").prod(t.shape)) for t in gf.tensors.values())
    assert rep.bits_per_weight == pytest.approx(8 * sum(t.nbytes for t in gf.tensors.values()) / n)


def test_override_matching_nothing_warns(tmp_path, random_tiny):
    with pytest.warns(UserWarning, match="matches no quantizable tensor"):
        rep = dg.quantize(random_tiny, tmp_path / "q.gguf", type="q8_0", overrides=[("ffn_gaet", "q4_0")],
                          dry_run=True)
    assert any("ffn_gaet" in w for w in rep.warnings)


def test_unknown_chat_role_is_refused(random_tiny):
    with dg.load(random_tiny) as m, pytest.raises(dg.Error, match="wizard"):
        m.generate([{"role": "wizard", "content": "hi"}], max_new_tokens=4, steps=1)


def test_embedded_model_has_a_real_name(capsys):
    rc, out, _ = run_cli(capsys, "info", "tiny")
    assert rc == 0 and "name: hf" not in out and "shakespeare" in out.lower()


# ---- 10. every flag explains itself; validate shows progress ---------------------------------------------------

def test_every_flag_has_help_text():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.choices and isinstance(a.choices, dict))
    missing = [f"{name} {a.dest}" for name, sp in sub.choices.items() for a in sp._actions
               if not a.help and a.dest != "help"]
    assert missing == []


def test_validate_shows_progress(capsys, monkeypatch, random_tiny):
    monkeypatch.setattr(dg.Model, "generate", functools.partialmethod(dg.Model.generate, steps=1))
    bench.validate(random_tiny, prompts={"a": "hi", "b": "ho"}, max_new_tokens=4, progress=True)
    assert "validate" in capsys.readouterr().err
    bench.validate(random_tiny, prompts={"a": "hi"}, max_new_tokens=4, progress=False)
    assert capsys.readouterr().err == ""
