"""`diffgemma serve`: an OpenAI-compatible HTTP server with live canvas streaming and a web view.

One model, one worker thread: requests wait in a bounded FIFO queue and are generated one at a time (the
model's prompt-KV store is a single slot). Committed text streams per canvas as standard SSE chunks; opt-in
denoising frames ride along as SSE comment lines, which every SSE client (the `openai` one included) skips.

fastapi and uvicorn are imported lazily so that `diffgemma` (and its CLI) work without them. No
`from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
"""

import asyncio
import base64
import collections
import contextlib
import dataclasses
import importlib.resources
import json
import logging
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from . import generation
from .batching import Batch, Done
from .errors import Error
from .generation import CanvasEvent, Generation, StepEvent
from .sampler import SamplerSettings, setting_problem

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger("diffgemma.server")

DEFAULT_MAX_TOKENS = 256  # when a request names no max_tokens (the library's default)
POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
CANVAS_STEP_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_NEEDS_FASTAPI = "diffgemma serve needs fastapi and uvicorn (pip install fastapi uvicorn)"
REASONING_FORMATS = ("auto", "none")  # thinking in `reasoning_content` | left in the content, markers and all


# ---- errors ------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with an OpenAI-style body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


class _Cancelled(Exception):
    """Raised in a request's handler when its client went away."""


# ---- request parsing -----------------------------------------------------------------------------------------


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _opt_int(body: dict, name: str, *, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {v!r}", name)
    if lo is not None and v < lo:
        raise _bad(f"'{name}' must be >= {lo}, got {v}", name)
    return v


def _sampler_settings(body: dict, defaults: SamplerSettings) -> SamplerSettings:
    """The diffusion settings of a request: `defaults` (the model's) overridden by the extra body fields named
    as SamplerSettings' fields, validated by the library's own rules (so errors are 400s naming the field)."""
    given: dict[str, Any] = {}
    for f in dataclasses.fields(defaults):
        v = body.get(f.name)
        # Absent (or null) = the model's default; an explicit null switches the adaptive stop off where it can.
        if f.name not in body or (v is None and not f.metadata["off"]):
            continue
        why = setting_problem(f.name, v)
        if why:
            raise _bad(why, f.name)
        given[f.name] = v
    try:
        return defaults.replace(**given)
    except Error as e:
        raise _bad(str(e)) from e


def _stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return stop


def _unsupported(body: dict, names: dict[str, Callable[[Any], bool]]) -> None:
    """400 for options whose meaning we cannot honour (silently ignoring them would give wrong results)."""
    for name, ok in names.items():
        if name in body and not ok(body[name]):
            raise _bad(f"'{name}'={body[name]!r} is not supported by this server", name, "unsupported_parameter")


_COMMON_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v in (None, 1),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
}

_CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": lambda v: not v,  # the legacy form of tools
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}
_COMPLETION_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: not v,
    "best_of": lambda v: v in (None, 1),
}


def _parse_common(body: dict, sampler_defaults: SamplerSettings) -> dict:
    """Fields shared by both endpoints; temperature/top_p/penalties are accepted and ignored (the diffusion
    sampler has its own temperature schedule, t_max -> t_min)."""
    _unsupported(body, _COMMON_UNSUPPORTED)
    max_tokens = _opt_int(body, "max_tokens", lo=1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_completion_tokens", lo=1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    frames = body.get("diffusion_frames", False)
    if not isinstance(frames, bool | None):
        raise _bad("'diffusion_frames' must be a boolean", "diffusion_frames")
    from .generation import RANDOM_SEED

    seed = _opt_int(body, "seed", lo=RANDOM_SEED)
    if seed == RANDOM_SEED:  # llama.cpp clients send -1 for "random"
        seed = None
    return {
        "max_tokens": max_tokens or DEFAULT_MAX_TOKENS,
        "stream": bool(stream),
        "include_usage": bool(opts and opts.get("include_usage")),
        "frames": bool(frames) and bool(stream),  # frames only travel in a stream
        "stop": _stop_list(body),
        "seed": secrets.randbits(63) if seed is None else seed,  # chosen here so every answer can report it
        "sampler": _sampler_settings(body, sampler_defaults),
    }


def _template_field(body: dict) -> Any:
    """The `template` extension field as the library takes it: a template string, or a list of parts (strings
    and {"hole": N, "allowed": class names | [texts or token ids], "empty": bool}). None when absent."""
    from .template import Hole

    t = body.get("template")
    if t is None or isinstance(t, str):
        return t
    if not isinstance(t, list):
        raise _bad("'template' must be a string or an array of parts", "template")
    parts: list[Any] = []
    for i, part in enumerate(t):
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, dict) or set(part) - {"hole", "allowed", "empty"} or "hole" not in part:
            raise _bad(f"template[{i}] must be a string or {{\"hole\": N, \"allowed\": ..., \"empty\": bool}}",
                       "template")
        n, allowed, empty = part["hole"], part.get("allowed"), part.get("empty", False)
        if isinstance(n, bool) or not isinstance(n, int):
            raise _bad(f"template[{i}].hole must be an integer (the hole's size in tokens)", "template")
        if not (allowed is None or isinstance(allowed, str) or (isinstance(allowed, list) and all(
                isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in allowed))):
            raise _bad(f"template[{i}].allowed must be class names or an array of texts and token ids", "template")
        if not isinstance(empty, bool):
            raise _bad(f"template[{i}].empty must be a boolean", "template")
        parts.append(Hole(n, allowed, empty, f"hole (template[{i}])"))
    return parts


def _messages(body: dict) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise _bad(f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.get('role')!r}", "messages")
        content = m.get("content")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""  # an assistant message that only calls tools
        if isinstance(content, list):  # content parts: text, and images as data: URLs
            parts = [_content_part(part, i) for part in content]
            if any(p["type"] == "image" for p in parts):
                out.append({"role": role, "content": parts})
                continue
            content = "".join(p["text"] for p in parts)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or an array of text parts", "messages")
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls:
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls must be an array", "messages")
            msg["tool_calls"] = calls
            if isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]  # kept between the calls of one exchange
        if role == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append(msg)
    return out


def _content_part(part: Any, i: int) -> dict:
    """An OpenAI content part -> the library's: text as is, image_url (data: URLs only; nothing is fetched)
    -> {"type": "image", "image": bytes}."""
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if isinstance(part, dict) and part.get("type") == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise _bad(f"messages[{i}].content: image_url needs a url", "messages")
        if not url.startswith("data:"):
            raise _bad(f"messages[{i}].content: only data: URLs are accepted for images (this server does not "
                       "fetch remote URLs); send the picture inline as data:image/...;base64,...", "messages",
                       "remote_image_url")
        head, _, payload = url.partition(",")
        if not head.endswith(";base64"):
            raise _bad(f"messages[{i}].content: the image data: URL must be base64-encoded", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise _bad(f"messages[{i}].content: the image data: URL is not valid base64: {e}", "messages") from e
        return {"type": "image", "image": data}
    raise _bad(f"messages[{i}].content: parts must be text or image_url", "messages")


def _chat_options(body: dict, default_reasoning: str) -> dict:
    """tools / tool_choice / parallel_tool_calls / reasoning_format / chat_template_kwargs of a chat request."""
    from . import chat_format

    try:
        tools = chat_format.check_tools(body.get("tools"))
    except Error as e:
        raise _bad(str(e), "tools") from e
    try:
        choice = chat_format.check_tool_choice(body.get("tool_choice"), tools)
    except Error as e:
        raise _bad(str(e), "tool_choice") from e
    parallel = body.get("parallel_tool_calls")
    if not isinstance(parallel, bool | None):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    reasoning = body.get("reasoning_format") or default_reasoning
    if reasoning not in REASONING_FORMATS:
        raise _bad(f"'reasoning_format' must be one of {list(REASONING_FORMATS)}, got {reasoning!r}",
                   "reasoning_format")
    kwargs = body.get("chat_template_kwargs") or {}
    reserved = {"messages", "tools", "bos_token", "eos_token", "add_generation_prompt"}
    if not isinstance(kwargs, dict) or reserved & set(kwargs):
        raise _bad(f"'chat_template_kwargs' must be an object without {sorted(reserved)}", "chat_template_kwargs")
    offered = tools if choice != "none" else []
    return {"tools": offered, "template_kwargs": kwargs,
            "prefix": chat_format.forced_prefix(choice) if offered else "",
            "max_calls": 1 if parallel is False else None, "reasoning": reasoning == "auto"}


def _completion_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise _bad("'prompt' must be a non-empty string or token-id array (one prompt per request)", "prompt")


# ---- metrics -----------------------------------------------------------------------------------------------


class Metrics:
    """Counters and gauges, exposed as Prometheus text (no client library needed for this few)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.cancelled = 0
        self.generations = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.canvas_buckets = [0] * len(CANVAS_STEP_BUCKETS)
        self.canvases = 0
        self.canvas_steps_sum = 0
        self.last_step_ms = 0.0
        self.last_tokens_per_s = 0.0
        self.last_steps_per_canvas = 0.0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def observe(self, canvas_steps: list[int], step_ms: float, prompt_tokens: int, tokens: int,
                tokens_per_s: float) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += tokens
            n = sum(canvas_steps)
            self.steps += n
            self.step_seconds += n * step_ms / 1e3
            for s in canvas_steps:
                self.canvases += 1
                self.canvas_steps_sum += s
                for i, le in enumerate(CANVAS_STEP_BUCKETS):
                    if s <= le:
                        self.canvas_buckets[i] += 1
            if n:
                self.last_step_ms = step_ms
                self.last_steps_per_canvas = n / len(canvas_steps)
            self.last_tokens_per_s = tokens_per_s

    def render(self, waiting: int, running: int, capacity: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:.10g}" for labels, value in samples)

        with self._lock:
            metric("diffgemma_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("diffgemma_requests_cancelled_total", "counter",
                   "Generations abandoned because the client disconnected.", [("", self.cancelled)])
            metric("diffgemma_generations_total", "counter", "Generations completed (not cancelled).",
                   [("", self.generations)])
            metric("diffgemma_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   [("", self.prompt_tokens)])
            metric("diffgemma_generated_tokens_total", "counter", "Completion tokens returned.",
                   [("", self.generated_tokens)])
            metric("diffgemma_denoise_steps_total", "counter", "Denoising steps run.", [("", self.steps)])
            metric("diffgemma_denoise_seconds_total", "counter", "Wall time spent in denoising steps.",
                   [("", self.step_seconds)])
            metric("diffgemma_step_ms", "gauge", "Mean milliseconds per denoising step (last generation).",
                   [("", self.last_step_ms)])
            metric("diffgemma_steps_per_canvas", "gauge", "Mean denoising steps per canvas (last generation).",
                   [("", self.last_steps_per_canvas)])
            metric("diffgemma_tokens_per_second", "gauge", "New tokens per second (last generation).",
                   [("", self.last_tokens_per_s)])
            hist = [(f'_bucket{{le="{le}"}}', n) for le, n in zip(CANVAS_STEP_BUCKETS, self.canvas_buckets,
                                                                  strict=True)]
            hist += [('_bucket{le="+Inf"}', self.canvases), ("_sum", self.canvas_steps_sum),
                     ("_count", self.canvases)]
            metric("diffgemma_canvas_steps", "histogram", "Denoising steps each committed canvas took.", hist)
        metric("diffgemma_queue_depth", "gauge", "Requests waiting for the model.", [("", waiting)])
        metric("diffgemma_queue_capacity", "gauge", "Most requests that may wait (--queue-size).",
               [("", capacity)])
        metric("diffgemma_requests_running", "gauge", "Requests being generated (0 or 1).", [("", running)])
        return "\n".join(out) + "\n"


# ---- the worker --------------------------------------------------------------------------------------------


class _Job:
    """One request's generation: parameters in, events out (to the request's asyncio loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: list[int], params: dict):
        self.loop = loop
        self.ids = ids
        self.p = params
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False

    def put(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
            self.cancelled.set()


class _Text:
    """Committed tokens -> the text to send, as deltas. Text is decoded from all tokens so far (a canvas can
    end inside a multi-byte character), trailing U+FFFD is held back until the next canvas completes it, and
    so is a tail that could still grow into a stop sequence."""

    def __init__(self, model: Any, max_tokens: int, stop: list[str], decode: Callable[[list[int]], str] | None = None,
                 prefix: str = ""):
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


class _Run:
    """One request's side of a generation, fed the events of its stream: `on_event(ev)` for each (False: stop
    now, the client left or the text reached a stop sequence), then `finish(generation)` (None when stopped
    early) or `error(e)`. Whoever iterates the stream owns it; a _Run only turns events into the job's
    frames, text deltas and final answer."""

    def __init__(self, job: _Job, model: "Model", metrics: Metrics, piece: Callable[[int], str]):
        from .chat import output_text
        from .chat_format import OutputStream

        self.job, self.metrics, self.piece = job, metrics, piece
        p = job.p
        self.chat = chat = p.get("chat")  # a chat request: the output is parsed into content, reasoning, calls
        if chat is None:
            self.text = _Text(model, p["max_tokens"], p["stop"])
        else:
            self.text = _Text(model, p["max_tokens"], p["stop"], lambda toks: output_text(model, toks),
                              chat["prefix"])
            self.parsed = OutputStream(tools=bool(chat["tools"]), reasoning=chat["reasoning"],
                                       max_calls=chat["max_calls"])
        # Text goes out per canvas when streamed or checked for stops; a template's is whole only at the end.
        self.per_canvas = bool(p["stream"] or p["stop"]) and p.get("template") is None
        # A prompt with images goes in as messages (the tower's embeddings are cached from validation).
        self.prompt: Any = p["messages"] if p.get("messages") is not None else job.ids
        self.stream_kw = {"max_new_tokens": p["max_tokens"], "seed": p["seed"], "sampler": p["sampler"],
                          "image_budget": p.get("image_budget", 280), "template": p.get("template")}
        self.committed: list[int] = []
        self.canvases: list[CanvasEvent] = []
        self.cancelled = False
        self.t0 = time.perf_counter()

    def on_event(self, ev: StepEvent | CanvasEvent) -> bool:
        """Take one event of the stream; False when the generation should stop here."""
        if self.job.cancelled.is_set():
            self.cancelled = True
            return False
        if isinstance(ev, StepEvent):
            if self.job.p["frames"]:
                self.job.put("frame", self._frame(ev))
            return True
        self.canvases.append(ev)
        self.committed.extend(int(t) for t in ev.tokens)
        if self.per_canvas:
            self._send(self.text.update(self.committed, final=False), False)
        return not self.text.hit_stop

    def _frame(self, ev: StepEvent) -> dict:
        ids = [int(t) for t in ev.argmax]
        return {"type": "frame", "canvas": ev.canvas_index, "step": ev.step, "steps": ev.steps,
                "temperature": round(ev.temperature, 5), "accepted": ev.accepted,
                "mean_entropy": round(ev.mean_entropy, 5), "text": ev.text, "tokens": ids,
                "pieces": [self.piece(t) for t in ids],
                "elapsed_ms": round(1e3 * (time.perf_counter() - self.t0), 2),
                **({} if ev.fixed is None else {"fixed": [int(f) for f in ev.fixed]})}

    def _send(self, delta: str, final: bool) -> None:
        job, p = self.job, self.job.p
        if self.chat is None:
            if delta and p["stream"]:
                job.put("delta", delta)
            return
        d = self.parsed.update(self.text.text if final else self.text.sent, final)
        if not p["stream"]:
            return
        if d.reasoning:
            job.put("delta", {"reasoning_content": d.reasoning})
        if d.content:
            job.put("delta", {"content": d.content})
        n = len(self.parsed.calls) - len(d.tool_calls)
        for k, call in enumerate(d.tool_calls):  # a call is sent whole, once its canvas closed it
            job.put("delta", {"tool_calls": [{"index": n + k, **call.to_dict()}]})

    def finish(self, g: Generation | None, *, shutting_down: bool = False) -> dict | None:
        """End the request: the `done` payload (also returned) for a generation that ran to its end (g) or
        stopped at a stop sequence (None); nothing but the count (or a 503 on shutdown) when cancelled."""
        job, p, text = self.job, self.job.p, self.text
        if self.cancelled:
            if shutting_down:  # cancelled by shutdown, not by its client: tell the client why it ends
                job.put("error", _shutting_down())
            else:
                self.metrics.count_cancelled()
            return None
        if g is not None and p.get("template") is not None:  # the filled template, whatever its length
            delta = text.text = text.sent = g.holes[0] if p.get("infill") else g.text
            text.tokens = g.tokens
            eos = True
        else:
            delta = text.update(self.committed, final=True)
            eos = g is not None and g.canvases[-1].eos and len(g.tokens) <= p["max_tokens"]  # not when cut off
        # The stream's own timings: of the whole generation, or up to the canvas that reached a stop sequence.
        timings = {k: round(v, 3) for k, v in dataclasses.asdict(
            g.timings if g is not None else self.canvases[-1].timings).items()}
        canvases = [{"steps": c.steps, "stopped_early": c.stopped_early, "eos": c.eos} for c in self.canvases]
        self._send(delta, True)
        n_out = len(text.tokens)
        self.metrics.observe([c.steps for c in self.canvases], timings["step_ms"], len(job.ids), n_out,
                             timings["tokens_per_s"])
        message = None if self.chat is None else self._message()
        finish = "tool_calls" if message and "tool_calls" in message else "stop" if eos or text.hit_stop else "length"
        done = {
            "text": text.text,
            "message": message,
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": n_out,
                      "total_tokens": len(job.ids) + n_out},
            "diffusion": {"seed": p["seed"], "canvases": canvases, "timings": timings,
                          "elapsed_ms": round(1e3 * (time.perf_counter() - self.t0), 3)},
        }
        job.put("done", done)
        return done

    def _message(self) -> dict:
        """A chat request's answer: content, thinking and tool calls as parsed from the text."""
        parsed = self.parsed
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


MAX_BATCH = 4  # requests denoised together by default (bench/batch_throughput.py, docs/performance.md)


class Engine:
    """The model, a bounded FIFO of jobs and the one thread that runs them: up to max_batch at a time, their
    canvases denoised in one decoder pass per step (continuous batching: jobs join and leave between steps)."""

    def __init__(self, model: "Model", queue_size: int, metrics: Metrics, max_batch: int = MAX_BATCH):
        self.model = model
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._runs: dict[int, _Run] = {}  # id(job) -> its run, for the jobs in the batch (worker thread only)
        self._running = 0  # len(_runs), for the other threads
        self._closing = False
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, str] = {}

    # -- queue --

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="diffgemma-generate", daemon=True)
            self._thread.start()

    def depth(self) -> tuple[int, int]:
        with self._cv:
            return len(self._waiting), self._running

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._closing:
                raise _shutting_down()
            # A job that a free place in the batch will take at the next step does not count as waiting.
            if len(self._waiting) - (self.max_batch - self._running) >= self.queue_size:
                raise ApiError(503, f"the request queue is full ({self.queue_size} waiting); retry later",
                               type="server_error", code="queue_full")
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: _Job) -> None:
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
            job.put("error", _shutting_down())

    def close(self, timeout: float = 30.0) -> None:
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

    def _join(self, batch: Batch, job: _Job) -> None:
        run = _Run(job, self.model, self.metrics, self._piece)
        try:
            request, _, ids = generation.request(self.model, run.prompt, **run.stream_kw)
        except Exception as e:
            run.error(e)
            self._done(job)
            return
        batch.add(job, request, ids)
        self._runs[id(job)] = run

    def _step(self, batch: Batch) -> None:
        """One decoder pass over every job's canvas; each job's events go to its _Run as they come."""
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

    def _leave(self, batch: Batch, job: _Job, g: Generation | None, answered: bool = False) -> None:
        batch.cancel(job)
        run = self._runs.pop(id(job))
        if not answered:
            run.finish(g, shutting_down=self._closing)
        self._done(job)

    def _done(self, job: _Job) -> None:
        job.finished = True
        with self._cv:
            self._running = len(self._runs)


# ---- the HTTP app ------------------------------------------------------------------------------------------


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _frame(obj: Any) -> str:
    # An SSE comment line: ignored by every SSE parser (openai's, EventSource), read by the web view.
    return f": diffusion {json.dumps(obj)}\n\n"


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (works for streamed responses too)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.count_request(path if path in ENDPOINTS else "other", status[0])


class _Api:
    """What the endpoints do, FastAPI aside: parse a request, tokenize its prompt, queue it on the engine, and
    answer it (one JSON body, or SSE chunks per committed canvas)."""

    def __init__(self, model: "Model", engine: Engine, *, name: str, queue_size: int, reasoning_format: str):
        self.model, self.hp, self.engine = model, model.hparams, engine
        self.name, self.queue_size, self.reasoning_format = name, queue_size, reasoning_format
        self.created = int(model.path.stat().st_mtime) if model.path.exists() else int(time.time())

    # -- the two generating endpoints --

    async def chat_completions(self, request: Any) -> Any:
        from . import multimodal

        body = await _json_body(request)
        _unsupported(body, _CHAT_UNSUPPORTED)
        messages = _messages(body)
        params = _parse_common(body, self.model.sampler_defaults)
        budget = _opt_int(body, "image_budget", lo=1)
        params["image_budget"] = 280 if budget is None else budget
        params["chat"] = opts = _chat_options(body, self.reasoning_format)
        ids = await self.tokenize(messages, None, "messages", params["image_budget"], tools=opts["tools"] or None,
                                  template_kwargs=opts["template_kwargs"], prefix=opts["prefix"])
        params["messages"] = messages if multimodal.has_images(messages) else None
        return await self.run(request, "chat", ids, await self.with_template(body, ids, params))

    async def completions(self, request: Any) -> Any:
        body = await _json_body(request)
        _unsupported(body, _COMPLETION_UNSUPPORTED)
        params = _parse_common(body, self.model.sampler_defaults)
        suffix = body.get("suffix")
        if suffix:  # OpenAI's insertion: the text between prompt and suffix, as a hole of up to max_tokens
            if not isinstance(suffix, str) or body.get("template") is not None:
                raise _bad("'suffix' must be a string, and cannot be combined with 'template'", "suffix")
            body = {**body, "template": [{"hole": params["max_tokens"], "empty": True}, suffix]}
            params["infill"] = True
        if body.get("template") is not None and body.get("prompt") in (None, ""):
            ids = self.model.tokenize("")  # a template alone: its canvases follow BOS
        else:  # raw text: no chat template on the completions endpoint
            ids = await self.tokenize(_completion_prompt(body), False, "prompt")
        return await self.run(request, "completion", ids, await self.with_template(body, ids, params))

    async def tokenize(self, prompt: Any, chat: bool | None, param: str, image_budget: int = 280,
                       **kw: Any) -> list[int]:
        """The prompt's token ids, checked against the context before queueing: errors are 400s, no waiting."""
        from . import multimodal
        from .chat import build_prompt, prompt_ids

        model, L = self.model, self.hp.canvas_length
        try:
            if multimodal.has_images(prompt):  # the images are decoded and encoded here: bad ones are a 400
                if any(kw.values()):
                    raise Error("tools, tool_choice and chat_template_kwargs cannot be combined with images yet")
                ids, _ = await asyncio.to_thread(build_prompt, model, prompt, chat, image_budget)
            else:
                ids = await asyncio.to_thread(prompt_ids, model, prompt, chat, **kw)
        except Error as e:
            raise _bad(str(e), param) from e
        if len(ids) + L > model.n_ctx:
            raise _bad(f"the prompt is {len(ids)} tokens; with a canvas of {L} that exceeds the context of "
                       f"{model.n_ctx} tokens (start the server with a larger --n-ctx, up to "
                       f"{self.hp.context_length})", param, "context_length_exceeded")
        return ids

    async def with_template(self, body: dict, ids: list[int], params: dict) -> dict:
        """params with the request's template laid out for the model (None without one): errors are 400s."""
        from .template import lay_out

        template = _template_field(body)
        if template is not None:
            if params["stop"]:
                raise _bad("'stop' does not apply to a template (the template decides where the text ends)", "stop")
            try:
                template = await asyncio.to_thread(lay_out, self.model, template)
            except Error as e:
                raise _bad(str(e), "template") from e
            L = self.hp.canvas_length
            if len(ids) + template.n_canvas * L > self.model.n_ctx:
                raise _bad(f"the prompt ({len(ids)} tokens) and the template ({template.n_canvas} canvases of "
                           f"{L}) exceed the context of {self.model.n_ctx} tokens", "template",
                           "context_length_exceeded")
        return {**params, "template": template}

    # -- answers --

    async def run(self, request: Any, kind: str, ids: list[int], params: dict) -> Any:
        """Queue the job and answer: an SSE stream, or one JSON body once it is done."""
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

        job = _Job(asyncio.get_running_loop(), ids, params)
        self.engine.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        t = int(time.time())
        if params["stream"]:
            return StreamingResponse(self.sse(request, job, kind, rid, t), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                ev, payload = await _next_event(request, job)
                if ev == "error":
                    raise payload
                if ev == "done":
                    break
        except _Cancelled:
            return PlainTextResponse("client disconnected", status_code=499)
        finally:
            self.engine.cancel(job)
        return JSONResponse(self.answer(kind, rid, t, payload))

    def answer(self, kind: str, rid: str, t: int, done: dict) -> dict:
        """The body of a non-streamed answer, from the engine's `done` payload."""
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": done["message"], "logprobs": None,
                                      "finish_reason": done["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": t, "model": self.name, "choices": [choice],
                "usage": done["usage"], "diffusion": done["diffusion"]}

    def chunk(self, kind: str, rid: str, t: int, delta: Any, finish: str | None, role: bool = False) -> dict:
        """One SSE chunk: a chat delta {"content" | "reasoning_content" | "tool_calls": ...}, or completion text."""
        if kind == "chat":
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            d.update(delta or {})
            choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": t, "model": self.name,
                    "choices": [choice]}
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": t, "model": self.name, "choices": [choice]}

    async def sse(self, request: Any, job: _Job, kind: str, rid: str, t: int) -> AsyncIterator[str]:
        """The job's events as SSE: a chunk per text delta, frames as comment lines, then usage and [DONE]."""
        try:
            if kind == "chat":
                yield _sse(self.chunk(kind, rid, t, None, None, role=True))
            while True:
                ev, payload = await _next_event(request, job)
                if ev == "frame":
                    yield _frame(payload)
                elif ev == "delta":
                    yield _sse(self.chunk(kind, rid, t, payload, None))
                elif ev == "error":
                    yield _sse(payload.body())  # the openai client raises APIError on an "error" event
                    return
                elif ev == "done":
                    for line in self.closing(kind, rid, t, job.p, payload):
                        yield line
                    return
        finally:  # normal end, client gone (task cancelled) or shutdown: make sure the generation stops
            self.engine.cancel(job)

    def closing(self, kind: str, rid: str, t: int, p: dict, done: dict) -> list[str]:
        """The last SSE lines: the finish chunk, the usage (if asked for), the frames' summary, [DONE]."""
        lines = [_sse(self.chunk(kind, rid, t, None, done["finish_reason"]))]
        if p["include_usage"]:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            lines.append(_sse({"id": rid, "object": obj, "created": t, "model": self.name, "choices": [],
                               "usage": done["usage"]}))
        if p["frames"]:
            lines.append(_frame({"type": "done", **done["diffusion"], "usage": done["usage"],
                                 "finish_reason": done["finish_reason"]}))
        return [*lines, "data: [DONE]\n\n"]

    # -- the others --

    def models(self) -> dict:
        hp = self.hp
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "diffgemma",
                                            "meta": {"canvas_length": hp.canvas_length, "n_ctx": self.model.n_ctx,
                                                     "steps": self.model.sampler_defaults.steps,
                                                     "n_vocab": hp.n_vocab}}]}

    def health(self) -> dict:
        hp, model = self.hp, self.model
        waiting, running = self.engine.depth()
        return {"status": "ok", "model": self.name, "canvas_length": hp.canvas_length, "n_ctx": model.n_ctx,
                **dataclasses.asdict(model.sampler_defaults),
                "devices": list(getattr(model, "devices", [])),
                "vision": getattr(model, "vision", None) is not None, "max_batch": self.engine.max_batch,
                "queue": {"waiting": waiting, "running": running, "capacity": self.queue_size}}

    def prometheus(self) -> str:
        waiting, running = self.engine.depth()
        return self.engine.metrics.render(waiting, running, self.queue_size)


async def _json_body(request: Any) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


async def _next_event(request: Any, job: _Job) -> tuple[str, Any]:
    """The job's next event; _Cancelled once its client has gone."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Cancelled from None


def create_app(model: "Model", *, queue_size: int = 16, model_name: str | None = None,
               reasoning_format: str = "auto", max_batch: int = MAX_BATCH) -> Any:
    """The FastAPI application serving `model` (see docs/server.md). The model must stay open while it runs.
    reasoning_format: "auto" puts thinking in `reasoning_content`, "none" leaves it in the content (a request's
    own reasoning_format wins). max_batch: requests whose canvases share each decoder step; queue_size: how
    many more may wait (503 beyond)."""
    try:
        from fastapi import FastAPI
    except ImportError as e:
        raise Error(_NEEDS_FASTAPI) from e
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
        raise Error(f"queue_size must be an int >= 0, got {queue_size!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise Error(f"max_batch must be an int >= 1, got {max_batch!r}")
    if reasoning_format not in REASONING_FORMATS:
        raise Error(f"reasoning_format must be one of {list(REASONING_FORMATS)}, got {reasoning_format!r}")
    metrics = Metrics()
    engine = Engine(model, queue_size, metrics, max_batch)
    api = _Api(model, engine, name=model_name or model.path.stem, queue_size=queue_size,
               reasoning_format=reasoning_format)
    app = FastAPI(title="diffgemma", version=_version(), lifespan=_lifespan(engine), docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    _add_routes(app, api)
    return app


def _lifespan(engine: Engine) -> Callable[[Any], Any]:
    """The app's lifespan: the engine's thread runs while the app does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            # By now uvicorn has drained (or given up on) open connections: cancel what is left, stop the thread.
            await asyncio.to_thread(engine.close)

    return lifespan


def _add_error_handlers(app: Any) -> None:
    """Every error as an OpenAI-style body: ours (ApiError) and Starlette's (404, 405)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Any:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> Any:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)


def _add_routes(app: Any, api: _Api) -> None:
    """The endpoints (ENDPOINTS), each handed to _Api; FastAPI reads the handlers' `Request` annotations."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, PlainTextResponse

    page = importlib.resources.files("diffgemma").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await api.chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await api.completions(request)

    @app.get("/v1/models")
    async def models() -> Any:
        return api.models()

    @app.get("/health")
    async def health() -> Any:
        return api.health()

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(api.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index() -> Any:
        return HTMLResponse(page)


def _version() -> str:
    from . import __version__

    return __version__


# ---- running it --------------------------------------------------------------------------------------------


class Server:
    """uvicorn serving `create_app(model)`: `run()` blocks (Ctrl-C / SIGTERM stop it gracefully); `start()` runs
    it on a background thread (tests, notebooks) until `stop()`. port=0 picks a free port (see `.port`)."""

    def __init__(self, model: "Model", *, host: str = "127.0.0.1", port: int = 8080, queue_size: int = 16,
                 model_name: str | None = None, log_level: str = "info", shutdown_timeout: float = 10.0,
                 reasoning_format: str = "auto", max_batch: int = MAX_BATCH):
        try:
            import uvicorn
        except ImportError as e:
            raise Error(_NEEDS_FASTAPI) from e
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise Error(f"port must be in 0..65535, got {port!r}")
        self.app = create_app(model, queue_size=queue_size, model_name=model_name, reasoning_format=reasoning_format,
                              max_batch=max_batch)
        self.host = host
        self._sock = self._bind(host, port)
        self.port = self._sock.getsockname()[1]
        engine = self.app.state.engine

        class _Uvicorn(uvicorn.Server):
            async def shutdown(self, sockets: Any = None) -> None:
                # uvicorn waits for open responses; after shutdown_timeout we end them ourselves (a 503 error
                # event / response), so they close cleanly instead of being cancelled mid-write.
                asyncio.get_running_loop().call_later(shutdown_timeout, engine.abort)
                await super().shutdown(sockets)

        # uvicorn's own limit is only a backstop, for responses that ignore the abort.
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=shutdown_timeout + 5)
        self._uv = _Uvicorn(config)
        self._thread: threading.Thread | None = None

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        # Bound here, not by uvicorn: port 0 then tells us the real port, and "address in use" is our Error.
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)  # connections made before uvicorn's loop runs wait in the backlog, not refused
        except OSError as e:
            raise Error(f"cannot listen on {host}:{port}: {e}") from e
        sock.set_inheritable(True)
        return sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM, then finish open responses (up to shutdown_timeout) and return."""
        main = threading.current_thread() is threading.main_thread()
        # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler for that moment
        # turns a graceful stop into a normal return instead of a KeyboardInterrupt or a kill.
        saved = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            self._uv.run(sockets=[self._sock])
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
            self._sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]},
                                        name="diffgemma-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise Error("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":  # `python -m diffgemma.server ...`: the serve subcommand on its own
    from diffgemma.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
