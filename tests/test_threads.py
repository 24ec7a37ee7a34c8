"""CPU threads (issue 29, defect 2): every command that computes takes -t and every entry point threads=; the
default is one thread per physical core, and ggml's OpenMP threads wait passively, so a step does not collapse
when other work shares the cores (bench/threads.py measures it; docs/performance.md has the numbers)."""

import argparse
import inspect
import os
import subprocess
import sys

import pytest

import diffgemma as dg
from diffgemma import bench, binding, calibration, cli, model

COMPUTING = ["generate", "chat", "serve", "bench", "validate", "quantize", "imatrix", "rpc-server"]
NOT_COMPUTING = ["info", "convert"]  # no ggml graph runs: reading metadata, numpy conversion


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.build_parser()
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_computing_command_takes_threads():
    subs = _subparsers()
    assert set(subs) == set(COMPUTING) | set(NOT_COMPUTING)  # a new command must be sorted into one list
    required = {"imatrix": ["--text", "x", "-o", "o.gguf"], "validate": ["tiny"], "quantize": ["tiny", "o.gguf"]}
    for name in COMPUTING:
        for flag in ("-t", "--threads"):
            a = subs[name].parse_args([*required.get(name, []), flag, "3"])
            assert a.threads == 3, (name, flag)
        assert subs[name].parse_args(required.get(name, [])).threads is None, name
        assert "(default: " in subs[name].format_help(), name


@pytest.mark.parametrize("fn", [dg.load, dg.generate, dg.stream, dg.chat, dg.imatrix, dg.quantize, bench.bench,
                                bench.validate], ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_every_entry_point_takes_threads(fn):
    p = inspect.signature(fn).parameters["threads"]
    assert p.kind is p.KEYWORD_ONLY and p.default is None
    assert "threads" in inspect.getdoc(fn)


@pytest.fixture
def loads(monkeypatch):
    """The threads= each model.load call got (the calls still load)."""
    seen = []
    real = model.load

    def spy(path, **kw):
        seen.append(kw.get("threads"))
        return real(path, **kw)

    monkeypatch.setattr(model, "load", spy)
    monkeypatch.setattr(dg, "load", spy)
    return seen


def test_threads_reach_the_model(random_tiny, tmp_path, loads):
    dg.generate("hi", model=str(random_tiny), threads=1, max_new_tokens=4, steps=1, seed=1)
    assert loads[-1] == 1
    dg.generate("hi", model=str(random_tiny), threads=2, max_new_tokens=4, steps=1, seed=1)
    assert loads[-1] == 2  # another thread count is another cached model
    assert dg._cache and next(iter(dg._cache.values())).threads == 2
    with dg.stream("hi", model=str(random_tiny), threads=1, max_new_tokens=4, steps=1, seed=1) as s:
        list(s)
    assert loads[-1] == 1
    dg.chat([{"role": "user", "content": "hi"}], model=str(random_tiny), threads=2, max_new_tokens=4, steps=1)
    assert loads[-1] == 2
    calibration.imatrix(random_tiny, "to be or not to be " * 40, tmp_path / "i.gguf", chunks=1, threads=1,
                        progress=False)
    assert loads[-1] == 1
    bench.validate(random_tiny, max_new_tokens=4, threads=1, progress=False, prompts={"one": "hi"})
    assert loads[-1] == 1


def test_cli_threads_reach_imatrix_and_validate(random_tiny, tmp_path, loads, capsys):
    assert cli.main(["imatrix", "-m", str(random_tiny), "--text", "to be or not to be " * 40, "--chunks", "1",
                     "-o", str(tmp_path / "i.gguf"), "-t", "1"]) == 0
    assert loads[-1] == 1
    assert cli.main(["validate", str(random_tiny), "-n", "4", "-t", "1", "-o", str(tmp_path / "v.md")]) == 0
    assert loads[-1] == 1


def test_default_is_one_thread_per_physical_core(tmp_path):
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3", "4"]):  # two SMT cores and a lone one
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(siblings + "\n")
    assert binding.physical_cores({0, 1, 2, 3, 4}, tmp_path) == 3
    assert binding.physical_cores({0, 2}, tmp_path) == 1
    assert binding.physical_cores({0, 1, 7}, tmp_path) == 3  # no topology: count the CPUs
    n = binding.default_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    with dg.load("tiny") as m:
        assert m.threads == n


_SHOW_OPENMP = """
import ctypes, os, sys
import diffgemma.binding
if not any("libgomp" in line for line in open("/proc/self/maps")):
    sys.exit(3)  # this ggml is not built with GNU OpenMP
print("env", os.environ.get("OMP_WAIT_POLICY"), flush=True)
ctypes.CDLL("libgomp.so.1").omp_display_env(1)  # verbose: with GOMP_SPINCOUNT, the spins before sleeping
"""


@pytest.mark.parametrize("given, spins", [(None, "0"), ("ACTIVE", "30000000000")])  # libgomp's default: 300000
def test_ggml_openmp_threads_wait_passively_unless_told_otherwise(given, spins):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if given:
        env["OMP_WAIT_POLICY"] = given
    r = subprocess.run([sys.executable, "-c", _SHOW_OPENMP], env=env, capture_output=True, text=True)
    if r.returncode == 3:
        pytest.skip("ggml is not linked with libgomp")
    assert r.returncode == 0, r.stderr
    assert f"GOMP_SPINCOUNT = '{spins}'" in r.stdout + r.stderr
    assert f"env {given}" in r.stdout  # set only while ggml loads: child processes do not inherit it
