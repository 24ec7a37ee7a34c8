"""Batched denoising: several requests' canvases in one decoder pass, each answered as it would be alone."""

import dataclasses

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import testing

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


# ---- batch invariance on other files: a request's numbers do not depend on what shares its passes ----------

def _step_trace(events):
    """(mean entropy, accepted, argmax) of every step event, in order."""
    return [(e.mean_entropy, e.accepted, e.argmax.tolist()) for e in events if isinstance(e, dg.StepEvent)]


def test_issue_28_file_shape(tmp_path):
    """Hidden 256, vocab 600, window 8, canvas 16, 8 experts top-2; prompts of 3, 7 and 2 tokens. Alone, each
    request runs on the model's own store, which still holds the previous prompt's first token: the 2-token
    prompt then encodes 1 token alone, which ggml's one-row matrix product rounded differently (entropies off
    by ~3e-6, tokens flipped from position 1)."""
    hp = testing.tiny_hparams(n_embd=256, n_vocab=600, n_expert=8, n_expert_used=2, sliding_window=8,
                              canvas_length=16)
    path = testing.write_model(tmp_path / "m.gguf", hp)
    rng = np.random.default_rng(0)
    prompts = [[2, *rng.integers(7, 600, n - 1).tolist()] for n in (3, 7, 2)]
    kw = dict(seed=[3, 4, 5], steps=[6, 8, 5], max_new_tokens=32)
    with dg.load(path) as m:
        s = m.stream_batch(prompts, **kw)
        per: dict[int, list] = {i: [] for i in range(3)}
        for i, ev in s:
            per[i].append(ev)
        for i, prompt in enumerate(prompts):
            alone = m.stream(prompt, seed=kw["seed"][i], steps=kw["steps"][i], max_new_tokens=32)
            events = list(alone)
            assert _step_trace(per[i]) == _step_trace(events)  # every step's entropy exactly
            assert s.generations[i].tokens == alone.generation.tokens


def _random_shape(rng):
    """A random small file shape (layers and their kinds, widths, heads, experts, window, canvas, vocab)."""
    n_layer = int(rng.integers(2, 6))
    swa = tuple(bool(rng.random() < 0.7) for _ in range(n_layer - 1)) + (False,)
    heads = int(rng.choice([2, 4]))
    kv_swa, kv_global = int(rng.choice([1, 2])), int(rng.choice([1, heads]))
    n_expert = int(rng.choice([4, 8]))
    hp = testing.tiny_hparams(
        n_layer=n_layer, swa_layers=swa, n_embd=int(rng.choice([64, 96, 128, 256])), n_head=heads,
        n_head_kv_swa=kv_swa, n_head_kv_global=kv_global, head_dim=int(rng.choice([32, 64])),
        head_dim_swa=int(rng.choice([16, 32])), n_expert=n_expert, n_expert_used=int(rng.integers(1, 4)),
        sliding_window=int(rng.integers(3, 13)), canvas_length=int(rng.choice([4, 8, 16])),
        n_vocab=int(rng.choice([512, 600])))
    return dataclasses.replace(hp, rope_dim=hp.head_dim, rope_dim_swa=hp.head_dim_swa)


def _case_id(case):
    return f"flash-off-{case[1]}" if isinstance(case, tuple) else str(case)


def _random_case(rng):
    """A random shape, weight and store type, chunk size and batch of requests (prompts of 1..40 tokens, some
    sharing prefixes so that stores are reused)."""
    hp = _random_shape(rng)
    base = [testing.BOS, *rng.integers(3, hp.n_vocab, 39).tolist()]
    prompts: list[list[int]] = []
    for _ in range(int(rng.integers(2, 5))):
        n, kind = int(rng.integers(1, 41)), rng.random()
        if kind < 0.5 and prompts:  # another prompt and a token or two: a store holding it encodes only those
            prev = prompts[int(rng.integers(len(prompts)))]
            more = 1 if rng.random() < 0.7 else 2
            prompts.append((prev + rng.integers(3, hp.n_vocab, more).tolist())[:40])
        else:
            bos = [testing.BOS] if rng.random() < 0.5 else []  # stores then share their first token
            prompts.append(base[:n] if kind < 0.75 else (bos + rng.integers(3, hp.n_vocab, n).tolist())[:n])
    k = len(prompts)
    settings = dict(seed=rng.integers(0, 1000, k).tolist(), steps=rng.integers(2, 6, k).tolist(),
                    max_new_tokens=(rng.integers(1, 4, k) * hp.canvas_length).tolist(),
                    stability=[None if rng.random() < 0.5 else 1 for _ in range(k)])
    load = dict(wtype=str(rng.choice(["f32", "f16", "q8_0"])), kv_type=str(rng.choice(["f16", "f32"], p=[0.4, 0.6])),
                n_batch=int(rng.choice([8, 16, 512])), max_batch=int(rng.integers(1, k + 1)))
    return hp, prompts, settings, load


@pytest.mark.parametrize("case", [*range(12), *(("off", c) for c in (1, 5, 23, 28))], ids=_case_id)
def test_random_batches_equal_their_solo_runs(tmp_path, case):
    """Many shapes, weight and store types, chunk sizes, prompt lengths 1..40 and batch compositions: every
    request's steps (entropies exactly) and tokens equal its solo run's, however the requests share passes and
    stores. ("off", case): ggml's plain attention, whose sums over keys round by their count (cases 23 and 28
    differed before an encode pass read its keys in whole tiles)."""
    flash, case = case if isinstance(case, tuple) else ("auto", case)
    rng = np.random.default_rng(1000 + case)
    hp, prompts, settings, load = _random_case(rng)
    path = testing.write_model(tmp_path / "m.gguf", hp, wtype=load["wtype"], seed=case)
    with dg.load(path, kv_type=load["kv_type"], n_batch=load["n_batch"], flash_attn=flash) as m:
        s = m.stream_batch(prompts, max_batch=load["max_batch"], **settings)
        per: dict[int, list] = {i: [] for i in range(len(prompts))}
        for i, ev in s:
            per[i].append(ev)
        for i in rng.permutation(len(prompts)):  # the model's own store keeps what the previous one left
            alone = m.stream(prompts[i], **{key: v[i] for key, v in settings.items()})
            assert _step_trace(per[i]) == _step_trace(list(alone)), (hp, load, i)  # entropies exactly
            assert s.generations[i].tokens == alone.generation.tokens


@pytest.mark.parametrize("case", [*range(8), *(("off", c) for c in (2, 21, 23, 24, 26, 28))], ids=_case_id)
def test_a_token_does_not_depend_on_how_its_prompt_was_cut(tmp_path, case):
    """The logits after a prompt are the same bits whether the store encoded it at once or in pieces (a reused
    prefix, n_batch chunks): one-token pieces, pieces across the 64 query rows where ggml's flash attention
    changes kernel, ring wrap-around. ("off", case): ggml's plain attention (47 of 224 cuts over cases 0-29
    differed, in cases 21-28 here among others, before an encode pass read its keys in whole tiles)."""
    flash, case = case if isinstance(case, tuple) else ("auto", case)
    rng = np.random.default_rng(2000 + case)
    hp = _random_shape(rng)
    path = testing.write_model(tmp_path / "m.gguf", hp, wtype=str(rng.choice(["f32", "f16", "q8_0"])), seed=case)
    prompt = [testing.BOS, *rng.integers(3, hp.n_vocab, int(rng.integers(0, 150))).tolist()]
    canvas = rng.integers(0, hp.n_vocab, hp.canvas_length)
    cuts = sorted({len(prompt) - 1, 1, *rng.integers(1, len(prompt) + 1, 2).tolist()} - {0})
    for kv_type in ("f16", "f32"):
        with dg.load(path, kv_type=kv_type, n_batch=int(rng.choice([16, 100, 512])), flash_attn=flash) as m:
            want = m.logits(prompt, canvas)
            for cut in cuts:
                m.reset()
                m.prefill(prompt[:cut])
                np.testing.assert_array_equal(m.logits(prompt, canvas), want, err_msg=f"{kv_type}, cut {cut}")


def test_k_quant_experts_in_a_batch(tmp_path):
    """Q4_K_M experts: ggml's tiled K-quant product would take an expert only from 8 rows (so an expert's rounding
    depended on how many canvases shared the pass); forced tiled, every request equals its solo run."""
    hp = testing.tiny_hparams(n_embd=256, n_ff=256, n_ff_exp=256, n_expert=8, n_expert_used=2)
    src = testing.write_model(tmp_path / "f32.gguf", hp)
    dg.quantize(src, tmp_path / "q4_k_m.gguf", recipe="Q4_K_M", progress=False)
    rng = np.random.default_rng(3)
    prompts = [[testing.BOS, *rng.integers(3, 512, n).tolist()] for n in (1, 5, 12, 30)]
    kw = dict(seed=[1, 2, 3, 4], steps=4, max_new_tokens=32)
    with dg.load(tmp_path / "q4_k_m.gguf") as m:
        s = m.stream_batch(prompts, **kw)
        per: dict[int, list] = {i: [] for i in range(len(prompts))}
        for i, ev in s:
            per[i].append(ev)
        for i, prompt in enumerate(prompts):
            alone = m.stream(prompt, seed=kw["seed"][i], steps=4, max_new_tokens=32)
            assert _step_trace(per[i]) == _step_trace(list(alone))
