"""Batched denoising: several requests' canvases in one decoder pass, each answered as it would be alone."""

import numpy as np
import pytest

import diffgemma as dg

PROMPTS = ["The quick brown fox", "To be, or not", [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]


@pytest.fixture(scope="module")
def m(random_tiny):
    with dg.load(random_tiny, threads=1) as model:
        yield model


def solo(m, prompt, **kw):
    return m.generate(prompt, **kw)


def test_a_batch_of_three_equals_each_run_alone(m):
    # different prompt lengths, seeds, step counts, temperatures, lengths and stopping rules
    kw = dict(seed=[1, 2, 3], steps=[4, 6, 5], max_new_tokens=[40, 16, 30], t_max=[1.0, 0.8, 1.2],
              stability=[None, 1, 1])
    got = m.generate_batch(PROMPTS, **kw)
    assert len(got) == 3
    for i, prompt in enumerate(PROMPTS):
        alone = solo(m, prompt, **{k: v[i] for k, v in kw.items()})
        assert got[i].tokens == alone.tokens and got[i].text == alone.text
        assert [c.steps for c in got[i].canvases] == [c.steps for c in alone.canvases]
        assert got[i].seed == alone.seed and got[i].prompt_tokens == alone.prompt_tokens


def test_one_value_is_for_all_and_a_list_must_match(m):
    a, b = m.generate_batch(["Hello there", "Hello there"], seed=5, steps=3, max_new_tokens=16)
    assert a.tokens == b.tokens == solo(m, "Hello there", seed=5, steps=3, max_new_tokens=16).tokens
    with pytest.raises(dg.Error, match="needs 2 values, got 3"):
        m.generate_batch(["a", "b"], seed=[1, 2, 3])
    with pytest.raises(dg.Error, match="prompt 1: steps must be a positive int"):
        m.generate_batch(["a", "b"], steps=[3, 0])
    with pytest.raises(dg.Error, match="non-empty list"):
        m.generate_batch("a single prompt")
    with pytest.raises(dg.Error, match="max_batch"):
        m.generate_batch(["a"], max_batch=0)


def test_finished_requests_leave_and_waiting_ones_join_mid_flight(m, monkeypatch):
    # max_batch 2 of 4: the short ones end first and the waiting ones take their place between steps
    prompts = ["one", "two two", "three three three", "four"]
    kw = dict(seed=[7, 8, 9, 10], steps=4, stability=None, max_new_tokens=[16, 48, 16, 32])
    sizes: list[int] = []  # canvases in every decoder pass
    real = m.denoise_batch
    monkeypatch.setattr(m, "denoise_batch", lambda batch: sizes.append(len(batch)) or real(batch))
    got = m.generate_batch(prompts, max_batch=2, **kw)
    # steps per request: 4, 12, 4, 8. Joining between steps: {0,1} x4, {2,1} x4, {3,1} x4, {3} x4; waiting for
    # a whole batch to end would take 12 + 8 passes.
    assert sizes == [2] * 12 + [1] * 4
    monkeypatch.undo()
    for i, prompt in enumerate(prompts):
        alone = solo(m, prompt, **{k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()})
        assert got[i].tokens == alone.tokens


def test_cancelling_one_request_leaves_the_others_tokens_alone(m):
    kw = dict(seed=[4, 5, 6], steps=5, stability=None, max_new_tokens=32)
    s = m.stream_batch(PROMPTS, **kw)
    for i, ev in s:
        if i == 1 and isinstance(ev, dg.StepEvent) and ev.step == 2:
            s.cancel(1)
    assert s.generations[1] is None and s.cancel(1) is False  # already ended
    with pytest.raises(dg.Error, match="request index in 0..2"):
        s.cancel(3)
    for i in (0, 2):
        alone = solo(m, PROMPTS[i], seed=kw["seed"][i], steps=5, stability=None, max_new_tokens=32)
        assert s.generations[i].tokens == alone.tokens


def test_breaking_out_ends_the_batch_and_the_model_works_after(m):
    with m.stream_batch(PROMPTS, seed=1, steps=5, max_new_tokens=32) as s:
        for _i, ev in s:
            if isinstance(ev, dg.StepEvent) and ev.step == 3:
                break
    g = m.generate("after", seed=2, steps=3, max_new_tokens=16)
    assert g.tokens == solo(m, "after", seed=2, steps=3, max_new_tokens=16).tokens


def test_events_of_a_batch_match_the_solo_stream(m):
    kw = dict(seed=[3, 4], steps=4, max_new_tokens=32)
    s = m.stream_batch(PROMPTS[:2], **kw)
    per: dict[int, list] = {0: [], 1: []}
    for i, ev in s:
        per[i].append(ev)
    for i in (0, 1):
        alone = list(m.stream(PROMPTS[i], seed=kw["seed"][i], steps=4, max_new_tokens=32))
        assert [type(e) for e in per[i]] == [type(e) for e in alone]
        deltas = [e.text_delta for e in per[i] if isinstance(e, dg.CanvasEvent)]
        assert "".join(deltas) == s.generations[i].text


def test_a_template_in_a_batch(m):
    template = ["Name:", dg.Hole(5), "\nAge:", dg.Hole(3)]
    got = m.generate_batch(["", "Who?"], template=[template, None], seed=[2, 3], steps=4, max_new_tokens=16)
    assert got[0].text == m.generate("", template=template, seed=2, steps=4).text
    assert got[1].tokens == solo(m, "Who?", seed=3, steps=4, max_new_tokens=16).tokens


def test_denoise_batch_matches_denoise_step_row_for_row(m):
    L, V = m.hparams.canvas_length, m.hparams.n_vocab
    rng = np.random.default_rng(0)
    seqs = [m.new_sequence() for _ in range(3)]
    try:
        prefixes = [rng.integers(3, V, n) for n in (5, 9, 2)]
        asks = []
        for seq, p in zip(seqs, prefixes, strict=True):
            m.prefill(p, sequence=seq)
            asks.append(dg.batching.Denoise(rng.integers(0, V, L), 0.9, False, rng.random(L, dtype=np.float32)))
        batched = m.denoise_batch(list(zip(seqs, asks, strict=True)))
        for p, ask, got in zip(prefixes, asks, batched, strict=True):
            m.prefill(p)
            want = m.denoise_step(ask.canvas, ask.temperature, False, ask.uniform)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        for seq in seqs:
            m.free_sequence(seq)


def test_leaving_a_batch_loop_frees_its_sequences(m):
    import gc

    s = m.stream_batch(PROMPTS, seed=1, steps=3, max_new_tokens=32)
    for _ in s:
        break  # no `with`: dropping the stream must still end the batch
    del s
    gc.collect()
    assert m._sequences == []
    m.generate_batch(PROMPTS[:2], seed=1, steps=2, max_new_tokens=16)
    assert m._sequences == []


def test_sequences_are_checked(m, random_tiny):
    L = m.hparams.canvas_length
    seq = m.new_sequence()
    ask = dg.batching.Denoise(np.zeros(L, np.int64), 0.8, False, np.full(L, 0.5, np.float32))
    m.prefill([2, 3, 4], sequence=seq)
    with pytest.raises(dg.Error, match="appears twice"):
        m.denoise_batch([(seq, ask), (seq, ask)])
    m.free_sequence(seq)
    with pytest.raises(dg.Error, match="not one of this model's live sequences"):
        m.prefill([2, 3, 4], sequence=seq)
    with pytest.raises(dg.Error, match="not one of this model's live sequences"):
        m.denoise_batch([(seq, ask)])
    with dg.load(random_tiny, threads=1) as other:
        foreign = other.new_sequence()
    with pytest.raises(dg.Error, match="not one of this model's live sequences"):
        m.prefill([2, 3, 4], sequence=foreign)


def test_a_failing_request_ends_alone_in_a_batch(m):
    def bad():
        yield dg.batching.Prefill(np.array([10**6]), [])  # an id past the vocabulary: its prefill fails

    good, _, ids = dg.generation.request(m, "fine", seed=3, steps=2, max_new_tokens=16)
    b = dg.batching.Batch(m, 2)
    b.add("bad", bad())
    b.add("good", good, ids)
    ends = {t: ev for t, ev in b if isinstance(ev, dg.batching.Done)}
    assert isinstance(ends["bad"].error, dg.Error) and ends["bad"].result is None
    assert ends["good"].error is None
    assert ends["good"].result.tokens == m.generate("fine", seed=3, steps=2, max_new_tokens=16).tokens
    assert not b and m._sequences == []


def test_per_request_values_and_keyword_errors(m):
    parts = ["Name:", dg.Hole(4)]  # a template as parts is one template for all
    a, b = m.generate_batch(["", ""], template=parts, seed=(5, 6), steps=3)
    assert a.text == m.generate("", template=parts, seed=5, steps=3).text
    assert b.text == m.generate("", template=parts, seed=6, steps=3).text
    with pytest.raises(dg.Error, match="unknown keywords \\['on_step'\\]"):
        m.generate_batch(["a"], on_step=print)
