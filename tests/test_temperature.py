"""temperature= scales the temperature schedule; 0 is greedy and the same text every run (issue 29, defect 4)."""

import argparse

import pytest

import diffgemma as dg
from diffgemma import cli_flags, sampler

FAST = {"steps": 3, "stability": None, "max_new_tokens": 20}
PROMPT = "The quick brown fox"


def test_temperature_zero_is_the_same_text_every_run(model):
    a = model.generate(PROMPT, temperature=0, **FAST)
    b = model.generate(PROMPT, temperature=0, **FAST)
    assert a.tokens == b.tokens and a.text == b.text and a.seed == b.seed == sampler.GREEDY_SEED
    with model.stream(PROMPT, temperature=0, **FAST) as s:
        list(s)
    assert s.seed == sampler.GREEDY_SEED and s.generation.tokens == a.tokens
    c = model.generate(PROMPT, temperature=0, seed=9, **FAST)  # a seed still draws its own noise
    assert c.seed == 9 and c.tokens == model.generate(PROMPT, temperature=0, seed=9, **FAST).tokens


def test_greedy_accepts_argmax_tokens(model, monkeypatch):
    """With temperature 0 the re-noised canvas holds, at accepted positions, the step's argmax token."""
    picks = []
    real = sampler.pick

    def spy(sampled, argmax, greedy):
        picks.append(greedy)
        return real(sampled, argmax, greedy)

    monkeypatch.setattr(sampler, "pick", spy)
    model.generate(PROMPT, temperature=0, seed=1, **FAST)
    assert picks and all(picks)
    picks.clear()
    model.generate(PROMPT, seed=1, **FAST)
    assert picks and not any(picks)


def test_temperature_scales_the_schedule(model):
    s = model.sampler_defaults
    with model.stream(PROMPT, temperature=0.5, seed=1, **FAST) as st:
        temps = [ev.temperature for ev in st if isinstance(ev, dg.StepEvent)]
    want = [0.5 * sampler.temperature(n, 3, s.t_min, s.t_max) for n in (3, 2, 1)]
    assert temps[:3] == pytest.approx(want)
    assert model.generate(PROMPT, temperature=1, seed=4, **FAST).tokens == \
        model.generate(PROMPT, seed=4, **FAST).tokens
    half = s.replace(t_min=s.t_min / 2, t_max=s.t_max / 2)
    assert model.generate(PROMPT, temperature=0.5, seed=4, **FAST).tokens == \
        model.generate(PROMPT, sampler=half, seed=4, **FAST).tokens
    gens = model.generate_batch([PROMPT, PROMPT], temperature=[0, 0.5], seed=[None, 4], **FAST)
    assert gens[0].seed == sampler.GREEDY_SEED and gens[1].tokens == \
        model.generate(PROMPT, temperature=0.5, seed=4, **FAST).tokens


@pytest.mark.parametrize("bad", [-0.1, 1e-6, 1e3, float("nan"), float("inf"), "hot", True])
def test_bad_temperatures(model, bad):
    with pytest.raises(dg.Error, match="temperature"):
        model.generate(PROMPT, temperature=bad, **FAST)


def test_cli_passes_a_temperature_on():
    a = argparse.Namespace(max_new_tokens=8, seed=None, temperature=0.0,
                           **{f: None for f in ("steps", "t_min", "t_max", "entropy_bound", "stability", "confidence")})
    assert cli_flags.sampler_kw(a)["temperature"] == 0.0
