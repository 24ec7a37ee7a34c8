"""The sampler's rules against a direct reading of the reference (../shared/spec/model.md §7.3-7.6)."""

import numpy as np
import pytest

from diffgemma import sampler


def test_temperature_schedule():
    N, lo, hi = 48, 0.4, 0.8
    temps = [sampler.temperature(n, N, lo, hi) for n in range(N, 0, -1)]
    assert temps[0] == pytest.approx(0.8)  # first step: t_max
    assert temps[-1] == pytest.approx(0.4 + 0.4 / 48)  # last possible step: 0.40833, never t_min
    assert temps[-1] == pytest.approx(0.408333, abs=1e-6)
    assert all(a > b for a, b in zip(temps, temps[1:], strict=False))
    # by noise level (calibration, quality bench): t_min when clean, t_max when all noise
    assert sampler.temperature_at(0.0, lo, hi) == pytest.approx(0.4)
    assert sampler.temperature_at(1.0, lo, hi) == pytest.approx(0.8)
    assert sampler.temperature_at(0.5, lo, hi) == pytest.approx(sampler.temperature(24, N, lo, hi))


def _accept_reference(entropy, bound):
    """Direct reading: sort ascending; accept position (k) iff sum_{j<k} H_(j) <= bound (float32 sums)."""
    order = sorted(range(len(entropy)), key=lambda i: (entropy[i], i))
    acc = [False] * len(entropy)
    inclusive = np.float32(0.0)
    for i in order:
        h = np.float32(entropy[i])
        inclusive = np.float32(inclusive + h)
        acc[i] = bool(np.float32(inclusive - h) <= np.float32(bound))
    return np.array(acc)


@pytest.mark.parametrize("seed", range(20))
def test_accept_matches_direct_reading(seed):
    rng = np.random.default_rng(seed)
    h = rng.exponential(0.05, size=rng.integers(1, 64)).astype(np.float32)
    if seed % 3 == 0:
        h[: len(h) // 2] = h[0]  # ties
    np.testing.assert_array_equal(sampler.accept(h, 0.1), _accept_reference(h.tolist(), 0.1))


def test_accept_always_one_and_exclusive_prefix():
    h = np.array([5.0, 3.0, 9.0], np.float32)
    assert sampler.accept(h, 0.1).tolist() == [False, True, False]  # lowest entropy always accepted
    # exclusive prefix: 0.04 + 0.05 = 0.09 <= 0.1, so the high-entropy third one is accepted too
    h = np.array([0.04, 7.0, 0.05, 8.0], np.float32)
    assert sampler.accept(h, 0.1).tolist() == [True, True, True, False]
    # ties at the bound, in float32 as the reference computes it (inclusive cumsum minus the element):
    # 0.15f - 0.05f = 0.10000001 > 0.1f, so only two of three are accepted
    h = np.array([0.05, 0.05, 0.05], np.float32)
    assert sampler.accept(h, 0.1).sum() == 2
    h = np.array([0.025, 0.025, 0.05, 3.0], np.float32)  # before the last: 0.1f exactly, so accepted
    assert sampler.accept(h, 0.1).sum() == 4
    h = np.array([0.06, 0.06, 0.06], np.float32)
    assert sampler.accept(h, 0.1).sum() == 2


def test_renoise():
    acc = np.array([True, False, True])
    assert sampler.renoise(acc, np.array([1, 2, 3]), np.array([7, 8, 9])).tolist() == [1, 8, 3]


def test_stability_and_confidence():
    a, b = np.array([1, 2, 3]), np.array([1, 2, 4])
    low, high = np.full(3, 1e-4, np.float32), np.full(3, 0.1, np.float32)
    assert not sampler.should_stop([], a, low, 1, 0.005)  # history empty: at least 2 steps with k=1
    assert sampler.should_stop([a], a, low, 1, 0.005)
    assert not sampler.should_stop([b], a, low, 1, 0.005)
    assert not sampler.should_stop([a], a, high, 1, 0.005)  # not confident
    assert sampler.should_stop([], a, low, 0, 0.005)  # k=0: always stable, one step suffices
    assert not sampler.should_stop([a, b], a, low, 2, 0.005)  # must equal each of the last k
    assert sampler.should_stop([b, a, a], a, low, 2, 0.005)
    assert not sampler.should_stop([a] * 5, a, low, None, 0.005)  # None: no adaptive stop
    assert not sampler.should_stop([a] * 5, a, low, 1, None)
    # the mean is over all positions and strict
    assert not sampler.should_stop([a], a, np.array([0.0, 0.0, 0.015], np.float32), 1, 0.005)


def test_trim_eos():
    toks, hit = sampler.trim_eos(np.array([5, 6, 1, 7, 1]), {1, 106})
    assert toks.tolist() == [5, 6, 1] and hit
    toks, hit = sampler.trim_eos(np.array([5, 6, 7]), {1})
    assert toks.tolist() == [5, 6, 7] and not hit
    toks, hit = sampler.trim_eos(np.array([106, 6]), {1, 106})
    assert toks.tolist() == [106] and hit
