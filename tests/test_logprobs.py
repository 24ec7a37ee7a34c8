"""logprobs: each committed token's log-probability at the step that committed it, and the top k alternatives,
gathered on the device (issue 29)."""

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import engine as engine_mod

PROMPT = "The quick brown fox"
FAST = {"steps": 3, "stability": None}


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_step_logprobs_match_the_logits(model):
    prompt = model.tokenize(PROMPT)
    canvas = np.random.default_rng(0).integers(0, model.hparams.n_vocab, model.hparams.canvas_length)
    u = np.full(len(canvas), 0.5, np.float32)
    T = 0.7
    want = _log_softmax(model.logits(prompt, canvas) / T)  # also commits the prompt
    argmax, _, _, lp = model.denoise_step(canvas, T, False, u, logprobs=5)
    assert isinstance(lp, engine_mod.StepLogprobs) and lp.top_ids.shape == lp.top.shape == (len(canvas), 5)
    np.testing.assert_allclose(lp.argmax, want[np.arange(len(canvas)), argmax], atol=1e-4)
    np.testing.assert_array_equal(lp.top_ids[:, 0], argmax)
    np.testing.assert_allclose(lp.top, np.sort(want, axis=1)[:, ::-1][:, :5], atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(want, lp.top_ids, 1), lp.top, atol=1e-4)
    assert len(model.denoise_step(canvas, T, False, u)) == 3  # off unless asked: the usual answer
    assert model.denoise_step(canvas, T, False, u, logprobs=0)[3].top.shape == (len(canvas), 0)


def test_generation_logprobs(model):
    plain = model.generate(PROMPT, max_new_tokens=20, seed=2, **FAST)
    g = model.generate(PROMPT, max_new_tokens=20, seed=2, logprobs=3, **FAST)
    assert g.tokens == plain.tokens and plain.logprobs is None  # asking changes nothing else
    assert [t.token for t in g.logprobs] == g.tokens and len(g.logprobs) == 20  # cut at max_new_tokens too
    for t in g.logprobs:
        assert t.logprob <= 0 and len(t.top) == 3
        assert t.top[0] == (t.token, t.logprob)  # the argmax, the same number in both places (exactly)
        assert [v for _, v in t.top] == sorted((v for _, v in t.top), reverse=True)
    only = model.generate(PROMPT, max_new_tokens=20, seed=2, logprobs=True, **FAST)
    assert [t.logprob for t in only.logprobs] == pytest.approx([t.logprob for t in g.logprobs], abs=1e-6)
    assert all(t.top == [] for t in only.logprobs)


def test_stream_and_batch_carry_them(model):
    g = model.generate(PROMPT, max_new_tokens=20, seed=2, logprobs=2, **FAST)
    with model.stream(PROMPT, max_new_tokens=20, seed=2, logprobs=2, **FAST) as s:
        per_canvas = [ev.logprobs for ev in s if isinstance(ev, dg.CanvasEvent)]
    assert [len(x) for x in per_canvas] == [16, 4] and sum(per_canvas, []) == s.generation.logprobs
    batch = model.generate_batch([PROMPT, "A river"], max_new_tokens=20, seed=[2, 3], logprobs=[2, None], **FAST)
    assert batch[1].logprobs is None and batch[0].tokens == g.tokens
    assert [t.logprob for t in batch[0].logprobs] == pytest.approx([t.logprob for t in g.logprobs], abs=1e-4)


def test_only_k_values_per_position_leave_the_device(model, monkeypatch):
    """The [vocab x canvas] distribution is never read back: a step reads O(k x canvas) numbers."""
    read = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(engine_mod.B.lib, name)
            if name != "ggml_backend_tensor_get":
                return fn
            return lambda t, buf, off, n: (read.append(n), fn(t, buf, off, n))[1]

    monkeypatch.setattr(engine_mod, "_lib", Counting())
    k, L = 5, model.hparams.canvas_length
    model.generate(PROMPT, max_new_tokens=16, seed=1, logprobs=k, steps=2, stability=None)
    per_step = sum(read) / 2
    assert per_step <= 4 * L * (3 + 1 + 2 * k) < 4 * L * model.hparams.n_vocab / 10


@pytest.mark.parametrize("bad", [21, -1, "3", 2.0])
def test_bad_logprobs(model, bad):
    with pytest.raises(dg.Error, match="logprobs"):
        model.generate(PROMPT, logprobs=bad, **FAST)


def test_no_logprobs_with_a_template(model):
    with pytest.raises(dg.Error, match="template"):
        model.generate("", template="Name: {{hole 3}}.", logprobs=True, **FAST)
