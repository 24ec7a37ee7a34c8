"""The wire protocol's answers: pydantic models of the OpenAI response bodies and SSE chunks (with our `diffusion`
extension, canvas frames and log-probabilities), of /v1/models and of /health. Fields left None are not sent.
No `from __future__ import annotations`: pydantic reads the annotations at runtime.
"""

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

from ..generation import TokenLogprob


class _Out(BaseModel):
    """A response object: fields left None are not sent, except those in `nulls` (OpenAI sends them as null)."""

    nulls: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k in self.nulls}


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CanvasInfo(_Out):
    steps: int
    stopped_early: bool
    eos: bool


class Diffusion(_Out):
    """Our extension on a non-streamed answer: the seed, each canvas's steps, the library's timings."""

    seed: int
    canvases: list[CanvasInfo]
    timings: dict[str, float]
    elapsed_ms: float
    choices: "list[Diffusion] | None" = None  # n > 1: each choice's (the fields above are choice 0's)


class Frame(_Out):
    """One denoising step (`"diffusion_frames": true`), sent as the SSE comment line `: diffusion {...}`."""

    type: Literal["frame"] = "frame"
    canvas: int
    step: int
    steps: int
    temperature: float
    accepted: int
    mean_entropy: float
    text: str
    tokens: list[int]
    pieces: list[str]
    elapsed_ms: float
    fixed: list[int] | None = None  # a template's fixed positions (1) in this canvas
    index: int | None = None  # the choice it belongs to (requests with n > 1)


class FramesDone(Diffusion):
    """The frames' last comment: the run summed up."""

    type: Literal["done"] = "done"
    usage: Usage
    finish_reason: str
    index: int | None = None  # the choice it sums up (requests with n > 1)


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    """A chat choice's `logprobs` (OpenAI's shape): one entry per completion token, its top alternatives."""

    nulls = frozenset({"refusal"})
    content: list[ContentLogprob]
    refusal: None = None

    @classmethod
    def of(cls, entries: list[TokenLogprob], piece: Callable[[int], bytes]) -> "ChatLogprobs":
        def top(t: int, lp: float) -> dict[str, Any]:
            b = piece(t)
            return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

        return cls(content=[{**top(e.token, e.logprob), "top_logprobs": [top(t, lp) for t, lp in e.top]}
                            for e in entries])


class TextLogprobs(_Out):
    """A completion choice's `logprobs` (the legacy API's shape); text_offset: where each token starts in the
    answer, in characters (a character split over byte tokens counts once per token)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[TokenLogprob], piece: Callable[[int], bytes], shown: Callable[[int], str],
           start: int = 0) -> "TextLogprobs":
        """piece: a token's bytes; shown: its text in the answer (control tokens show none); start: the
        characters of the answer before these tokens (a stream's earlier chunks)."""
        text = [piece(e.token).decode("utf-8", "replace") for e in entries]
        offsets = [start + sum(len(shown(e.token)) for e in entries[:i]) for i in range(len(entries))]
        # The chosen token is listed too, as OpenAI does (it is the most likely one here).
        tops = [{piece(t).decode("utf-8", "replace"): lp for t, lp in [(e.token, e.logprob), *e.top]}
                for e in entries]
        return cls(tokens=text, token_logprobs=[e.logprob for e in entries], top_logprobs=tops,
                   text_offset=offsets)


class ChatMessage(_Out):
    nulls = frozenset({"content"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Out):
    nulls = frozenset({"logprobs"})
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    diffusion: Diffusion


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Out):
    nulls = frozenset({"logprobs", "finish_reason"})
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only in the last chunk, with no choices (stream_options.include_usage)


class TextChoice(_Out):
    nulls = frozenset({"logprobs", "finish_reason"})
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(_Out):
    """A /v1/completions answer, or one chunk of its stream (same object name, as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    diffusion: Diffusion | None = None


class ModelMeta(_Out):
    canvas_length: int
    n_ctx: int
    steps: int
    n_vocab: int


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffgemma"
    meta: ModelMeta


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class QueueState(BaseModel):
    waiting: int
    running: int
    capacity: int


class Health(BaseModel):
    """GET /health; the model's default diffusion settings (SamplerSettings' fields, null where switched off)
    ride along as extras."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok"] = "ok"
    model: str
    canvas_length: int
    n_ctx: int
    devices: list[str]
    vision: bool
    max_batch: int
    queue: QueueState
