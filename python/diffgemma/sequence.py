"""What the engine runs for one generation: a `Sequence` (its prompt-KV store, committed tokens, the canvas's
self-conditioning state and its template's vocabulary table on the device) and the records of one denoising step
asked of it (`Denoise`) and of the log-probabilities it answers (`StepLogprobs`)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from . import binding as B
from . import kv
from .graph import F32, MASKED_LOGIT

_lib, _ffi = B.lib, B.ffi


@dataclasses.dataclass(frozen=True)
class Denoise:
    """One denoising step asked of a sequence's `canvas`; answered with (argmax, entropy, sample)."""

    canvas: np.ndarray
    temperature: float
    self_cond: bool  # read the previous step's probabilities (False on a canvas's first step)
    uniform: np.ndarray  # one draw per position for the multinomial sample
    vocab: tuple[np.ndarray, np.ndarray] | None = None  # a template's (table, rows), or None
    logprobs: int | None = None  # k >= 0: also answer the step's StepLogprobs with its top k (None: off)


@dataclasses.dataclass(frozen=True)
class StepLogprobs:
    """A denoising step's log-probabilities under softmax(logits / T) (the distribution it samples from), read
    from the device as O(k x canvas) numbers: the fourth item of a step's answer when Denoise.logprobs is set."""

    argmax: np.ndarray  # float32 [L]: log p of each position's argmax token
    top_ids: np.ndarray  # int64 [L, k]: the k most likely tokens, most likely first (k = 0: empty)
    top: np.ndarray  # float32 [L, k]: their log p


_serials = itertools.count()  # graph keys name sequences and tables by serial: an id() can be reused


class Sequence:
    """One generation's place on the device: a prompt-KV store, the tokens (and images) committed into it, its
    canvas's self-conditioning state and its template's vocabulary table. The model's own serves the
    one-at-a-time API (m.prompt_kv); a batch takes one per request (Engine.new_sequence)."""

    def __init__(self, store: kv.PromptKV, buffer_type: Any) -> None:
        self.store = store
        self.committed: list[int] = []  # token ids whose K/V are in the store
        self.images: list[Any] = []  # multimodal.ImageSpan of the committed tokens
        self.serial = next(_serials)
        self._buffer_type = buffer_type
        self._sc_state: dict[int, B.DeviceTensors] = {}  # by canvas length
        self._vocab: tuple[B.DeviceTensors, np.ndarray, int] | None = None  # (table tensor, table written, serial)

    def common_prefix(self, tokens: np.ndarray) -> int:
        """How many of `tokens` the store already holds, from the start."""
        n = min(len(self.committed), len(tokens))
        same = np.asarray(self.committed[:n]) == np.asarray(tokens[:n])
        return n if same.all() else int(np.argmin(same))

    def self_cond_state(self, shape: tuple[int, int, int], ttype: int) -> Any:
        """The persistent tensor (graph.sc_shape: canvas length in shape[1]) holding the previous step's
        softmax(logits / T), zeros until written."""
        L = shape[1]
        if L not in self._sc_state:
            # zeroed: finite, and the first step multiplies it by a zero gate
            self._sc_state[L] = B.DeviceTensors(self._buffer_type, [(f"self_cond_state.{L}", ttype, shape)],
                                                what="the self-conditioning state", clear=True)
        return self._sc_state[L].tensors[0]

    def vocab_bias(self, table: np.ndarray) -> tuple[Any, int]:
        """(the persistent [V, K] bias tensor of a bool vocabulary table [K, V], its serial), written only when the
        table changes (once per template)."""
        if self._vocab is not None and self._vocab[1] is table:
            return self._vocab[0].tensors[0], self._vocab[2]
        K, V = table.shape
        if self._vocab is None or self._vocab[0].tensors[0].ne[1] != K:
            if self._vocab is not None:
                self._vocab[0].free()
                self._vocab = None
            self._vocab = (B.DeviceTensors(self._buffer_type, [("vocab_bias", F32, (V, K))],
                                           what="the template's vocabulary table"), table, next(_serials))
        t = self._vocab[0].tensors[0]
        bias = np.where(table, np.float32(0.0), np.float32(MASKED_LOGIT)).astype(np.float32)
        _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(bias), 0, bias.nbytes)
        self._vocab = (self._vocab[0], table, self._vocab[2])
        return t, self._vocab[2]

    def _free(self) -> None:  # Engine.free_sequence: the model forgets it too
        self.store.free()
        for d in self._sc_state.values():
            d.free()
        self._sc_state = {}
        if self._vocab is not None:
            self._vocab[0].free()
            self._vocab = None
