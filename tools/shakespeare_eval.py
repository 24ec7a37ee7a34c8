"""Held-out measurements of a diffusion-gemma GGUF through diffgemma (shared by the bench and the build).

* `windows`: (prompt, clean canvas) pairs cut from held-out token streams: the prompt is BOS + the preceding
  clean text, the canvas the next canvas_length tokens.
* `denoise`: the canvas corrupted at level t (each position replaced by a uniform random token of the whole
  vocabulary with probability t, as in training and in generation's re-noising) and the first-step
  denoiser logits `Model.logits(prompt, noisy)`; accuracy = argmax vs the clean canvas, over all positions
  and over the corrupted positions alone. `denoise2` adds a self-conditioned second step.
* `unigram_baseline`: always predicting the most frequent training token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
    prompt: np.ndarray  # BOS + preceding clean tokens
    clean: np.ndarray  # the canvas to recover


def windows(streams: Sequence[Sequence[int]], *, n: int, prompt_len: int, canvas: int, bos: int,
            seed: int = 0) -> list[Window]:
    """`n` windows spread over the streams (round robin), at seeded random offsets."""
    rng = np.random.Generator(np.random.PCG64(seed))
    arrs = [np.asarray(s, dtype=np.int64) for s in streams if len(s) > prompt_len + canvas]
    if not arrs:
        raise ValueError("no stream is long enough for one window")
    out = []
    for i in range(n):
        a = arrs[i % len(arrs)]
        o = int(rng.integers(0, len(a) - prompt_len - canvas + 1))
        out.append(Window(np.concatenate([[bos], a[o:o + prompt_len]]), a[o + prompt_len:o + prompt_len + canvas]))
    return out


def corrupt(clean: np.ndarray, level: float, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy canvas, corrupted-position mask)."""
    mask = rng.random(clean.shape) < level
    return np.where(mask, rng.integers(0, vocab, clean.shape), clean), mask


def denoise(model: Any, wins: Sequence[Window], level: float, *, seed: int = 0
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First-step logits [L, V] and corruption masks for every window at corruption `level` (same noise for
    every model given the same seed, so quantized files are compared on identical inputs)."""
    rng = np.random.Generator(np.random.PCG64([seed, int(round(level * 1000))]))
    logits, masks = [], []
    for w in wins:
        noisy, mask = corrupt(w.clean, level, model.hparams.n_vocab, rng)
        logits.append(model.logits(w.prompt, noisy))
        masks.append(mask)
    return logits, masks


def denoise2(model: Any, wins: Sequence[Window], level: float, temperature: float, *, seed: int = 0
             ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """`denoise`, then a second, self-conditioned step on the same noisy canvas fed the first step's logits
    divided by `temperature` (what generation feeds back). Returns (step-1 logits, step-2 logits, masks)."""
    rng = np.random.Generator(np.random.PCG64([seed, int(round(level * 1000))]))
    first, second, masks = [], [], []
    for w in wins:
        noisy, mask = corrupt(w.clean, level, model.hparams.n_vocab, rng)
        lg = model.logits(w.prompt, noisy)
        first.append(lg)
        second.append(model.logits(w.prompt, noisy, self_cond=lg / temperature))
        masks.append(mask)
    return first, second, masks


def accuracy(logits: Sequence[np.ndarray], masks: Sequence[np.ndarray], wins: Sequence[Window]) -> dict[str, float]:
    hit = np.concatenate([lg.argmax(-1) == w.clean for lg, w in zip(logits, wins, strict=True)])
    m = np.concatenate(masks)
    return {"all": float(hit.mean()), "corrupted": float(hit[m].mean()) if m.any() else float("nan"),
            "n_corrupted": int(m.sum())}


def unigram_baseline(wins: Sequence[Window], masks: Sequence[np.ndarray], top: int) -> dict[str, float]:
    clean = np.concatenate([w.clean for w in wins])
    m = np.concatenate(masks)
    return {"all": float((clean == top).mean()), "corrupted": float((clean[m] == top).mean())}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Mean over canvas positions of KL(softmax(ref) || softmax(other)), in nats."""
    tot = n = 0.0
    for a, b in zip(ref, other, strict=True):
        la, lb = log_softmax(a), log_softmax(b)
        tot += float((np.exp(la) * (la - lb)).sum())
        n += a.shape[0]
    return tot / n
