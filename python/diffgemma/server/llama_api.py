"""llama-server's own endpoints, in its request and response shapes: /tokenize, /detokenize, /apply-template,
/props and /slots (docs/server.md, "llama-server's endpoints").

Where llama-server's fields have a meaning here they carry it (`n_ctx`, `total_slots`, a slot's `params` and
`next_token`); a slot also says where its request is in the diffusion (`canvas`, `step`, `steps`). No `from
__future__ import annotations`: pydantic reads the annotations at runtime.
"""

import asyncio
import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from .. import multimodal
from ..chat import prompt_text
from ..errors import Error
from ..model import Model
from .engine import Engine, Run
from .errors import ApiError, bad_request
from .layouts import forced_call
from .protocol import DEFAULT_MAX_TOKENS, ChatRequest, Params

# ---- requests and responses ----------------------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    """POST /tokenize."""

    model_config = ConfigDict(extra="allow")
    content: StrictStr
    add_special: StrictBool = False  # BOS first
    parse_special: StrictBool = True  # control tokens written as text (<start_of_turn>, ...) are recognised
    with_pieces: StrictBool = False


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]  # the piece's text, or its bytes where they are not whole UTF-8 characters


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")
    tokens: list[StrictInt] = []


class DetokenizeResponse(BaseModel):
    content: str


class ApplyTemplateResponse(BaseModel):
    prompt: str


class NextToken(BaseModel):
    has_next_token: bool
    n_remain: int  # tokens still to generate (max_tokens less n_decoded)
    n_decoded: int  # tokens committed so far


class Slot(BaseModel):
    """One place in the batch (llama-server's slot), with its request, or the defaults when idle; `canvas`,
    `step`, `steps` (the last denoising step, null before the first), `index` (the choice) and `request_id`
    are ours."""

    model_config = ConfigDict(extra="allow")
    id: int
    id_task: int  # -1 when idle
    n_ctx: int
    speculative: bool = False
    is_processing: bool
    params: dict[str, Any]
    next_token: NextToken
    request_id: str | None = None
    index: int | None = None
    prompt_tokens: int | None = None
    canvas: int | None = None
    step: int | None = None
    steps: int | None = None


class Props(BaseModel):
    """GET /props."""

    default_generation_settings: Slot
    total_slots: int  # --max-batch
    model_path: str
    model_alias: str
    chat_template: str  # the file's ("" without one: the built-in Gemma 4 format is used)
    modalities: dict[str, bool]
    build_info: str
    is_sleeping: bool = False
    canvas_length: int


# ---- what they answer ----------------------------------------------------------------------------------------


class LlamaApi:
    """The llama-server endpoints over the model and the engine."""

    def __init__(self, model: Model, engine: Engine, *, name: str, reasoning_format: str, build_info: str):
        self.model, self.engine, self.name = model, engine, name
        self.reasoning_format, self.build_info = reasoning_format, build_info

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        tok = self.model.tokenizer
        ids = await asyncio.to_thread(tok.tokenize, req.content, add_special=req.add_special,
                                      parse_special=req.parse_special)
        if not req.with_pieces:
            return TokenizeResponse(tokens=ids)
        return TokenizeResponse(tokens=[TokenPiece(id=t, piece=_piece(tok.token_bytes(t))) for t in ids])

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        try:  # control tokens as their text, as llama-server writes them
            text = await asyncio.to_thread(self.model.detokenize, req.tokens, special=True)
        except Error as e:
            raise bad_request(str(e), "tokens") from e
        return DetokenizeResponse(content=text)

    async def apply_template(self, req: ChatRequest) -> ApplyTemplateResponse:
        """The prompt text /v1/chat/completions would give the model for these messages (tools, tool_choice and
        chat_template_kwargs included)."""
        messages = req.library_messages()
        if multimodal.has_images(messages):
            raise bad_request("/apply-template takes text messages (images become tokens, not text)", "messages")
        params = req.chat_params(self.model.sampler_defaults, self.reasoning_format)
        chat = params.chat
        assert chat is not None  # chat_params always sets it
        if req.template is None and req.response_format is None:  # a forced call starts as the chat's does
            chat, _ = await asyncio.to_thread(forced_call, self.model, chat, req.tool_choice,
                                              params.logprobs is not None)
        try:
            text = await asyncio.to_thread(prompt_text, self.model, messages, tools=chat.tools or None,
                                           template_kwargs=chat.template_kwargs, prefix=chat.prefix)
        except Error as e:
            raise bad_request(str(e), "messages") from e
        return ApplyTemplateResponse(prompt=text)

    def slots(self, fail_on_no_slot: bool = False) -> list[Slot]:
        runs = self.engine.slots()
        if fail_on_no_slot and None not in runs:
            raise ApiError(503, "no slot available", type="unavailable_error", code="no_slot_available")
        return [self._slot(i, run) for i, run in enumerate(runs)]

    def props(self) -> Props:
        model = self.model
        return Props(default_generation_settings=self._slot(0, None), total_slots=self.engine.max_batch,
                     model_path=str(model.path), model_alias=self.name,
                     chat_template=model.metadata.get("tokenizer.chat_template") or "",
                     modalities={"vision": getattr(model, "vision", None) is not None, "audio": False},
                     build_info=self.build_info, canvas_length=model.hparams.canvas_length)

    def _slot(self, i: int, run: Run | None) -> Slot:
        n_ctx = self.model.n_ctx
        if run is None:
            idle = NextToken(has_next_token=False, n_remain=-1, n_decoded=0)
            return Slot(id=i, id_task=-1, n_ctx=n_ctx, is_processing=False, params=self._params(None),
                        next_token=idle)
        job, decoded = run.job, len(run.committed)
        canvas, step, steps = run.position or (None, None, None)
        return Slot(id=i, id_task=job.task, n_ctx=n_ctx, is_processing=True, params=self._params(job.p),
                    next_token=NextToken(has_next_token=True, n_remain=max(job.p.max_tokens - decoded, 0),
                                         n_decoded=decoded),
                    request_id=job.request_id, index=job.index, prompt_tokens=len(job.ids), canvas=canvas,
                    step=step, steps=steps)

    def _params(self, p: Params | None) -> dict[str, Any]:
        """A request's settings under llama-server's names where they have one (n_predict = max_tokens; seed -1:
        random), then the diffusion settings."""
        if p is None:  # an idle slot: what a request that names nothing gets
            return {"n_predict": DEFAULT_MAX_TOKENS, "max_tokens": DEFAULT_MAX_TOKENS, "seed": -1, "stream": False,
                    "stop": [], **dataclasses.asdict(self.model.sampler_defaults)}
        return {"n_predict": p.max_tokens, "max_tokens": p.max_tokens, "seed": p.seed, "stream": p.stream,
                "stop": p.stop, **dataclasses.asdict(p.sampler)}


def _piece(data: bytes) -> str | list[int]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a byte-fallback token: llama-server gives the bytes
        return list(data)
