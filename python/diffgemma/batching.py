"""Running requests against a model: one request alone, or several whose canvases share each decoder pass.

A request is a generator (generation.request) that yields what it needs from the model (`Prefill`: make its
sequence hold these committed tokens; `Denoise`: one denoising step of its canvas, answered with the step's
statistics) and, in between, the events its consumer sees. A driver answers the asks: `solo` on the model's
own sequence, one step at a time; `Batch` for several requests, each on its own sequence (prompt-KV store),
with every waiting canvas denoised in one pass. Requests join and leave a batch between steps (continuous
batching): a finished canvas leaves for its encode, a finished request frees its sequence for the next.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .sequence import Denoise  # the engine's own request record; batching.Denoise is its public name too

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence


@dataclasses.dataclass(frozen=True)
class Prefill:
    """A request's ask: its sequence must hold exactly `tokens` (with `images`), encoding only what is new."""

    tokens: np.ndarray
    images: list[Any]
    on_progress: Any = None


Request = Generator[Any, Any, Any]  # yields Prefill / Denoise / events, returns its result


def solo(model: Engine, request: Request) -> Generator[Any, None, Any]:
    """Run one request on the model's own sequence: its events, then its result as the return value."""
    try:
        answer = None
        while True:
            try:
                ask = request.send(answer)
            except StopIteration as done:
                return done.value
            answer = None
            if isinstance(ask, Denoise):
                answer = model.denoise_step(ask.canvas, ask.temperature, ask.self_cond, ask.uniform, ask.vocab,
                                            ask.logprobs)
            elif isinstance(ask, Prefill):
                model.prefill(ask.tokens, ask.images, on_progress=ask.on_progress)
            else:
                yield ask
    finally:
        request.close()


@dataclasses.dataclass(eq=False)
class _Member:
    tag: Any
    request: Request
    prompt: np.ndarray  # its first tokens, to pick the sequence that already holds most of them
    sequence: Sequence | None = None
    ask: Denoise | None = None  # its canvas, waiting for the next pass
    done: bool = False


class Batch:
    """Requests denoised together, at most `max_batch` at a time (the rest wait, in order).

    Iterating yields (tag, event) as the requests produce them and (tag, Done) when one ends (Done.error set
    when it failed: its arguments, its prefill, or no memory for its sequence; the others go on); add() and
    cancel() may be called between events, from the thread that iterates (a Batch has no lock of its own).
    Each request is answered exactly as it would be alone: its own sequence, its own seed; only the decoder
    pass is shared. Sequences are kept between requests, so one that continues another's tokens (a chat's next
    turn) encodes only what is new. Ending the iteration early (or close()) ends every request and frees the
    sequences."""

    def __init__(self, model: Engine, max_batch: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self._waiting: collections.deque[_Member] = collections.deque()
        self._active: list[_Member] = []
        self._free: list[Sequence] = []

    def add(self, tag: Any, request: Request, prompt: Any = ()) -> None:
        """Queue a request; it joins at the next step with room. prompt: its prompt tokens (a hint)."""
        self._waiting.append(_Member(tag, request, np.asarray(prompt, dtype=np.int64)))

    def cancel(self, tag: Any) -> bool:
        """End the request `tag` (the very object add() was given) now, waiting or running; the others are not
        disturbed. False if unknown."""
        for m in [*self._waiting, *self._active]:
            if m.tag is tag and not m.done:
                self._finish(m)
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._active or self._waiting)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        try:
            while self:
                yield from self.step()
        finally:  # also when the consumer leaves the loop or drops the iterator
            self.close()

    def step(self) -> Generator[tuple[Any, Any], None, None]:
        """Admit waiting requests while there is room, then run one decoder pass over every waiting canvas
        and hand each request its answer (yielding what it produces until it asks again)."""
        while self._waiting and len(self._active) < self.max_batch:
            m = self._waiting.popleft()
            try:
                m.sequence = self._sequence_for(m.prompt)
            except Exception as e:  # e.g. no memory for one more prompt-KV store: this request fails alone
                self._finish(m)
                yield m.tag, Done(None, e)
                continue
            self._active.append(m)
            yield from self._advance(m, None)
        asking = [m for m in self._active if m.ask is not None]
        if not asking:
            return
        answers = self.model.denoise_batch([(m.sequence, m.ask) for m in asking])
        for m, answer in zip(asking, answers, strict=True):
            m.ask = None
            if not m.done:  # not cancelled by a consumer while an earlier member's events were out
                yield from self._advance(m, answer)

    def _advance(self, m: _Member, answer: Any) -> Generator[tuple[Any, Any], None, None]:
        """Run a request until it asks for a denoising step (or ends), doing its prefills on the way."""
        while not m.done:
            try:
                ask = m.request.send(answer)
                answer = None
                if isinstance(ask, Prefill):
                    self.model.prefill(ask.tokens, ask.images, on_progress=ask.on_progress, sequence=m.sequence)
                    continue
            except StopIteration as end:
                self._finish(m)
                yield m.tag, Done(end.value)
                return
            except Exception as e:  # this request fails alone; the others go on
                self._finish(m)
                yield m.tag, Done(None, e)
                return
            except BaseException:
                self._finish(m)
                raise
            if isinstance(ask, Denoise):
                m.ask = ask
                return
            yield m.tag, ask

    def _sequence_for(self, prompt: np.ndarray) -> Sequence:
        """A free sequence, preferring the one whose committed tokens share the longest start with `prompt`."""
        if not self._free:
            return self.model.new_sequence()
        best = max(self._free, key=lambda s: s.common_prefix(prompt))
        self._free.remove(best)
        return best

    def _finish(self, m: _Member) -> None:
        m.done = True
        m.request.close()
        if m in self._waiting:
            self._waiting.remove(m)
        if m in self._active:
            self._active.remove(m)
            self._free.append(m.sequence)

    def close(self) -> None:
        """End every request and free the sequences."""
        for m in [*self._waiting, *self._active]:
            self._finish(m)
        for s in self._free:
            self.model.free_sequence(s)
        self._free = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Done:
    """The last item of a request in a batch: its result (a Generation), or the exception that ended it."""

    result: Any
    error: Exception | None = None
