"""CUDA (or any GPU backend): the same model on the GPU agrees with the CPU. Skips cleanly without a GPU."""

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import binding, testing

GPU = [d["name"] for d in binding.devices() if d["type"] in ("gpu", "igpu")]
pytestmark = pytest.mark.skipif(not GPU, reason="no GPU backend in this ggml build")


@pytest.mark.parametrize("wtype", ["f32", "q8_0"])
def test_gpu_logits_match_cpu(tmp_path, wtype):
    hp = testing.tiny_hparams()
    w = testing.random_weights(hp, 1, calm=True)
    p = testing.write_model(tmp_path / f"m-{wtype}.gguf", hp, wtype=wtype, weights=w)
    prompt, canvas = [2] + list(range(10, 30)), list(range(40, 40 + hp.canvas_length))
    with dg.load(p, n_gpu_layers=0) as cpu, dg.load(p, n_gpu_layers=-1) as gpu:
        assert gpu.devices[0] == GPU[0]
        a, b = cpu.logits(prompt, canvas), gpu.logits(prompt, canvas)
        a2, b2 = cpu.logits(prompt, canvas, self_cond=a / 0.8), gpu.logits(prompt, canvas, self_cond=a / 0.8)
    tol = 1e-3 if wtype == "f32" else 0.3
    assert np.abs(a - b).max() < tol and np.abs(a2 - b2).max() < tol


def test_gpu_generation_and_partial_offload(tmp_path):
    hp = testing.tiny_hparams()
    p = testing.write_model(tmp_path / "m.gguf", hp, weights=testing.random_weights(hp, 2, calm=True))
    with dg.load(p, n_gpu_layers=3) as part, dg.load(p, n_gpu_layers=-1) as full:
        g1 = part.generate("hello", max_new_tokens=32, steps=6, seed=1)
        g2 = full.generate("hello", max_new_tokens=32, steps=6, seed=1)
    assert len(g1.tokens) == len(g2.tokens) == 32


def test_gpu_batched_step_matches_the_solo_step(tmp_path):
    """A batch of canvases in one pass on the GPU: each row's statistics as its own pass gives (cuBLAS may tile
    a wider product differently, so entropies are compared within float tolerance, not bit for bit)."""
    hp = testing.tiny_hparams()
    p = testing.write_model(tmp_path / "m.gguf", hp, weights=testing.random_weights(hp, 3, calm=True))
    rng = np.random.default_rng(0)
    L = hp.canvas_length
    with dg.load(p, n_gpu_layers=-1) as m:
        seqs = [m.new_sequence() for _ in range(3)]
        prefixes = [rng.integers(3, hp.n_vocab, n) for n in (5, 9, 2)]
        asks = [dg.batching.Denoise(rng.integers(0, hp.n_vocab, L), 0.9, False, rng.random(L, dtype=np.float32))
                for _ in seqs]
        for seq, pre in zip(seqs, prefixes, strict=True):
            m.prefill(pre, sequence=seq)
        batched = m.denoise_batch(list(zip(seqs, asks, strict=True)))
        for pre, ask, got in zip(prefixes, asks, batched, strict=True):
            m.prefill(pre)
            argmax, entropy, _ = m.denoise_step(ask.canvas, ask.temperature, False, ask.uniform)
            assert (got[0] == argmax).mean() > 0.95 and np.abs(got[1] - entropy).max() < 1e-3
