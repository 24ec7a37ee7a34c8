"""Repacked CPU weights (ggml's CPU_REPACK extra buffer type): which weights go there, what they compute, and
that a request's numbers still do not depend on its batch or on how its prompt was cut."""

import argparse

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import diffgemma as dg
from diffgemma import binding, cli_flags, testing

# widths that are multiples of 8 rows (the repack kernels' interleave) and of 256 (K-quant blocks)
HP = testing.tiny_hparams(n_embd=256, n_ff=256, n_ff_exp=256, n_expert=8, n_expert_used=2)


def repack_available() -> bool:
    cpu = binding.lib.ggml_backend_dev_by_type(binding.DEV_TYPE_CPU)
    return any(binding.product_supported(cpu, b, int(QT.Q4_0), (256, 256))
               for b in binding.extra_buffer_types(cpu))


needs_repack = pytest.mark.skipif(not repack_available(), reason="this ggml/CPU has no repacked Q4_0 kernel")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("repack")
    src = testing.write_model(d / "f32.gguf", HP, weights=testing.random_weights(HP, seed=0, calm=True))
    out = {"f32": src}
    for t in ("q4_0", "q4_k", "q4_1", "q5_1"):
        dg.quantize(src, d / f"{t}.gguf", type=t, progress=False)
        out[t] = d / f"{t}.gguf"
    return out


@needs_repack
@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_matrices_are_repacked_and_compute_the_same_products(files, qtype):
    rng = np.random.default_rng(0)
    prompt = [testing.BOS, *rng.integers(3, HP.n_vocab, 20).tolist()]
    canvas = rng.integers(3, HP.n_vocab, HP.canvas_length).tolist()
    with dg.load(files["f32"], threads=1) as m:
        ref = m.logits(prompt, canvas)
    logits = {}
    for repack in (False, True):
        with dg.load(files[qtype], repack=repack, threads=1) as m:
            logits[repack] = m.logits(prompt, canvas)
            if not repack:
                assert m.repacked == []
                continue
            # Q4_K keeps ggml's tiled GEMM, faster here than the repacked kernels (dense 2x, experts 2.8x)
            assert ("blk.0.attn_q.weight" in m.repacked) == (qtype == "q4_0")
            assert ("blk.0.ffn_down_exps.weight" in m.repacked) == (qtype == "q4_0")
            # the embedding is also gathered by rows: never repacked; the router is F32: no kernel
            assert "token_embd.weight" not in m.repacked and "blk.0.ffn_gate_inp.weight" not in m.repacked
    # another summation order and activation rounding: no further from the F32 weights' logits than mapped
    # (this small random model amplifies any rounding: Q8_0 is 0.5 from F32 here)
    err = {k: np.abs(v - ref) for k, v in logits.items()}
    assert err[True].max() < 1.1 * err[False].max() and err[True].mean() < 1.1 * err[False].mean()


@needs_repack
def test_repacked_batches_equal_solo_runs_and_prompt_cuts_do_not_matter(files):
    """Repacked dense products run rows in groups of 4 by a GEMM and the rest one by one (other rounding): without
    padding to whole groups, a prompt cut at 22 (chunks of 16) changed the logits (seen on Q4_K)."""
    rng = np.random.default_rng(0)
    prompt = [testing.BOS, *rng.integers(3, HP.n_vocab, 37).tolist()]
    with dg.load(files["q4_0"], n_batch=16) as m:
        assert m.repacked
        canvas = rng.integers(3, HP.n_vocab, HP.canvas_length).tolist()
        want = m.logits(prompt, canvas)
        for cut in (1, 3, 5, 6, 13, 22, 37):
            m.reset()
            m.prefill(prompt[:cut])
            np.testing.assert_array_equal(m.logits(prompt, canvas), want, err_msg=f"cut {cut}")
        prompts = [[testing.BOS, *rng.integers(3, HP.n_vocab, n).tolist()] for n in (1, 5, 2, 30, 7)]
        kw = dict(seed=[1, 2, 3, 4, 5], steps=4, max_new_tokens=32)
        got = m.generate_batch(prompts, **kw)
        for i, p in enumerate(prompts):
            alone = m.generate(p, seed=kw["seed"][i], steps=4, max_new_tokens=32)
            assert got[i].tokens == alone.tokens


@pytest.mark.parametrize("qtype", ["q4_1", "q5_1"])
def test_dot_only_matrices_are_copied_as_f32_with_the_same_values(files, qtype):
    """Q4_1 and Q5_1 have only ggml's dot-product kernel on CPU: their dense matrices are loaded as F32 copies of
    the values ggml dequantizes them to (expert stacks stay mapped), and prompt cuts still do not matter."""
    from diffgemma import gguf_file

    rng = np.random.default_rng(1)
    prompt = [testing.BOS, *rng.integers(3, HP.n_vocab, 37).tolist()]
    canvas = rng.integers(3, HP.n_vocab, HP.canvas_length).tolist()
    with dg.load(files["f32"], threads=1) as m:
        ref = m.logits(prompt, canvas)
    gf = gguf_file.read(files[qtype])
    logits = {}
    for repack in (False, True):
        with dg.load(files[qtype], repack=repack, threads=1, n_batch=16) as m:
            logits[repack] = m.logits(prompt, canvas)
            if not repack:
                assert m.repacked == []
                continue
            qt = int(QT.Q4_1 if qtype == "q4_1" else QT.Q5_1)
            dense = sorted(n for n, i in gf.tensors.items() if i.type == qt and len(i.shape) == 2)
            assert "blk.0.ffn_down.weight" in dense and "token_embd.weight" in dense
            # expert stacks (3-D) and the embedding (also gathered by rows) stay mapped
            assert sorted(m.repacked) == [n for n in dense if n != "token_embd.weight"]
            w = m.weights.layers[0].ffn_down
            assert w.type == binding.F32
            got = np.empty(w.ne[0] * w.ne[1], np.float32)
            binding.lib.ggml_backend_tensor_get(w, binding.ffi.from_buffer(got), 0, got.nbytes)
            want = gguf_file.decode(np.fromfile(files[qtype], np.uint8), gf.tensors["blk.0.ffn_down.weight"])
            np.testing.assert_array_equal(got, want)
            for cut in (1, 6, 22):  # F32 GEMM rows are independent: a prompt cut anywhere gives the same logits
                m.reset()
                m.prefill(prompt[:cut])
                np.testing.assert_array_equal(m.logits(prompt, canvas), logits[True], err_msg=f"cut {cut}")
    # F32 activations instead of Q8_1-rounded ones: no further from the F32 weights' logits than mapped
    err = {k: np.abs(v - ref) for k, v in logits.items()}
    assert err[True].max() < 1.1 * err[False].max() and err[True].mean() < 1.1 * err[False].mean()
    assert np.abs(logits[True] - logits[False]).max() > 0  # the F32 copies were really used


def test_no_f32_copies_when_gpus_run_layers(files):
    """ggml's scheduler uploads the CPU layers' weights to a GPU for large batches: an F32 copy would be 5-6x the
    bytes of the file's blocks, so a placement with GPU layers keeps Q4_1/Q5_1 mapped."""
    from diffgemma import cpu_layout, gguf_file

    cpu = binding.lib.ggml_backend_dev_by_type(binding.DEV_TYPE_CPU)
    info = gguf_file.read(files["q5_1"]).tensors["blk.0.ffn_down.weight"]
    assert cpu_layout.choose(cpu, info) == cpu_layout.DEQUANTIZE
    assert cpu_layout.choose(cpu, info, f32_copies=False) is None


def test_repack_must_be_a_bool_and_the_cli_flag_turns_it_off(random_tiny):
    with pytest.raises(dg.Error, match="repack must be True or False"):
        dg.load(random_tiny, repack="no")
    p = argparse.ArgumentParser()
    cli_flags.runtime_args(p)
    assert p.parse_args([]).repack is True
    assert p.parse_args(["--no-repack"]).repack is False
