"""The FastAPI application: routes, SSE answers, error handlers and the engine's lifespan (docs/server.md).

FastAPI validates each request into its protocol model; the handlers tokenize the prompt and lay out a template
(errors are 400s, before queueing), queue a Job on the Engine and answer: one JSON body, or SSE chunks per
committed canvas. No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
"""

import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.resources
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .. import multimodal
from ..chat import build_prompt, prompt_ids
from ..errors import Error
from ..model import Model
from ..template import lay_out
from .defaults import MAX_BATCH, REASONING_FORMATS
from .engine import Engine, Job
from .errors import ApiError, bad_request, validation_error
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    CompletionRequest,
    FramesDone,
    Health,
    ModelCard,
    ModelList,
    ModelMeta,
    Params,
    QueueState,
    TextChoice,
    TextCompletion,
    TextLogprobs,
)

POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


class _Cancelled(Exception):
    """Raised in a request's handler when its client went away."""


def create_app(model: Model, *, queue_size: int = 16, model_name: str | None = None, reasoning_format: str = "auto",
               max_batch: int = MAX_BATCH) -> FastAPI:
    """The FastAPI application serving `model` (see docs/server.md). The model must stay open while it runs.
    reasoning_format: "auto" puts thinking in `reasoning_content`, "none" leaves it in the content (a request's
    own reasoning_format wins). max_batch: requests whose canvases share each decoder step; queue_size: how
    many more may wait (503 beyond)."""
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
        raise Error(f"queue_size must be an int >= 0, got {queue_size!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise Error(f"max_batch must be an int >= 1, got {max_batch!r}")
    if reasoning_format not in REASONING_FORMATS:
        raise Error(f"reasoning_format must be one of {list(REASONING_FORMATS)}, got {reasoning_format!r}")
    metrics = Metrics()
    engine = Engine(model, queue_size, metrics, max_batch)
    metrics.track_queue(engine.depth, queue_size)
    api = _Api(model, engine, name=model_name or model.path.stem, queue_size=queue_size,
               reasoning_format=reasoning_format)
    app = FastAPI(title="diffgemma", version=_version(), lifespan=_lifespan(engine), docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(_JsonBodies)
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    _add_routes(app, api)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("diffgemma")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _lifespan(engine: Engine) -> Callable[[FastAPI], Any]:
    """The app's lifespan: the engine's thread runs while the app does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            # By now uvicorn has drained (or given up on) open connections: cancel what is left, stop the thread.
            await asyncio.to_thread(engine.close)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style body: ours (ApiError), the requests' validation, Starlette's (404, 405)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> Response:
        return JSONResponse(validation_error(list(e.errors())).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)


def _add_routes(app: FastAPI, api: "_Api") -> None:
    """The endpoints (ENDPOINTS), each handed to _Api."""
    page = importlib.resources.files(__package__).joinpath("web/index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await api.chat_completions(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completions(body, request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return api.models()

    @app.get("/health")
    async def health() -> Health:
        return api.health()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(api.engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def index() -> Response:
        return HTMLResponse(page)


# ---- middleware ------------------------------------------------------------------------------------------------


class _JsonBodies:
    """ASGI middleware: a POST body is JSON whatever its Content-Type says (`curl -d` sends form-urlencoded),
    where FastAPI reads only bodies labelled application/json."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


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


# ---- what the endpoints do ------------------------------------------------------------------------------------


def _sse(obj: Any) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def _comment(obj: Any) -> str:
    # An SSE comment line: ignored by every SSE parser (openai's, EventSource), read by the web view.
    return f": diffusion {obj.model_dump_json()}\n\n"


async def _next_event(request: Request, job: Job) -> tuple[str, Any]:
    """The job's next event; _Cancelled once its client has gone."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Cancelled from None


class _Api:
    """What the endpoints do, FastAPI aside: tokenize a validated request's prompt, queue it on the engine, and
    answer it (one JSON body, or SSE chunks per committed canvas)."""

    def __init__(self, model: Model, engine: Engine, *, name: str, queue_size: int, reasoning_format: str):
        self.model, self.hp, self.engine = model, model.hparams, engine
        self.name, self.queue_size, self.reasoning_format = name, queue_size, reasoning_format
        self.created = int(model.path.stat().st_mtime) if model.path.exists() else int(time.time())
        # logprobs' token texts: a token's bytes, and its text in the answer (a control token shows none)
        self.piece = functools.lru_cache(maxsize=1 << 16)(model.tokenizer.token_bytes)
        self.shown = functools.lru_cache(maxsize=1 << 16)(lambda t: model.detokenize([t]))

    # -- the two generating endpoints --

    async def chat_completions(self, req: ChatRequest, request: Request) -> Response:
        messages = req.library_messages()
        params = req.chat_params(self.model.sampler_defaults, self.reasoning_format)
        chat = params.chat
        assert chat is not None  # chat_params always sets it
        ids = await self.tokenize(messages, None, "messages", params.image_budget, tools=chat.tools or None,
                                  template_kwargs=chat.template_kwargs, prefix=chat.prefix)
        template = await self.lay_out(req.template, ids)
        params = dataclasses.replace(params, template=template,
                                     messages=messages if multimodal.has_images(messages) else None)
        return await self.run(request, "chat", ids, params)

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        params, template = req.completion_params(self.model.sampler_defaults)
        if req.prompt:
            ids = await self.tokenize(req.prompt, False, "prompt")  # raw text: no chat template here
        else:  # a template alone: its canvases follow BOS
            ids = self.model.tokenize("")
        params = dataclasses.replace(params, template=await self.lay_out(template, ids))
        return await self.run(request, "completion", ids, params)

    async def tokenize(self, prompt: Any, chat: bool | None, param: str, image_budget: int = 0,
                       **kw: Any) -> list[int]:
        """The prompt's token ids, checked against the context before queueing: errors are 400s, no waiting."""
        model, L = self.model, self.hp.canvas_length
        try:
            if multimodal.has_images(prompt):  # the images are decoded and encoded here: bad ones are a 400
                if any(kw.values()):
                    raise Error("tools, tool_choice and chat_template_kwargs cannot be combined with images yet")
                ids, _ = await asyncio.to_thread(build_prompt, model, prompt, chat, image_budget)
            else:
                ids = await asyncio.to_thread(prompt_ids, model, prompt, chat, **kw)
        except Error as e:
            raise bad_request(str(e), param) from e
        if len(ids) + L > model.n_ctx:
            raise bad_request(f"the prompt is {len(ids)} tokens; with a canvas of {L} that exceeds the context of "
                              f"{model.n_ctx} tokens (start the server with a larger --n-ctx, up to "
                              f"{self.hp.context_length})", param, "context_length_exceeded")
        return ids

    async def lay_out(self, template: Any, ids: list[int]) -> Any:
        """The request's template laid out for the model (None without one): errors are 400s."""
        if template is None:
            return None
        try:
            layout = await asyncio.to_thread(lay_out, self.model, template)
        except Error as e:
            raise bad_request(str(e), "template") from e
        L = self.hp.canvas_length
        if len(ids) + layout.n_canvas * L > self.model.n_ctx:
            raise bad_request(f"the prompt ({len(ids)} tokens) and the template ({layout.n_canvas} canvases of "
                              f"{L}) exceed the context of {self.model.n_ctx} tokens", "template",
                              "context_length_exceeded")
        return layout

    # -- answers --

    async def run(self, request: Request, kind: str, ids: list[int], params: Params) -> Response:
        """Queue the job and answer: an SSE stream, or one JSON body once it is done."""
        job = Job(asyncio.get_running_loop(), ids, params)
        self.engine.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        t = int(time.time())
        if params.stream:
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
        return JSONResponse(self.answer(kind, rid, t, payload).model_dump(mode="json"))

    def logprobs(self, kind: str, entries: list | None, start: int = 0) -> ChatLogprobs | TextLogprobs | None:
        """TokenLogprobs in the endpoint's shape (None stays None); `start`: the completion's characters before."""
        if entries is None:
            return None
        if kind == "chat":
            return ChatLogprobs.of(entries, self.piece)
        return TextLogprobs.of(entries, self.piece, self.shown, start)

    def answer(self, kind: str, rid: str, t: int, done: dict) -> ChatCompletion | TextCompletion:
        """A non-streamed answer, from the engine's `done` payload."""
        logprobs = self.logprobs(kind, done["logprobs"])
        if kind == "chat":
            return ChatCompletion(id=rid, created=t, model=self.name, usage=done["usage"],
                                  diffusion=done["diffusion"],
                                  choices=[ChatChoice(message=done["message"], finish_reason=done["finish_reason"],
                                                      logprobs=logprobs)])
        return TextCompletion(id=rid, created=t, model=self.name, usage=done["usage"], diffusion=done["diffusion"],
                              choices=[TextChoice(text=done["text"], finish_reason=done["finish_reason"],
                                                  logprobs=logprobs)])

    def chunk(self, kind: str, rid: str, t: int, delta: Any, finish: str | None, role: bool = False,
              logprobs: Any = None) -> ChatCompletionChunk | TextCompletion:
        """One SSE chunk: a chat delta {"content" | "reasoning_content" | "tool_calls": ...}, or completion text,
        with its tokens' logprobs (already in the endpoint's shape) if any."""
        if kind == "chat":
            d = ChatDelta(**({"role": "assistant", "content": ""} if role else {}), **(delta or {}))
            return ChatCompletionChunk(id=rid, created=t, model=self.name,
                                       choices=[ChatChunkChoice(delta=d, finish_reason=finish, logprobs=logprobs)])
        return TextCompletion(id=rid, created=t, model=self.name,
                              choices=[TextChoice(text=delta or "", finish_reason=finish, logprobs=logprobs)])

    async def sse(self, request: Request, job: Job, kind: str, rid: str, t: int) -> AsyncIterator[str]:
        """The job's events as SSE: a chunk per text delta, frames as comment lines, then usage and [DONE]."""
        try:
            if kind == "chat":
                yield _sse(self.chunk(kind, rid, t, None, None, role=True))
            chars = 0  # of completion text sent: where the next chunk's text_offset starts
            while True:
                ev, payload = await _next_event(request, job)
                if ev == "frame":
                    yield _comment(payload)
                elif ev == "delta":
                    delta, entries = payload
                    logprobs = self.logprobs(kind, entries, chars)
                    chars += sum(len(self.shown(e.token)) for e in entries or [])
                    yield _sse(self.chunk(kind, rid, t, delta, None, logprobs=logprobs))
                elif ev == "error":
                    yield _sse(payload.body())  # the openai client raises APIError on an "error" event
                    return
                elif ev == "done":
                    for line in self.closing(kind, rid, t, job.p, payload):
                        yield line
                    return
        finally:  # normal end, client gone (task cancelled) or shutdown: make sure the generation stops
            self.engine.cancel(job)

    def closing(self, kind: str, rid: str, t: int, p: Params, done: dict) -> list[str]:
        """The last SSE lines: the finish chunk, the usage (if asked for), the frames' summary, [DONE]."""
        lines = [_sse(self.chunk(kind, rid, t, None, done["finish_reason"]))]
        if p.include_usage:
            usage = (ChatCompletionChunk if kind == "chat" else TextCompletion)(
                id=rid, created=t, model=self.name, choices=[], usage=done["usage"])
            lines.append(_sse(usage))
        if p.frames:
            lines.append(_comment(FramesDone(**done["diffusion"], usage=done["usage"],
                                             finish_reason=done["finish_reason"])))
        return [*lines, "data: [DONE]\n\n"]

    # -- the others --

    def models(self) -> ModelList:
        """GET /v1/models: the one model."""
        meta = ModelMeta(canvas_length=self.hp.canvas_length, n_ctx=self.model.n_ctx,
                         steps=self.model.sampler_defaults.steps, n_vocab=self.hp.n_vocab)
        return ModelList(data=[ModelCard(id=self.name, created=self.created, meta=meta)])

    def health(self) -> Health:
        """GET /health: the model, its default settings and the queue."""
        model = self.model
        waiting, running = self.engine.depth()
        return Health(model=self.name, canvas_length=self.hp.canvas_length, n_ctx=model.n_ctx,
                      **dataclasses.asdict(model.sampler_defaults), devices=list(getattr(model, "devices", [])),
                      vision=getattr(model, "vision", None) is not None, max_batch=self.engine.max_batch,
                      queue=QueueState(waiting=waiting, running=running, capacity=self.queue_size))
