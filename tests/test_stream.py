"""m.stream / dg.stream: events in order, text deltas that add up, breaking out, the same tokens as generate()."""

import inspect

import numpy as np
import pytest

import diffgemma as dg

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def m(random_tiny):
    with dg.load(random_tiny, threads=1) as model:
        yield model


def test_events_come_per_step_then_one_per_canvas(m):
    s = m.stream(PROMPT, max_new_tokens=40, steps=4, seed=3, stability=None)  # no early stop: 4 steps each
    events = list(s)
    g = s.generation
    assert isinstance(g, dg.Generation) and s.seed == g.seed == 3
    kinds = ["S" if isinstance(e, dg.StepEvent) else "C" for e in events]
    assert "".join(kinds) == "SSSSC" * 3 == "SSSSC" * len(g.canvases)  # 40 tokens: three canvases of 16
    canvases = [e for e in events if isinstance(e, dg.CanvasEvent)]
    assert [c.canvas_index for c in canvases] == [0, 1, 2]
    assert [(e.canvas_index, e.step) for e in events if isinstance(e, dg.StepEvent)] == [
        (c, k) for c in range(3) for k in range(1, 5)]
    assert "".join(c.text_delta for c in canvases) == g.text
    assert [int(t) for c in canvases for t in c.tokens] == g.tokens
    assert [(c.steps, c.stopped_early, c.eos) for c in canvases] == [
        (i.steps, i.stopped_early, i.eos) for i in g.canvases]
    assert all(c.timings.prefill_ms > 0 and c.timings.step_ms > 0 for c in canvases)
    # the step event before a commit shows the canvas that is committed
    last_steps = [events[i - 1] for i, e in enumerate(events) if isinstance(e, dg.CanvasEvent)]
    for st, c in zip(last_steps, canvases, strict=True):
        np.testing.assert_array_equal(st.argmax[: len(c.tokens)], c.tokens)


def test_stream_gives_the_tokens_of_generate(m):
    kw = dict(max_new_tokens=20, steps=6, seed=11)
    s = m.stream(PROMPT, **kw)
    for _ in s:
        pass
    g = m.generate(PROMPT, **kw)
    assert s.generation.tokens == g.tokens and s.generation.text == g.text
    seen = []
    m.generate(PROMPT, on_step=seen.append, **kw)  # on_step sees exactly the stream's step events
    steps = [e for e in m.stream(PROMPT, **kw) if isinstance(e, dg.StepEvent)]
    assert [(e.canvas_index, e.step, e.accepted) for e in seen] == [(e.canvas_index, e.step, e.accepted)
                                                                     for e in steps]


def test_stream_with_a_template(m):
    template = ["Name:", dg.Hole(5), "\nAge:", dg.Hole(3)]
    kw = dict(steps=5, seed=2, template=template)
    s = m.stream("", **kw)
    events = list(s)
    g = m.generate("", **kw)
    assert s.generation.tokens == g.tokens and s.generation.holes == g.holes and s.generation.text == g.text
    canvases = [e for e in events if isinstance(e, dg.CanvasEvent)]
    assert len(canvases) == len(g.canvases) and "".join(c.text_delta for c in canvases) == g.text
    assert all(e.fixed is not None for e in events if isinstance(e, dg.StepEvent))


def test_breaking_out_mid_canvas_then_generating_again(m, random_tiny):
    kw = dict(max_new_tokens=32, steps=6, seed=5, stability=None)
    with dg.load(random_tiny, threads=1) as fresh:
        want = fresh.generate(PROMPT, **kw)
    for ev in m.stream("Another prompt entirely", **kw):
        if isinstance(ev, dg.StepEvent) and ev.canvas_index == 1 and ev.step == 3:
            break  # mid-canvas, after one canvas committed
    assert m.generate(PROMPT, **kw).tokens == want.tokens
    # a paused stream that is kept: close() ends it, and a new generation on this thread ends it too
    s = m.stream(PROMPT, **kw)
    next(s)
    assert m.generate(PROMPT, **kw).tokens == want.tokens
    assert list(s) == [] and s.generation is None
    with m.stream(PROMPT, **kw) as s2:
        next(s2)
    assert list(s2) == [] and m.generate(PROMPT, **kw).tokens == want.tokens


def test_bad_arguments_raise_before_iterating(m):
    with pytest.raises(dg.Error, match="steps"):
        m.stream(PROMPT, steps=0)
    with pytest.raises(dg.Error, match="on_prefill"):
        m.stream(PROMPT, on_prefill=3)


def test_dg_stream_signature_and_help(random_tiny):
    sig = inspect.signature(dg.stream)
    model_kw = set(inspect.signature(dg.Model.stream).parameters) - {"self"}
    assert model_kw <= set(sig.parameters) and sig.parameters["model"].default == "tiny"
    assert set(inspect.signature(dg.Model.generate).parameters) - {"self", "on_step"} == model_kw
    assert "**" not in str(sig)
    doc = inspect.getdoc(dg.stream)
    for name in sig.parameters:
        if name != "prompt":
            assert name in doc, name
    text = "".join(e.text_delta for e in dg.stream("hi", model=str(random_tiny), max_new_tokens=16, steps=3,
                                                     seed=1) if isinstance(e, dg.CanvasEvent))
    assert text == dg.generate("hi", model=str(random_tiny), max_new_tokens=16, steps=3, seed=1)


def test_an_on_step_that_raises_leaves_the_model_free_for_other_threads(m):
    import threading

    class Stop(Exception):
        pass

    def stop(ev):
        raise Stop

    try:
        m.generate(PROMPT, max_new_tokens=16, steps=3, seed=1, on_step=stop)
    except Stop as e:
        kept = e  # a kept traceback (as a server's future holds) must not keep the model locked
    out = []
    t = threading.Thread(target=lambda: out.append(m.generate(PROMPT, max_new_tokens=16, steps=3, seed=1)))
    t.start()
    t.join(60)
    assert out and kept.__traceback__ is not None
