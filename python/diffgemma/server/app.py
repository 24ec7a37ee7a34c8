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
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .. import multimodal, structured
from ..chat import build_prompt, prompt_ids
from ..errors import Error
from ..model import Model
from ..schema_compile import JsonSchema
from ..template import lay_out
from .auth import RequireApiKey, api_keys
from .defaults import MAX_BATCH, REASONING_FORMATS
from .engine import Engine, Event, Job
from .errors import ApiError, bad_request, validation_error
from .layouts import forced_call
from .llama_api import (
    ApplyTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LlamaApi,
    Props,
    Slot,
    TokenizeRequest,
    TokenizeResponse,
)
from .metrics import CONTENT_TYPE, Metrics
from .protocol import ChatRequest, CompletionRequest, Params
from .responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    FramesDone,
    Health,
    ModelCard,
    ModelList,
    ModelMeta,
    QueueState,
    TextChoice,
    TextCompletion,
    TextLogprobs,
)

POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
# The paths served (requests are counted by path in /metrics). llama-server answers some without /v1 too.
CHAT, COMPLETIONS, MODELS, HEALTH = ("/v1/chat/completions", "/chat/completions"), ("/v1/completions",), \
    ("/v1/models", "/models"), ("/health", "/v1/health")
LLAMA = ("/tokenize", "/detokenize", "/apply-template", "/props", "/slots")
ENDPOINTS = ("/", "/metrics", *CHAT, *COMPLETIONS, *MODELS, *HEALTH, *LLAMA)


class _Cancelled(Exception):
    """Raised in a request's handler when its client went away."""


def create_app(model: Model, *, queue_size: int = 16, model_name: str | None = None, reasoning_format: str = "auto",
               max_batch: int = MAX_BATCH, api_key: str | Iterable[str] | None = None) -> FastAPI:
    """The FastAPI application serving `model` (see docs/server.md). The model must stay open while it runs.
    reasoning_format: "auto" puts thinking in `reasoning_content`, "none" leaves it in the content (a request's
    own reasoning_format wins). max_batch: requests whose canvases share each decoder step; queue_size: how
    many more may wait (503 beyond). api_key: one key, several separated by commas, or a list: requests must
    carry one (server.auth); none: no check."""
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
        raise Error(f"queue_size must be an int >= 0, got {queue_size!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise Error(f"max_batch must be an int >= 1, got {max_batch!r}")
    if reasoning_format not in REASONING_FORMATS:
        raise Error(f"reasoning_format must be one of {list(REASONING_FORMATS)}, got {reasoning_format!r}")
    metrics = Metrics()
    engine = Engine(model, queue_size, metrics, max_batch)
    metrics.track_queue(engine.depth, queue_size)
    name = model_name or model.path.stem
    api = _Api(model, engine, name=name, queue_size=queue_size, reasoning_format=reasoning_format)
    llama = LlamaApi(model, engine, name=name, reasoning_format=reasoning_format,
                     build_info=f"diffgemma {_version()}")
    app = FastAPI(title="diffgemma", version=_version(), lifespan=_lifespan(engine), docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(_JsonBodies)
    keys = api_keys(api_key)
    if keys:
        app.add_middleware(RequireApiKey, keys=keys)  # inside _CountRequests: refused requests are counted too
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    _add_routes(app, api, llama)
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


def _add_routes(app: FastAPI, api: "_Api", llama: LlamaApi) -> None:
    """The endpoints (ENDPOINTS), each handed to _Api or LlamaApi."""
    page = importlib.resources.files(__package__).joinpath("web/index.html").read_text(encoding="utf-8")

    def route(method: str, paths: tuple[str, ...]) -> Callable[[Callable], Callable]:
        def register(handler: Callable) -> Callable:  # one handler under each of its paths
            for path in paths:
                app.add_api_route(path, handler, methods=[method])
            return handler

        return register

    def post(paths: tuple[str, ...]) -> Callable[[Callable], Callable]:
        return route("POST", paths)

    def get(paths: tuple[str, ...]) -> Callable[[Callable], Callable]:
        return route("GET", paths)

    @post(CHAT)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await api.chat_completions(body, request)

    @post(COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completions(body, request)

    @get(MODELS)
    async def models() -> ModelList:
        return api.models()

    @get(HEALTH)
    async def health() -> Health:
        return api.health()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await llama.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await llama.detokenize(body)

    @app.post("/apply-template")
    async def apply_template(body: ChatRequest) -> ApplyTemplateResponse:
        return await llama.apply_template(body)

    @app.get("/props")
    async def props() -> Props:
        return llama.props()

    @app.get("/slots")
    async def slots(fail_on_no_slot: bool = False) -> list[Slot]:
        return llama.slots(fail_on_no_slot)

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


async def _next_event(request: Request, events: asyncio.Queue) -> Event:
    """The request's next event (kind, payload, choice index); _Cancelled once its client has gone."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Cancelled from None


def _usage(dones: list[dict]) -> dict:
    """A request's usage: the prompt once, the completion tokens of every choice (as OpenAI counts n > 1)."""
    usage = dones[0]["usage"]
    if len(dones) == 1:
        return usage
    completion = sum(d["usage"]["completion_tokens"] for d in dones)
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}


def _diffusion(dones: list[dict]) -> dict:
    """The `diffusion` extension: choice 0's, and with n > 1 every choice's under `choices`."""
    first = dones[0]["diffusion"]
    if len(dones) == 1:
        return first
    return {**first, "elapsed_ms": max(d["diffusion"]["elapsed_ms"] for d in dones),
            "choices": [d["diffusion"] for d in dones]}


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
        source = req.template if req.template is not None else req.response_format
        if source is None:  # a forced call's arguments are laid out with the function's parameters schema
            chat, source = await asyncio.to_thread(forced_call, self.model, chat, req.tool_choice,
                                                   params.logprobs is not None)
        ids = await self.tokenize(messages, None, "messages", params.image_budget, tools=chat.tools or None,
                                  template_kwargs=chat.template_kwargs, prefix=chat.prefix)
        template = await self.lay_out(source, ids)
        params = dataclasses.replace(params, template=template, chat=chat,
                                     messages=messages if multimodal.has_images(messages) else None)
        return await self.run(request, "chat", ids, params, req.n or 1)

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        params, template = req.completion_params(self.model.sampler_defaults)
        if req.prompt:
            ids = await self.tokenize(req.prompt, False, "prompt")  # raw text: no chat template here
        else:  # a template alone: its canvases follow BOS
            ids = self.model.tokenize("")
        params = dataclasses.replace(params, template=await self.lay_out(template, ids))
        return await self.run(request, "completion", ids, params, req.n or 1)

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
            raise bad_request(f"the prompt is {len(ids)} tokens; with a canvas of {L} that exceeds "
                              f"{self.context()}", param, "context_length_exceeded")
        return ids

    def context(self) -> str:
        """The limit a context_length_exceeded error names: this server's n_ctx, and whether it can grow."""
        n_ctx, trained = self.model.n_ctx, self.hp.context_length
        if n_ctx < trained:
            return (f"this server's context of {n_ctx} tokens (-c/--n-ctx; the model's own is {trained}: restart "
                    "the server with a larger -c to send longer prompts)")
        return f"this server's context of {n_ctx} tokens (the model's own context length)"

    async def lay_out(self, template: Any, ids: list[int]) -> Any:
        """The request's template or response_format schema laid out for the model (None without one): errors are
        400s."""
        if template is None:
            return None
        schema = isinstance(template, JsonSchema)
        param = "response_format" if schema else "template"
        try:
            layout = await asyncio.to_thread(structured.lay_out if schema else lay_out, self.model, template)
        except Error as e:
            raise bad_request(str(e), param) from e
        L = self.hp.canvas_length
        if len(ids) + layout.n_canvas * L > self.model.n_ctx:
            raise bad_request(f"the prompt ({len(ids)} tokens) and the {param} ({layout.n_canvas} canvases of "
                              f"{L}) exceed {self.context()}", param, "context_length_exceeded")
        return layout

    # -- answers --

    async def run(self, request: Request, kind: str, ids: list[int], params: Params, n: int = 1) -> Response:
        """Queue the request's jobs (one per choice; choice i has seed + i) and answer: an SSE stream, or one JSON
        body once every choice is done."""
        if n > self.engine.max_batch:  # its choices could never run together: refused rather than serialised
            raise bad_request(f"'n'={n} is more than this server generates at once (--max-batch "
                              f"{self.engine.max_batch})", "n")
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, ids, dataclasses.replace(params, seed=params.seed + i), events=events, index=i,
                    request_id=rid) for i in range(n)]
        self.engine.submit(*jobs)
        t = int(time.time())
        if params.stream:
            return StreamingResponse(self.sse(request, jobs, kind, rid, t), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        dones: dict[int, dict] = {}
        try:
            while len(dones) < n:
                ev, payload, i = await _next_event(request, events)
                if ev == "error":
                    raise payload
                if ev == "done":
                    dones[i] = payload
        except _Cancelled:
            return PlainTextResponse("client disconnected", status_code=499)
        finally:
            for job in jobs:
                self.engine.cancel(job)
        return JSONResponse(self.answer(kind, rid, t, [dones[i] for i in range(n)]).model_dump(mode="json"))

    def logprobs(self, kind: str, entries: list | None, start: int = 0) -> ChatLogprobs | TextLogprobs | None:
        """TokenLogprobs in the endpoint's shape (None stays None); `start`: the completion's characters before."""
        if entries is None:
            return None
        if kind == "chat":
            return ChatLogprobs.of(entries, self.piece)
        return TextLogprobs.of(entries, self.piece, self.shown, start)

    def answer(self, kind: str, rid: str, t: int, dones: list[dict]) -> ChatCompletion | TextCompletion:
        """A non-streamed answer, from the engine's `done` payload of each choice."""
        usage, diffusion = _usage(dones), _diffusion(dones)
        if kind == "chat":
            return ChatCompletion(id=rid, created=t, model=self.name, usage=usage, diffusion=diffusion,
                                  choices=[ChatChoice(index=i, message=d["message"], finish_reason=d["finish_reason"],
                                                      logprobs=self.logprobs(kind, d["logprobs"]))
                                           for i, d in enumerate(dones)])
        return TextCompletion(id=rid, created=t, model=self.name, usage=usage, diffusion=diffusion,
                              choices=[TextChoice(index=i, text=d["text"], finish_reason=d["finish_reason"],
                                                  logprobs=self.logprobs(kind, d["logprobs"]))
                                       for i, d in enumerate(dones)])

    def chunk(self, kind: str, rid: str, t: int, delta: Any, finish: str | None, role: bool = False,
              index: int = 0, logprobs: Any = None) -> ChatCompletionChunk | TextCompletion:
        """One SSE chunk of choice `index`: a chat delta {"content" | "reasoning_content" | "tool_calls": ...}, or
        completion text, with its tokens' logprobs (already in the endpoint's shape) if any."""
        if kind == "chat":
            d = ChatDelta(**({"role": "assistant", "content": ""} if role else {}), **(delta or {}))
            return ChatCompletionChunk(id=rid, created=t, model=self.name,
                                       choices=[ChatChunkChoice(index=index, delta=d, finish_reason=finish,
                                                                logprobs=logprobs)])
        return TextCompletion(id=rid, created=t, model=self.name,
                              choices=[TextChoice(index=index, text=delta or "", finish_reason=finish,
                                                  logprobs=logprobs)])

    async def sse(self, request: Request, jobs: list[Job], kind: str, rid: str, t: int) -> AsyncIterator[str]:
        """The jobs' events as SSE: a chunk per text delta (with its choice's index), frames as comment lines, a
        finish chunk as each choice ends, then usage and [DONE]."""
        p, n = jobs[0].p, len(jobs)
        dones: dict[int, dict] = {}
        try:
            if kind == "chat":
                for i in range(n):
                    yield _sse(self.chunk(kind, rid, t, None, None, role=True, index=i))
            chars = [0] * n  # of each choice's completion text sent: where its next chunk's text_offset starts
            while len(dones) < n:
                ev, payload, i = await _next_event(request, jobs[0].events)
                if ev == "frame":
                    yield _comment(payload.model_copy(update={"index": i}) if n > 1 else payload)
                elif ev == "delta":
                    delta, entries = payload
                    logprobs = self.logprobs(kind, entries, chars[i])
                    chars[i] += sum(len(self.shown(e.token)) for e in entries or [])
                    yield _sse(self.chunk(kind, rid, t, delta, None, index=i, logprobs=logprobs))
                elif ev == "error":
                    yield _sse(payload.body())  # the openai client raises APIError on an "error" event
                    return
                elif ev == "done":
                    dones[i] = payload
                    yield _sse(self.chunk(kind, rid, t, None, payload["finish_reason"], index=i))
            if p.include_usage:
                yield _sse((ChatCompletionChunk if kind == "chat" else TextCompletion)(
                    id=rid, created=t, model=self.name, choices=[], usage=_usage([dones[i] for i in range(n)])))
            if p.frames:  # the summary of each choice's run
                for i in range(n):
                    d = dones[i]
                    yield _comment(FramesDone(**d["diffusion"], usage=d["usage"], finish_reason=d["finish_reason"],
                                              index=i if n > 1 else None))
            yield "data: [DONE]\n\n"
        finally:  # normal end, client gone (task cancelled) or shutdown: make sure the generations stop
            for job in jobs:
                self.engine.cancel(job)

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
