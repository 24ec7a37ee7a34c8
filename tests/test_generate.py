"""Generation: on-device sampling statistics, the loop's rules end to end, determinism, chat, bad parameters."""

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import testing
from diffgemma.chat import prompt_ids


def _peaked(tmp_path, target, name="peaked.gguf"):
    """A model whose denoiser puts (almost) all mass on `target` at every position, whatever the input: every
    embedding row carries the same large constant in dim 0 (so the residual stream is that direction), the
    branches are scaled down, the final norm reads only dim 0 and the target's row has twice the constant.
    The soft-cap is lifted so the margin is not capped."""
    hp = testing.tiny_hparams(softcap=1e6)
    w = testing.random_weights(hp, 0, calm=True)
    e = w["token_embd.weight"] * 0.01
    e[:, 0] = 1.0
    e[target, 0] = 2.0
    w["token_embd.weight"] = e
    for k in w:
        if k.endswith(("post_attention_norm.weight", "post_ffw_norm.weight")):
            w[k] = w[k] * 1e-3
    w["output_norm.weight"] = np.zeros_like(w["output_norm.weight"])
    w["output_norm.weight"][0] = 100.0
    return testing.write_model(tmp_path / name, hp, weights=w)


@pytest.mark.parametrize("n_vocab", [512, 520, 515])  # inverse-CDF threshold in blocks of 256, 8 and 1
def test_device_sampling_matches_numpy(tiny_f32, tmp_path, n_vocab):
    path = tiny_f32 if n_vocab == 512 else testing.write_model(
        tmp_path / "v.gguf", testing.tiny_hparams(n_vocab=n_vocab), wtype="f32")
    with dg.load(path) as m:
        hp = m.hparams
        prompt = m.tokenize("to be or not")
        canvas = np.random.default_rng(0).integers(0, hp.n_vocab, hp.canvas_length)
        logits = m.logits(prompt, canvas)
        T = 0.7
        u = np.random.default_rng(1).random(hp.canvas_length, dtype=np.float32)
        argmax, entropy, sample = m.denoise_step(canvas, T, False, u)
    s = logits.astype(np.float64) / T
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_array_equal(argmax, logits.argmax(1))
    np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(1), atol=2e-5)
    cdf = np.cumsum(p, 1)
    want = (cdf < u[:, None] * cdf[:, -1:]).sum(1)
    assert (sample == want).mean() >= 0.9  # the same inverse CDF; float32 vs float64 sums may move a boundary
    assert np.all(np.abs(sample - want) <= 1)


def test_self_conditioning_stays_on_device(tiny_f32):
    """A step with self_cond=True uses the previous step's scaled logits, as m.logits(self_cond=...) does."""
    with dg.load(tiny_f32) as m:
        hp = m.hparams
        prompt = m.tokenize("hello")
        canvas = np.arange(hp.canvas_length) + 40
        u = np.full(hp.canvas_length, 0.5, np.float32)
        m.logits(prompt, canvas)  # commit the prompt
        m.denoise_step(canvas, 0.8, False, u)
        a2, _, _ = m.denoise_step(canvas, 0.6, True, u)
        first = m.logits(prompt, canvas)
        second = m.logits(prompt, canvas, self_cond=first / 0.8)
    np.testing.assert_array_equal(a2, second.argmax(1))


def test_same_seed_same_tokens_and_seed_reported(random_tiny):
    with dg.load(random_tiny) as m:
        a = m.generate("The quick brown fox", max_new_tokens=20, seed=7, steps=6)
        b = m.generate("The quick brown fox", max_new_tokens=20, seed=7, steps=6)
        c = m.generate("The quick brown fox", max_new_tokens=20, seed=8, steps=6)
        d = m.generate("The quick brown fox", max_new_tokens=20, steps=6)
        e = m.generate("The quick brown fox", max_new_tokens=20, steps=6, seed=d.seed)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens
    assert d.tokens == e.tokens and isinstance(d.seed, int)
    # 20 new tokens: two canvases of 16 denoised, the second cut
    assert len(a.canvases) == 2 and len(a.tokens) == 20
    assert a.timings.step_ms > 0 and a.timings.tokens_per_s > 0 and a.timings.prefill_ms > 0


@pytest.mark.parametrize("stability,steps_per_canvas", [(1, 2), (3, 4), (0, 1), (None, 10)])
def test_peaked_model_stops_when_the_rules_say(tmp_path, stability, steps_per_canvas):
    with dg.load(_peaked(tmp_path, target=300)) as m:
        events = []
        g = m.generate([2, 50, 51], max_new_tokens=32, steps=10, seed=0, stability=stability,
                       on_step=events.append)
    assert [c.steps for c in g.canvases] == [steps_per_canvas, steps_per_canvas]
    assert all(c.stopped_early == (stability is not None) for c in g.canvases)
    assert g.tokens == [300] * 32
    assert len(events) == 2 * steps_per_canvas
    ev = events[0]
    assert ev.step == 1 and ev.temperature == pytest.approx(0.8) and ev.accepted == 16
    assert ev.mean_entropy < 1e-3 and ev.argmax.tolist() == [300] * 16


def test_eos_ends_generation_and_is_trimmed(tmp_path):
    with dg.load(_peaked(tmp_path, target=testing.EOS)) as m:
        g = m.generate([2, 50, 51], max_new_tokens=64, steps=5, seed=0)
    assert len(g.canvases) == 1 and g.canvases[0].eos
    assert g.tokens == [testing.EOS] and g.text == ""


@pytest.mark.parametrize("kw,msg", [
    ({"steps": -1}, "steps"), ({"steps": 0}, "steps"), ({"t_min": 0.8, "t_max": 0.8}, "t_min"),
    ({"t_min": 0.9, "t_max": 0.5}, "t_min"), ({"entropy_bound": 0.0}, "entropy_bound"),
    ({"stability": -2}, "stability"), ({"confidence": -1.0}, "confidence"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"seed": "x"}, "seed"),
])
def test_bad_parameters(random_tiny, kw, msg):
    with dg.load(random_tiny) as m, pytest.raises(dg.Error, match=msg):
        m.generate("hi", **kw)


def test_bad_prompts(random_tiny):
    with dg.load(random_tiny, n_ctx=64) as m:
        with pytest.raises(dg.Error, match="empty"):
            m.generate("")
        with pytest.raises(dg.Error, match="empty"):
            m.generate([])
        with pytest.raises(dg.Error, match="n_ctx"):
            m.generate(list(range(3, 60)))
        with pytest.raises(dg.Error, match="token ids"):
            m.generate([1, 2, 10**7])
        with pytest.raises(dg.Error, match="chat message"):
            m.generate([{"role": "user"}])


def test_chat_template_and_messages(random_tiny):
    with dg.load(random_tiny) as m:
        ids = prompt_ids(m, [{"role": "user", "content": "hi there"}], None)
        text = m.detokenize(ids, special=True)
        assert text == "<bos><|turn>user\nhi there<turn|>\n<|turn>model\n"
        assert prompt_ids(m, "hi there", None) == ids  # a str goes through the template too
        raw = prompt_ids(m, "hi there", False)
        assert m.detokenize(raw, special=True) == "<bos>hi there"
        g = m.generate([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                       max_new_tokens=16, steps=3, seed=1)
        assert "<|turn>" not in g.text and "<turn|>" not in g.text


def test_dg_generate_caches_the_model(random_tiny):
    a = dg.generate("hello", model=str(random_tiny), max_new_tokens=16, steps=3, seed=3)
    b = dg.generate("hello", model=str(random_tiny), max_new_tokens=16, steps=3, seed=3)
    assert isinstance(a, str) and a == b


def test_prompt_kv_reuse_encodes_only_new_tokens(tiny_f32, encoded):
    """A finished canvas appended to the prefix is encoded alone; a diverging prefix re-encodes from the
    divergence; both give the logits of a fresh model."""
    hp = testing.tiny_hparams()
    prompt = [2] + list(range(20, 40))
    finished = list(range(100, 100 + hp.canvas_length))
    canvas = list(range(200, 200 + hp.canvas_length))
    with dg.load(tiny_f32) as fresh:
        want = fresh.logits(prompt + finished, canvas)
        want_other = fresh.logits(prompt[:5] + [7, 8, 9], canvas)
    encoded.clear()  # count only the reusing model's encoder passes
    with dg.load(tiny_f32) as m:
        m.logits(prompt, canvas)
        got = m.logits(prompt + finished, canvas)
        other = m.logits(prompt[:5] + [7, 8, 9], canvas)
    assert encoded == [len(prompt), len(finished), 3]
    np.testing.assert_allclose(got, want, atol=1e-4)  # chunking changes float summation order only
    np.testing.assert_allclose(other, want_other, atol=1e-4)


@pytest.mark.parametrize("n_batch", [1, 7, 64])
def test_chunked_prompt_encoding_matches_one_shot(tiny_f32, n_batch):
    prompt = [2] + np.random.default_rng(3).integers(7, 512, 60).tolist()
    canvas = list(range(300, 316))
    with dg.load(tiny_f32, kv_type="f32", n_batch=61) as m:  # the whole prompt in one graph
        want = m.logits(prompt, canvas)
    with dg.load(tiny_f32, kv_type="f32", n_batch=n_batch) as m:  # window 8: chunks of 1 and 7 wrap the ring
        got = m.logits(prompt, canvas)
    np.testing.assert_allclose(got, want, atol=1e-4)
