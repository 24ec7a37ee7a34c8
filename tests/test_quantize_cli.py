"""`diffgemma quantize` with llama-quantize's positional orders and flags."""

from __future__ import annotations

import shutil

import pytest

from diffgemma import cli, gguf_file, testing
from diffgemma import quantizer as qz

HP = dict(n_embd=256, n_ff=256, n_ff_exp=256, head_dim=64, head_dim_swa=64)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("qcli")
    return testing.write_model(d / "src.gguf", testing.tiny_hparams(**HP))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["quantize", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_llama_quantize_orders(src, tmp_path, capsys):
    rc, out, _ = _run(capsys, src, tmp_path / "a.gguf", "q4_k_m", "--dry-run")  # SRC DST TYPE
    api = qz.quantize(src, tmp_path / "a.gguf", recipe="Q4_K_M", dry_run=True)
    assert rc == 0 and api.census_str in out and "MOSTLY_Q4_K_M" in out
    # SRC TYPE NTHREADS: ggml-model-TYPE.gguf next to SRC (the ftype may be its number, 7 = Q8_0)
    local = shutil.copy(src, tmp_path / "m.gguf")
    rc, out, _ = _run(capsys, local, "7", "2")
    written = tmp_path / "ggml-model-Q8_0.gguf"
    assert rc == 0 and written.exists() and gguf_file.read(written).metadata["general.file_type"] == 7
    # SRC DST --recipe stays as before
    rc, out, _ = _run(capsys, "--recipe", "Q4_0", src, tmp_path / "b.gguf", "--dry-run")
    assert rc == 0 and "MOSTLY_Q4_0" in out


def test_flags(src, tmp_path, capsys):
    tt = tmp_path / "types.txt"
    tt.write_text("ffn_gate_up_exps=q8_0\n  attn_q=q5_0 ")
    rc, out, _ = _run(capsys, "--tensor-type", "ATTN_K=q8_0", "--tensor-type-file", tt, "--token-embedding-type",
                      "q8_0", "--prune-layers", "1,2", "--override-kv", "general.name=str:x", "--dry-run",
                      src, tmp_path / "c.gguf", "Q4_K_M")
    api = qz.quantize(src, tmp_path / "c.gguf", recipe="Q4_K_M", dry_run=True, prune_layers=[1, 2],
                      overrides=[("attn_k", "q8_0"), ("ffn_gate_up_exps", "q8_0"), ("attn_q", "q5_0")],
                      token_embedding_type="q8_0", override_kv=["general.name=str:x"])
    assert rc == 0 and api.census_str in out and "q5_0" in api.census
    assert dict((n, t) for n, _, _, t in api.tensors)["blk.0.attn_k.weight"] == "q8_0"
    assert len(api.tensors) < len(gguf_file.read(src).tensors)  # two blocks fewer


def test_trailing_thread_count_zero_means_the_default(src, tmp_path, capsys):
    """llama-quantize [options] input [output] type [nthreads]: nthreads <= 0 is its default (issue 29)."""
    rc, out, err = _run(capsys, src, tmp_path / "z.gguf", "Q4_K_M", "0", "--dry-run")
    assert rc == 0 and "MOSTLY_Q4_K_M" in out, err
    rc, _, err = _run(capsys, src, tmp_path / "z.gguf", "Q4_K_M", "0", "-t", "2", "--dry-run")
    assert rc == 0, err  # 0 names no count: -t gives it


@pytest.mark.parametrize("argv,msg", [
    (("{src}", "{dst}", "NOPE"), "unknown file type"),
    (("{src}", "{dst}", "Q4_K_M", "--recipe", "Q8_0"), "given twice"),
    (("{src}", "{dst}", "Q4_K_M", "x"), "SRC [DST] TYPE [NTHREADS]"),
    (("{src}",), "SRC TYPE"),
    (("{src}", "{dst}", "Q4_K_M", "--override-kv", "general.name"), "KEY=TYPE:VALUE"),
    (("{src}", "{dst}", "Q4_K_M", "--include-weights", "a", "--exclude-weights", "b"), "together"),
])
def test_bad_arguments(src, tmp_path, capsys, argv, msg):
    rc, _, err = _run(capsys, *(a.format(src=src, dst=tmp_path / "d.gguf") for a in argv))
    assert rc == 2 and msg in err and not (tmp_path / "d.gguf").exists()
