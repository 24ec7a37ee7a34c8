"""The batch driver: one worker thread, the model, and the jobs it generates.

Up to `max_batch` jobs run at a time, their canvases denoised in one decoder pass per step (continuous batching:
jobs join and leave between steps); the others wait in a bounded FIFO queue. Each job's events (frames, text
deltas, the answer or an error) go to its request's asyncio loop. A request with `n` choices is n jobs, which
share one event queue; each running job holds one of the batch's `max_batch` places (its slot, for /slots).
"""

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import generation
from ..batching import Batch, Done
from ..chat import OPENAI_FINISH, output_text
from ..chat_format import OutputStream
from ..errors import Error
from ..generation import CanvasEvent, Generation, StepEvent, TokenLogprob
from ..model import Model
from .defaults import MAX_BATCH
from .errors import ApiError, shutdown_error
from .metrics import Metrics
from .protocol import Params
from .responses import Frame

log = logging.getLogger("diffgemma.server")


Event = tuple[str, Any, int]  # (kind, payload, the job's choice index)


class Job:
    """One choice of a request: its prompt ids and Params in (`p`), events out (to the request's asyncio loop).
    The n jobs of a request with n choices share `events`; each event carries the job's `index`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: list[int], params: Params, *,
                 events: "asyncio.Queue[Event] | None" = None, index: int = 0, request_id: str = ""):
        self.loop = loop
        self.ids = ids
        self.p = params
        self.events: asyncio.Queue[Event] = asyncio.Queue() if events is None else events
        self.index = index
        self.request_id = request_id  # the response's id (chatcmpl-...), shown by /slots
        self.task = -1  # a number of its own, given when queued (llama-server's id_task)
        self.cancelled = threading.Event()
        self.finished = False

    def put(self, kind: str, payload: Any = None) -> None:
        """Send an event to the request's handler: "frame", "delta" ((text or chat delta, the TokenLogprobs
        that go with it or None)), "done" or "error"."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload, self.index))
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
            self.cancelled.set()


class _Text:
    """Committed tokens -> the text to send, as deltas. Text is decoded from all tokens so far (a canvas can
    end inside a multi-byte character), trailing U+FFFD is held back until the next canvas completes it, and
    so is a tail that could still grow into a stop sequence."""

    def __init__(self, model: Model, max_tokens: int, stop: list[str],
                 decode: Callable[[list[int]], str] | None = None, prefix: str = ""):
        self.model, self.max_tokens, self.stop = model, max_tokens, stop
        self.decode = decode or model.detokenize
        self.prefix = prefix  # text the prompt already holds (a forced call's start): part of the output
        self.tokens: list[int] = []
        self.sent = ""  # what has been streamed
        self.text = ""  # the whole text so far (the answer of a non-streamed request)
        self.hit_stop = False

    def update(self, tokens: list[int], final: bool) -> str:
        """Take the committed tokens so far; returns the text newly safe to send."""
        self.tokens = tokens[: self.max_tokens]
        text = self.prefix + self.decode(self.tokens)
        cut = min((i for i in (text.find(s, len(self.prefix)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.hit_stop, final = text[:cut], True, True
        self.text = text
        if not final:
            text = text.rstrip("\ufffd")
            if self.stop:
                text = text[: max(len(self.sent), len(text) - max(map(len, self.stop)) + 1)]
            if not text.startswith(self.sent):  # decoding was not prefix-stable here: wait for the end
                return ""
        delta = text[len(self.sent):]
        self.sent += delta
        return delta

    def covering(self, text: str) -> int:
        """How many of the tokens make `text` (a start of the output): the fewest whose decoded text reaches its
        length (a token cut by a stop sequence counts). Decoding is prefix-stable, so a bisection does."""
        lo, hi = 0, len(self.tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.prefix + self.decode(self.tokens[:mid])) >= len(text):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def n_tokens(self) -> int:
        """The completion's token count: all tokens kept (at most max_tokens), or those that make the text
        before a stop sequence."""
        return self.covering(self.text) if self.hit_stop else len(self.tokens)


class Run:
    """One request's side of a generation, fed the events of its stream: `on_event(ev)` for each (False: stop
    now, the client left or the text reached a stop sequence), then `finish(generation)` (None when stopped
    early) or `error(e)`. Whoever iterates the stream owns it; a Run only turns events into the job's frames,
    text deltas and final answer."""

    def __init__(self, job: Job, model: Model, metrics: Metrics, piece: Callable[[int], str]):
        self.job, self.metrics, self.piece = job, metrics, piece
        p = job.p
        self.chat = chat = p.chat
        if chat is None:
            self.text = _Text(model, p.max_tokens, p.stop)
        else:
            self.text = _Text(model, p.max_tokens, p.stop, lambda toks: output_text(model, toks), chat.prefix)
            self.parsed = OutputStream(tools=bool(chat.tools), reasoning=chat.reasoning, max_calls=chat.max_calls)
        # Text goes out per canvas when streamed or checked for stops; a template's is whole only at the end.
        self.per_canvas = bool(p.stream or p.stop) and p.template is None
        # A prompt with images goes in as messages (the tower's embeddings are cached from validation).
        self.prompt: Any = p.messages if p.messages is not None else job.ids
        self.stream_kw = {"max_new_tokens": p.max_tokens, "seed": p.seed, "sampler": p.sampler,
                          "temperature": p.temperature, "logprobs": p.logprobs, "image_budget": p.image_budget,
                          "template": p.template}
        self.committed: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # the committed tokens', when asked for
        self.logprobs_sent = 0  # how many of them went out with the deltas
        self.canvases: list[CanvasEvent] = []
        self.cancelled = False
        self.t0 = time.perf_counter()
        self.slot = -1  # its place in the batch while it runs
        self.position: tuple[int, int, int] | None = None  # (canvas, step, steps) of its last denoising step

    def on_event(self, ev: StepEvent | CanvasEvent) -> bool:
        """Take one event of the stream; False when the generation should stop here."""
        if self.job.cancelled.is_set():
            self.cancelled = True
            return False
        if isinstance(ev, StepEvent):
            self.position = (ev.canvas_index, ev.step, ev.steps)
            if self.job.p.frames:
                self.job.put("frame", self._frame(ev))
            return True
        self.canvases.append(ev)
        self.committed.extend(int(t) for t in ev.tokens)
        self.logprobs.extend(ev.logprobs or [])
        if self.per_canvas:
            self._send(self.text.update(self.committed, final=False), False)
        elif self.job.p.json and ev.text_delta:  # a schema's parts in committed canvases: final, a start of the JSON
            self.text.text = self.text.sent = self.text.sent + ev.text_delta
            self._send(ev.text_delta, False)
        return not self.text.hit_stop

    def _frame(self, ev: StepEvent) -> Frame:
        ids = [int(t) for t in ev.argmax]
        return Frame(canvas=ev.canvas_index, step=ev.step, steps=ev.steps, temperature=round(ev.temperature, 5),
                     accepted=ev.accepted, mean_entropy=round(ev.mean_entropy, 5), text=ev.text, tokens=ids,
                     pieces=[self.piece(t) for t in ids],
                     elapsed_ms=round(1e3 * (time.perf_counter() - self.t0), 2),
                     fixed=None if ev.fixed is None else [int(f) for f in ev.fixed])

    def _new_logprobs(self, final: bool) -> list[TokenLogprob] | None:
        """The TokenLogprobs of the tokens the text sent so far is made of, not yet sent (None: not asked for)."""
        if self.job.p.logprobs is None:
            return None
        n = self.text.n_tokens() if final else self.text.covering(self.text.sent)
        new = self.logprobs[self.logprobs_sent:n]
        self.logprobs_sent = max(self.logprobs_sent, n)
        return new or None

    def _send(self, delta: str, final: bool) -> None:
        job, p = self.job, self.job.p
        if self.chat is None:
            logprobs = self._new_logprobs(final) if p.stream else None
            if p.stream and (delta or logprobs):
                job.put("delta", (delta, logprobs))
            return
        if p.json:  # the JSON text is the content as it is (nothing in it is a marker to parse)
            if p.stream and delta:
                job.put("delta", ({"content": delta}, None))
            return
        d = self.parsed.update(self.text.text if final else self.text.sent, final)
        if not p.stream:
            return
        deltas: list[dict] = []
        if d.reasoning:
            deltas.append({"reasoning_content": d.reasoning})
        if d.content:
            deltas.append({"content": d.content})
        n = len(self.parsed.calls) - len(d.tool_calls)
        for k, call in enumerate(d.tool_calls):  # a call is sent whole, once its canvas closed it
            deltas.append({"tool_calls": [{"index": n + k, **call.to_dict()}]})
        logprobs = self._new_logprobs(final)
        if logprobs and not deltas:
            deltas.append({})
        for i, one in enumerate(deltas):  # the tokens' logprobs ride with the first chunk
            job.put("delta", (one, logprobs if i == 0 else None))

    def finish(self, g: Generation | None, *, shutting_down: bool = False) -> dict | None:
        """End the request: the `done` payload (also returned) for a generation that ran to its end (g) or
        stopped at a stop sequence (None); nothing but the count (or a 503 on shutdown) when cancelled."""
        job, p, text = self.job, self.job.p, self.text
        if self.cancelled:
            if shutting_down:  # cancelled by shutdown, not by its client: tell the client why it ends
                job.put("error", shutdown_error())
            else:
                self.metrics.count_cancelled()
            return None
        if g is not None and p.template is not None:  # the filled template, whatever its length
            filled = text.prefix + (g.holes[0] if p.infill else g.text)  # a laid-out tool call follows its prefix
            delta = filled[len(text.sent):]  # what a schema streamed so far is a start of it
            text.text = text.sent = filled
            # An infill answers with its hole: the template's fixed tokens (the suffix) are not part of it.
            fixed = int(p.template.fixed[: p.template.n_template].sum()) if p.infill else 0
            text.tokens = g.tokens[: len(g.tokens) - fixed]
        else:
            delta = text.update(self.committed, final=True)
        # The stream's own timings: of the whole generation, or up to the canvas that reached a stop sequence.
        timings = {k: round(v, 3) for k, v in dataclasses.asdict(
            g.timings if g is not None else self.canvases[-1].timings).items()}
        canvases = [{"steps": c.steps, "stopped_early": c.stopped_early, "eos": c.eos} for c in self.canvases]
        self._send(delta, True)
        n_out = text.n_tokens()
        self.metrics.observe([c.steps for c in self.canvases], timings["step_ms"], len(job.ids), n_out,
                             timings["tokens_per_s"])
        message = None if self.chat is None else self._message()
        if message and "tool_calls" in message:
            finish = "tool_calls"
        else:  # g is None only when a stop sequence ended the text
            finish = "stop" if text.hit_stop or g is None else OPENAI_FINISH[g.finish_reason]
        done = {
            "text": text.text,
            "message": message,
            "logprobs": None if p.logprobs is None else self.logprobs[:n_out],
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": n_out,
                      "total_tokens": len(job.ids) + n_out},
            "diffusion": {"seed": p.seed, "canvases": canvases, "timings": timings,
                          "elapsed_ms": round(1e3 * (time.perf_counter() - self.t0), 3)},
        }
        job.put("done", done)
        return done

    def _message(self) -> dict:
        """A chat request's answer: content, thinking and tool calls as parsed from the text."""
        parsed = self.parsed
        if self.job.p.json:
            return {"role": "assistant", "content": self.text.text}
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.thinking:
            message["reasoning_content"] = parsed.thinking
        if parsed.calls:
            message["tool_calls"] = [c.to_dict() for c in parsed.calls]
            message["content"] = parsed.content if parsed.content.strip() else None
        return message

    def error(self, e: Exception) -> None:
        """End the request with a 500: the generation raised."""
        self.job.put("error", _failure(e))


def _failure(e: Exception) -> ApiError:
    if isinstance(e, Error):  # requests were validated up front, so what is left is on our side (e.g. memory)
        return ApiError(500, str(e), type="server_error")
    log.exception("generation failed", exc_info=e)
    return ApiError(500, f"generation failed: {e}", type="server_error")


class Engine:
    """The model, a bounded FIFO of jobs and the one thread that runs them: up to max_batch at a time, their
    canvases denoised in one decoder pass per step (continuous batching: jobs join and leave between steps)."""

    def __init__(self, model: Model, queue_size: int, metrics: Metrics, max_batch: int = MAX_BATCH):
        self.model = model
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._runs: dict[int, Run] = {}  # id(job) -> its run, for the jobs in the batch (worker thread only)
        self._running = 0  # len(_runs), for the other threads
        self._slots: list[Run | None] = [None] * max_batch  # the batch's places (changed under _cv)
        self._tasks = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, str] = {}

    # -- queue --

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="diffgemma-generate", daemon=True)
            self._thread.start()

    def depth(self) -> tuple[int, int]:
        """(waiting, running) jobs now."""
        with self._cv:
            return len(self._waiting), self._running

    def submit(self, *jobs: Job) -> None:
        """Queue a request's jobs (one per choice), all or none: a 503 when the queue has no room for all of them
        or the server is stopping."""
        with self._cv:
            if self._closing:
                raise shutdown_error()
            # Jobs that free places in the batch will take at the next step do not count as waiting.
            if len(self._waiting) + len(jobs) - (self.max_batch - self._running) > self.queue_size:
                raise ApiError(503, f"the request queue is full ({self.queue_size} waiting); retry later",
                               type="server_error", code="queue_full")
            for job in jobs:
                job.task = next(self._tasks)
                self._waiting.append(job)
            self._cv.notify()

    def slots(self) -> list[Run | None]:
        """The batch's places now: the Run in each (None where free)."""
        with self._cv:
            return list(self._slots)

    def cancel(self, job: Job) -> None:
        """Forget a job whose client left: drop it from the queue, or take it out of the batch at the next step."""
        if job.finished:
            return
        job.cancelled.set()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.count_cancelled()

    def abort(self) -> None:
        """Stop taking work: waiting jobs and the running ones end with a 503 'shutting down' error."""
        with self._cv:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cv.notify_all()
        for job in waiting:
            job.put("error", shutdown_error())

    def close(self, timeout: float = 30.0) -> None:
        """abort(), then wait for the worker thread to end."""
        self.abort()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        batch = Batch(self.model, self.max_batch)
        try:
            while True:
                with self._cv:
                    while not self._waiting and not self._runs and not self._closing:
                        self._cv.wait()
                    if self._closing:
                        return
                    joining = [self._waiting.popleft()
                               for _ in range(min(len(self._waiting), self.max_batch - len(self._runs)))]
                    self._running = len(self._runs) + len(joining)
                try:
                    for job in joining:
                        self._join(batch, job)
                    for run in [r for r in self._runs.values() if r.job.cancelled.is_set()]:
                        run.cancelled = True  # its client left: out of the batch before the step
                        self._leave(batch, run.job, None)
                    self._step(batch)
                except Exception as e:  # a failed pass ends the requests in it, never the worker
                    for run in list(self._runs.values()):
                        run.error(e)
                        self._leave(batch, run.job, None, answered=True)
                    batch.close()
                    batch = Batch(self.model, self.max_batch)
        finally:
            for run in list(self._runs.values()):  # shutting down: their clients hear why they end
                run.cancelled = True
                self._leave(batch, run.job, None)
            batch.close()

    # -- the batch --

    def _piece(self, t: int) -> str:
        p = self._pieces.get(t)
        if p is None:
            p = self._pieces[t] = self.model.tokenizer.token_text(t)
        return p

    def _join(self, batch: Batch, job: Job) -> None:
        run = Run(job, self.model, self.metrics, self._piece)
        try:
            request, _, ids = generation.request(self.model, run.prompt, **run.stream_kw)
        except Exception as e:
            run.error(e)
            self._done(job)
            return
        batch.add(job, request, ids)
        self._runs[id(job)] = run
        with self._cv:
            run.slot = self._slots.index(None)  # there is one: no more than max_batch run
            self._slots[run.slot] = run

    def _step(self, batch: Batch) -> None:
        """One decoder pass over every job's canvas; each job's events go to its Run as they come."""
        for job, ev in batch.step():
            run = self._runs.get(id(job))
            if run is None:
                continue
            if isinstance(ev, Done) and ev.error is not None:  # this request failed alone
                run.error(ev.error)
                self._leave(batch, job, None, answered=True)
            elif isinstance(ev, Done):
                self._leave(batch, job, ev.result)
            elif not run.on_event(ev):  # its client left or a stop sequence was reached: out of the batch now
                self._leave(batch, job, None)

    def _leave(self, batch: Batch, job: Job, g: Generation | None, answered: bool = False) -> None:
        batch.cancel(job)
        run = self._runs.pop(id(job))
        with self._cv:
            self._slots[run.slot] = None
        if not answered:
            run.finish(g, shutting_down=self._closing)
        self._done(job)

    def _done(self, job: Job) -> None:
        job.finished = True
        with self._cv:
            self._running = len(self._runs)
