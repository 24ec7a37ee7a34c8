"""The entropy-bound sampler's rules, as short pure functions on numpy arrays (../shared/spec/model.md §7).

The per-position statistics (argmax, entropy, multinomial sample) are computed on the device by the graph;
these functions take the O(canvas) results and decide acceptance, re-noising and stopping on the host.
"""

from __future__ import annotations

import numpy as np


def temperature(n: int, steps: int, t_min: float, t_max: float) -> float:
    """Temperature of the step with n steps remaining (n = steps .. 1): t_max first, never reaching t_min."""
    return temperature_at(n / steps, t_min, t_max)


def temperature_at(level: float, t_min: float, t_max: float) -> float:
    """The linear schedule at noise level `level` in [0, 1]: noisier canvases are denoised hotter."""
    return t_min + (t_max - t_min) * level


def accept(entropy: np.ndarray, bound: float) -> np.ndarray:
    """Positions to accept: sorted by ascending entropy, position (k) is accepted iff the sum of the entropies
    strictly before it is <= bound (an exclusive prefix sum). The lowest-entropy position is always accepted.
    Ties keep position order (stable sort)."""
    order = np.argsort(entropy, kind="stable")
    h = entropy[order].astype(np.float32)
    before = np.cumsum(h, dtype=np.float32) - h  # float32 like the reference, compared with a float32 bound
    acc = np.zeros(len(entropy), dtype=bool)
    acc[order] = before <= np.float32(bound)
    return acc


def renoise(accepted: np.ndarray, sampled: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Next canvas: accepted positions take their sampled token, every other position fresh uniform noise."""
    return np.where(accepted, sampled, noise)


def clamp(canvas: np.ndarray, fixed: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """A template's fixed positions hold their tokens, whatever was sampled or drawn there."""
    return np.where(fixed, tokens, canvas)


def is_stable(history: list[np.ndarray], argmax: np.ndarray, stability: int) -> bool:
    """The argmax canvas equals each of the last `stability` argmax canvases at every position (0: always)."""
    if stability == 0:
        return True
    if len(history) < stability:
        return False
    return all(np.array_equal(h, argmax) for h in history[-stability:])


def should_stop(history: list[np.ndarray], argmax: np.ndarray, entropy: np.ndarray, stability: int | None,
                confidence: float | None) -> bool:
    """Stable and confident: unchanged argmax canvas and mean entropy (over all positions) below confidence.
    With either threshold None there is no adaptive stop."""
    if stability is None or confidence is None:
        return False
    mean = np.mean(entropy, dtype=np.float32)
    return bool(is_stable(history, argmax, stability) and mean < np.float32(confidence))


def trim_eos(canvas: np.ndarray, eos_ids: set[int] | frozenset[int]) -> tuple[np.ndarray, bool]:
    """Cut a committed canvas after its first EOS (kept); returns (tokens, whether an EOS was found)."""
    for i, t in enumerate(canvas.tolist()):
        if t in eos_ids:
            return canvas[: i + 1], True
    return canvas, False
