"""The compact prompt-KV store (kv.py): ring masks, growth, reuse, memory errors, the F16 store type.

Logit parity with transformers far past the window lives in test_golden.py (ring wrap, multi-canvas)."""

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import cli, kv, testing

INF = -np.inf


def test_attention_mask_rules():
    """Encoder: causal within the window (p - W < k <= p); decoder block: itself plus the W-1 positions before
    it; empty slots (-1) never visible; slot order does not matter (a ring)."""
    kpos = np.array([8, 9, 3, 4, 5, 6, 7, -1])  # a ring that wrapped: slots hold positions 8, 9, 3..7
    enc = kv.attention_mask(kpos, np.array([8, 9]), causal=True, window=4)
    assert (enc == 0).tolist() == [[True, False, False, False, True, True, True, False],
                                   [True, True, False, False, False, True, True, False]]
    full = kv.attention_mask(kpos, np.array([8, 9]), causal=True)
    assert (full == 0).sum(1).tolist() == [6, 7]
    dec = kv.attention_mask(kpos, np.array([8, 9]), causal=False, window=4)
    assert (dec == 0).tolist() == [[True, True, False, False, True, True, True, False]] * 2
    assert set(np.unique(dec)) <= {0.0, INF}


def test_store_sizes_of_the_26b_layout():
    """F16: 20 KB per committed token (5 global layers x 2 KV heads x 512 x K,V x 2 B) and a fixed ring;
    262,144 tokens fit in well under 6 GB (the F32 all-layers store needed ~115 GB)."""
    hp = dg.layout.full_26b_a4b()
    assert kv.bytes_per_token(hp, kv.F16) == 5 * 2 * 512 * 2 * 2
    assert kv.ring_slots(hp, 512) == 1536  # 1023 + 512 in whole tiles of 64 keys
    assert kv.ring_bytes(hp, kv.F16, 512) == 1536 * 25 * 8 * 256 * 2 * 2
    total = kv.store_bytes(hp, kv.F16, 262144, 512)
    assert total <= 6e9 and total / 262144 <= 25e3


def test_global_store_grows_and_reset_keeps_it(tiny_f32, monkeypatch):
    """The global layers' store starts at GROW_TOKENS and grows in chunks as the context fills; logits equal
    a store allocated in one go; reset keeps the allocation."""
    prompt = [2] + np.random.default_rng(5).integers(7, 512, 200).tolist()
    canvas = list(range(300, 316))
    with dg.load(tiny_f32, n_ctx=1024, kv_type="f32") as whole:
        assert whole.prompt_kv.capacity == 1024
        want = whole.logits(prompt, canvas)
    monkeypatch.setattr(kv, "GROW_TOKENS", 32)
    with dg.load(tiny_f32, n_ctx=1024, n_batch=24, kv_type="f32") as m:
        assert m.prompt_kv.capacity == 64 and m.n_ctx == 1024  # stores hold whole tiles of 64 keys
        small = m.kv_bytes
        hp = m.hparams
        assert small == kv.ring_bytes(hp, kv.F32, 24) + 64 * m.kv_bytes_per_token
        got = m.logits(prompt, canvas)
        assert m.prompt_kv.capacity == 256 and m.kv_bytes > small  # 64 -> 128 -> 256 while encoding
        grown = m.kv_bytes
        m.reset()
        assert m.kv_bytes == grown and m.prompt_kv.n == 0
        again = m.logits(prompt, canvas)
    np.testing.assert_array_equal(got, again)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rewinding_past_the_ring_re_encodes(tiny_f32, encoded):
    """A prefix that diverges where the ring no longer holds the window before it is encoded again from the
    start; one that diverges inside the ring encodes only the new part; both give a fresh model's logits."""
    prompt = [2] + np.random.default_rng(6).integers(10, 512, 120).tolist()
    far_prefix, near_prefix = prompt[:60] + [9, 9], prompt[:118] + [9, 9]
    canvas = list(range(300, 316))
    with dg.load(tiny_f32, kv_type="f32") as fresh:  # F32: chunking then changes only summation order
        want_far, want_near = fresh.logits(far_prefix, canvas), fresh.logits(near_prefix, canvas)
    encoded.clear()  # count only the reusing model's encoder passes
    with dg.load(tiny_f32, n_batch=32, kv_type="f32") as m:  # a ring of 7 + 32 slots
        m.logits(prompt, canvas)  # the ring then holds positions 98..136 (the canvas after 121 committed)
        far = m.logits(far_prefix, canvas)  # the window before 60 is gone: from the start
        m.logits(prompt, canvas)  # the ring holds 39..77: 53..59 are there, only the rest of the prompt
        near = m.logits(near_prefix, canvas)  # 111..117 are there: only the two new tokens
    assert encoded == [121, 62, 61, 2]
    np.testing.assert_allclose(far, want_far, atol=1e-4)
    np.testing.assert_allclose(near, want_near, atol=1e-4)


def test_context_too_large_for_memory_is_a_clear_error(tiny_dir):
    """A file advertising 2^31 tokens: the default n_ctx is what fits next to the weights; asking for all of
    it names the bytes."""
    hp = testing.tiny_hparams(context_length=2**31 - 1)
    p = testing.write_model(tiny_dir / "huge-ctx.gguf", hp, wtype="f32")
    with dg.load(p) as m:
        assert hp.canvas_length < m.n_ctx < hp.context_length
        assert m.n_ctx * m.kv_bytes_per_token <= kv.host_available()
        assert m.kv_bytes < 8 << 20  # nothing paid up front
    with pytest.raises(dg.Error, match=r"n_ctx=2147483647: the prompt-KV store would need [\d,]+ bytes"):
        dg.load(p, n_ctx=2**31 - 1)


def test_growth_without_memory_is_a_clear_error(tiny_f32, monkeypatch):
    monkeypatch.setattr(kv, "GROW_TOKENS", 32)
    with dg.load(tiny_f32, n_ctx=1024) as m:
        m.logits([2] + list(range(10, 20)), list(range(16)))
        monkeypatch.setattr(kv, "host_available", lambda: 1 << 20)
        with pytest.raises(dg.Error, match=r"needs [\d,]+ bytes .* only [\d,]+ bytes of memory are free"):
            m.logits([2] + list(range(10, 60)), list(range(16)))
        monkeypatch.undo()
        assert m.logits([2] + list(range(10, 20)), list(range(16))).shape == (16, 512)  # still usable


def test_f16_store_close_to_f32(tiny_f32):
    prompt = [2] + np.random.default_rng(7).integers(7, 512, 40).tolist()
    canvas = list(range(300, 316))
    with dg.load(tiny_f32, kv_type="f32") as a, dg.load(tiny_f32) as b:
        assert b.kv_type == "f16" and b.kv_bytes_per_token * 2 == a.kv_bytes_per_token
        err = np.abs(a.logits(prompt, canvas) - b.logits(prompt, canvas))
    assert 0 < err.max() < 0.05


def test_bad_store_arguments(tiny_f32):
    with pytest.raises(dg.Error, match="kv_type"):
        dg.load(tiny_f32, kv_type="q4")
    with pytest.raises(dg.Error, match="n_batch"):
        dg.load(tiny_f32, n_batch=0)
    with pytest.raises(dg.Error, match="n_ctx"):
        dg.load(tiny_f32, n_ctx=-5)


def test_prefill_progress_and_info(tiny_f32):
    seen = []
    with dg.load(tiny_f32, n_batch=8) as m:
        m.generate([2] + list(range(10, 30)), max_new_tokens=16, steps=2, seed=1,
                   on_prefill=lambda done, total: seen.append((done, total)))
    assert seen == [(8, 21), (16, 21), (21, 21)]
    text = cli.info_text(str(tiny_f32))
    assert "bytes per committed token" in text and "max context on this machine" in text
