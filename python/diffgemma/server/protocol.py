"""The wire protocol: pydantic models of the OpenAI requests, with our extensions (the answers: responses.py).

FastAPI validates each request body into `ChatRequest` or `CompletionRequest`; what fails comes back as a
RequestValidationError, which `errors.validation_error` turns into the OpenAI error body naming the field.
Unknown fields are accepted and ignored; options whose meaning we cannot honour are refused (code
`unsupported_parameter`), among them the sampling knobs with no counterpart in the diffusion sampler (top_p,
penalties, ...) unless set to their neutral value. `temperature` scales the temperature schedule (0: greedy).
The diffusion settings are `dg.SamplerSettings`' fields, read from the extra fields by `sampler_settings` with
the library's own rules.

What a request asks the engine for, once validated, is a `Params`. No `from __future__ import annotations`:
pydantic reads the annotations at runtime.
"""

import base64
import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    model_validator,
)

from .. import chat_format
from ..errors import Error
from ..generation import MAX_TOP_LOGPROBS, RANDOM_SEED, resolve_seed
from ..images import DEFAULT_BUDGET
from ..sampler import SamplerSettings, setting_problem, temperature_problem
from ..template import Hole, Layout
from .defaults import REASONING_FORMATS
from .errors import bad_request, invalid
from .layouts import check as compiled_schema

DEFAULT_MAX_TOKENS = 256  # when a request names no max_tokens (the library's default)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
PROMPT_RULE = "'prompt' must be a non-empty string or token-id array (one prompt per request)"


# ---- field checks --------------------------------------------------------------------------------------------


def _supported_if(ok: Callable[[Any], bool]) -> Any:
    """A field whose other values we cannot honour (ignoring them would give wrong results): a 400 naming it."""

    def check(v: Any, info: ValidationInfo) -> Any:
        if not ok(v):
            raise invalid(f"'{info.field_name}'={v!r} is not supported by this server", type="unsupported_parameter")
        return v

    return Annotated[Any, AfterValidator(check)]


def _stop_list(v: Any) -> Any:
    if isinstance(v, str):
        return [v]
    if v is not None and not isinstance(v, list):
        raise invalid("'stop' must be a non-empty string or a list of at most 4 non-empty strings")
    return v


def _temperature(v: Any) -> Any:
    if why := temperature_problem(v):  # the library's own rule
        raise invalid(why)
    return v


def _template(t: Any) -> str | list[str | Hole] | None:
    """The `template` extension field as the library takes it: a template string, or a list of parts (strings
    and {"hole": N, "allowed": class names | [texts or token ids], "empty": bool})."""
    if t is None or isinstance(t, str):
        return t
    if not isinstance(t, list):
        raise invalid("'template' must be a string or an array of parts")
    parts: list[str | Hole] = []
    for i, part in enumerate(t):
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, dict) or set(part) - {"hole", "allowed", "empty"} or "hole" not in part:
            raise invalid(f"template[{i}] must be a string or {{\"hole\": N, \"allowed\": ..., \"empty\": bool}}")
        n, allowed, empty = part["hole"], part.get("allowed"), part.get("empty", False)
        if isinstance(n, bool) or not isinstance(n, int):
            raise invalid(f"template[{i}].hole must be an integer (the hole's size in tokens)")
        if not (allowed is None or isinstance(allowed, str) or (isinstance(allowed, list) and all(
                isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in allowed))):
            raise invalid(f"template[{i}].allowed must be class names or an array of texts and token ids")
        if not isinstance(empty, bool):
            raise invalid(f"template[{i}].empty must be a boolean")
        parts.append(Hole(n, allowed, empty, f"hole (template[{i}])"))
    return parts


def _one_prompt(p: Any) -> Any:
    """A completion prompt: a string or token ids (a batch of exactly one is taken as that one). Empty or absent
    is left for the request's own check (a template needs no prompt)."""
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    if p is None or isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise invalid(PROMPT_RULE)


PositiveInt = Annotated[StrictInt, Field(ge=1)]
TopK = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]  # alternatives per token (logprobs)
_FUNCTIONS = _supported_if(lambda v: not v)  # the legacy form of tools
_ECHO = _supported_if(lambda v: not v)
_BEST_OF = _supported_if(lambda v: v in (None, 1))


def _neutral(*values: Any) -> Any:
    """A sampling knob the diffusion sampler has no counterpart for: only its neutral values (or null) pass; any
    other is a 400 naming it, never silently ignored (docs/server.md, Sampling fields)."""

    def check(v: Any, info: ValidationInfo) -> Any:
        if v is not None and (isinstance(v, bool) or not any(v == n for n in values)):
            allowed = " or ".join(repr(n) for n in values)
            raise invalid(f"'{info.field_name}'={v!r}: the diffusion sampler has nothing that does what "
                          f"{info.field_name} does; only {allowed} (or null) is accepted. Its own settings are "
                          "temperature, steps, t_min, t_max and entropy_bound (docs/server.md)",
                          type="unsupported_parameter")
        return v

    return Annotated[Any, AfterValidator(check)]


def sampler_settings(given: dict, defaults: SamplerSettings) -> SamplerSettings:
    """The diffusion settings of a request: `defaults` (the model's) overridden by the fields of `given` named as
    SamplerSettings' fields, validated by the library's own rules (errors are 400s naming the field)."""
    chosen: dict[str, Any] = {}
    for f in dataclasses.fields(defaults):
        v = given.get(f.name)
        # Absent (or null) = the model's default; an explicit null switches the adaptive stop off where it can.
        if f.name not in given or (v is None and not f.metadata["off"]):
            continue
        why = setting_problem(f.name, v)
        if why:
            raise bad_request(why, f.name)
        chosen[f.name] = v
    try:
        return defaults.replace(**chosen)
    except Error as e:
        raise bad_request(str(e)) from e


# ---- what a request asks for ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """A chat request's tools and thinking, ready for the template and the output parser."""

    tools: list[dict]  # the tools rendered into the prompt (none when tool_choice is "none")
    template_kwargs: dict[str, Any]
    prefix: str  # text after the generation prompt that forces a call (tool_choice "required" or a name)
    max_calls: int | None  # 1 when parallel_tool_calls is false
    reasoning: bool  # thinking goes to `reasoning_content` (reasoning_format "auto")


@dataclasses.dataclass(frozen=True)
class Params:
    """What a validated request asks the engine for, in the library's terms."""

    max_tokens: int
    seed: int  # chosen by the server when the request names none, so every answer can report it
    sampler: SamplerSettings
    temperature: float | None = None  # the schedule's scale (None: as is; 0: greedy)
    logprobs: int | None = None  # each token's log-probability with this many alternatives (None: off)
    stop: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    frames: bool = False  # denoising frames as SSE comments (streams only)
    template: Layout | None = None  # laid out for the model (a response_format schema's too)
    json: bool = False  # response_format json_schema: the answer is the laid-out JSON text, as it is
    infill: bool = False  # the answer is the template's one hole (completions with a suffix)
    chat: ChatOptions | None = None  # a chat request: the output is parsed into content, reasoning, calls
    messages: list[dict] | None = None  # a prompt with images goes to the engine as messages
    image_budget: int = DEFAULT_BUDGET


# ---- requests ------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """`stream_options`: only include_usage has a meaning here."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    """The fields both generating endpoints take. Unknown ones (temperature, top_p, penalties, user, model, ...)
    are kept as extras and ignored, except the diffusion settings (SamplerSettings' fields)."""

    model_config = ConfigDict(extra="allow")

    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    diffusion_frames: StrictBool | None = False
    seed: Annotated[StrictInt, Field(ge=RANDOM_SEED)] | None = None  # -1: random, as in llama.cpp
    stop: Annotated[list[Annotated[StrictStr, Field(min_length=1)]] | None, BeforeValidator(_stop_list),
                    Field(max_length=4)] = None
    template: Annotated[Any, AfterValidator(_template)] = None
    response_format: Annotated[Any, AfterValidator(compiled_schema)] = None  # compiled: a JsonSchema or None
    n: PositiveInt | None = None  # choices: n jobs, with seeds seed, seed + 1, ... (at most the server's max batch)
    temperature: Annotated[Any, AfterValidator(_temperature)] = None  # the schedule's scale; 0: greedy
    # OpenAI's, llama-server's and vLLM's other sampling knobs (the table in docs/server.md)
    top_p: _neutral(1) = None
    top_k: _neutral(0, -1) = None
    min_p: _neutral(0) = None
    typical_p: _neutral(1) = None
    logit_bias: _neutral({}) = None
    frequency_penalty: _neutral(0) = None
    presence_penalty: _neutral(0) = None
    repeat_penalty: _neutral(1) = None
    repetition_penalty: _neutral(1) = None
    mirostat: _neutral(0) = None
    dynatemp_range: _neutral(0) = None
    xtc_probability: _neutral(0) = None
    dry_multiplier: _neutral(0) = None

    def _templated(self) -> bool:
        """A template (or a schema) decides where the text ends, and its fixed tokens are not sampled."""
        return self.template is not None or self.response_format is not None

    def _top_logprobs(self) -> int | None:
        """The alternatives per token the request's logprobs ask for; None: no logprobs."""
        return None

    @model_validator(mode="after")
    def _stop_without_template(self) -> "GenerationRequest":
        if self.template is not None and self.response_format is not None:
            raise invalid("give a 'template' or a 'response_format' schema, not both", param="response_format")
        if self.stop and self._templated():
            raise invalid("'stop' does not apply to a template or a response_format schema (the layout decides "
                          "where the text ends)", param="stop")
        if self._top_logprobs() is not None and self._templated():
            raise invalid("'logprobs' are not available with a template, a response_format schema or a suffix "
                          "(fixed tokens are not sampled)", param="logprobs", type="unsupported_parameter")
        return self

    def params(self, sampler_defaults: SamplerSettings) -> Params:
        """What the request asks for (the template is laid out later, against the model)."""
        return Params(
            max_tokens=self.max_tokens or self.max_completion_tokens or DEFAULT_MAX_TOKENS,
            seed=resolve_seed(self.seed, greedy=self.temperature == 0),
            sampler=sampler_settings(self.model_extra or {}, sampler_defaults),
            stop=self.stop or [],
            stream=bool(self.stream),
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            frames=bool(self.diffusion_frames and self.stream),  # frames only travel in a stream
            temperature=self.temperature,
            logprobs=self._top_logprobs(),
            json=self.response_format is not None,
        )


class ImageURL(BaseModel):
    """An image_url part's image: data: URLs only (nothing is fetched), decoded here so a bad one is a 400."""

    model_config = ConfigDict(extra="allow")  # "detail" is accepted and ignored
    url: StrictStr
    _data: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _decode(self) -> "ImageURL":
        if not self.url.startswith("data:"):
            raise invalid("only data: URLs are accepted for images (this server does not fetch remote URLs); send "
                           "the picture inline as data:image/...;base64,...", type="remote_image_url")
        head, _, payload = self.url.partition(",")
        if not head.endswith(";base64"):
            raise invalid("the image data: URL must be base64-encoded")
        try:
            self._data = base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise invalid(f"the image data: URL is not valid base64: {e}") from e
        return self


class ContentPart(BaseModel):
    """One part of a message's content: {"type": "text", "text"} or {"type": "image_url", "image_url"}."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: Annotated[ImageURL | None, BeforeValidator(lambda v: {"url": v} if isinstance(v, str) else v)] = None

    @model_validator(mode="after")
    def _has_its_value(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise invalid("a text part needs its text")
        if self.type == "image_url" and self.image_url is None:
            raise invalid("an image_url part needs an image_url with a url")
        return self

    def to_library(self) -> dict:
        """The library's part: text as is, an image as {"type": "image", "image": bytes}."""
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": "image", "image": self.image_url._data}  # type: ignore[union-attr]


def _content(v: Any) -> Any:
    if isinstance(v, str):
        return [{"type": "text", "text": v}]
    if v is not None and not isinstance(v, list):
        raise invalid("content must be a string or an array of text and image_url parts")
    return v


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) else None  # kept when a string; other shapes are ignored


class Message(BaseModel):
    """A chat message: role, content (a string or parts), and an assistant's tool calls or a tool's answer."""

    model_config = ConfigDict(extra="allow")
    role: Literal[tuple(ROLES)]  # type: ignore[valid-type]
    content: Annotated[list[ContentPart] | None, BeforeValidator(_content)] = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: Annotated[str | None, BeforeValidator(_str_or_none)] = None  # between one exchange's calls
    tool_call_id: Annotated[str | None, BeforeValidator(_str_or_none)] = None
    name: Annotated[str | None, BeforeValidator(_str_or_none)] = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> "Message":
        if self.content is None and not self._calls():
            raise invalid("content must be a string or an array of parts (null only in an assistant message with "
                           "tool_calls)")
        return self

    def _calls(self) -> list[dict] | None:
        return self.tool_calls if self.role == "assistant" and self.tool_calls else None

    def to_library(self) -> dict[str, Any]:
        """The message as the library's chat takes it (images as bytes, text parts joined)."""
        role = ROLES[self.role]
        parts = [p.to_library() for p in self.content or []]
        if any(p["type"] == "image" for p in parts):
            return {"role": role, "content": parts}
        msg: dict[str, Any] = {"role": role, "content": "".join(p["text"] for p in parts)}
        if self._calls():
            msg["tool_calls"] = self.tool_calls
            if self.reasoning_content is not None:
                msg["reasoning_content"] = self.reasoning_content
        if role == "tool" and self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if role == "tool" and self.name is not None:
            msg["name"] = self.name
        return msg


def _tools(v: Any) -> list[dict]:
    try:  # the library's own rules (chat_format), as for Model.chat
        return chat_format.check_tools(v)
    except Error as e:
        raise invalid(str(e)) from e


def _tool_choice(v: Any, info: ValidationInfo) -> str:
    try:  # when `tools` itself failed, its error is the one reported
        return chat_format.check_tool_choice(v, info.data.get("tools") or [])
    except Error as e:
        raise invalid(str(e)) from e


def _template_kwargs(v: dict | None) -> dict | None:
    reserved = {"messages", "tools", "bos_token", "eos_token", "add_generation_prompt"}
    if v and reserved & set(v):
        raise invalid(f"'chat_template_kwargs' must be an object without {sorted(reserved)}")
    return v


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    tools: Annotated[Any, AfterValidator(_tools)] = None
    tool_choice: Annotated[Any, AfterValidator(_tool_choice)] = Field(None, validate_default=True)
    parallel_tool_calls: StrictBool | None = None
    reasoning_format: Literal[REASONING_FORMATS] | None = None  # type: ignore[valid-type]
    chat_template_kwargs: Annotated[dict[str, Any] | None, AfterValidator(_template_kwargs)] = None
    image_budget: PositiveInt | None = None  # soft tokens per image
    functions: _FUNCTIONS = None
    logprobs: StrictBool | None = None
    top_logprobs: TopK | None = None

    @model_validator(mode="after")
    def _schema_without_tools(self) -> "ChatRequest":
        if self.response_format is not None and self.tools and self.tool_choice != "none":
            raise invalid("a 'response_format' schema and tools in one request are not supported (the answer is "
                          "laid out as the JSON; send tool_choice 'none')", param="response_format")
        return self

    def _top_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def library_messages(self) -> list[dict[str, Any]]:
        """The messages as the library's chat takes them."""
        return [m.to_library() for m in self.messages]

    def chat_params(self, sampler_defaults: SamplerSettings, default_reasoning: str) -> Params:
        """params() with the chat options; `default_reasoning` is the server's reasoning_format."""
        tools = self.tools or []
        offered = tools if self.tool_choice != "none" else []
        chat = ChatOptions(tools=offered, template_kwargs=self.chat_template_kwargs or {},
                           prefix=chat_format.forced_prefix(self.tool_choice) if offered else "",
                           max_calls=1 if self.parallel_tool_calls is False else None,
                           reasoning=(self.reasoning_format or default_reasoning) == "auto")
        budget = DEFAULT_BUDGET if self.image_budget is None else self.image_budget
        return dataclasses.replace(self.params(sampler_defaults), chat=chat, image_budget=budget)


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: one prompt (text or token ids), or none with a template; `suffix` is an infill."""

    prompt: Annotated[str | list[StrictInt] | None, BeforeValidator(_one_prompt)] = None
    suffix: StrictStr | None = None  # OpenAI's insertion: the text between prompt and suffix
    echo: _ECHO = None
    best_of: _BEST_OF = None
    logprobs: TopK | None = None  # the legacy API's: an int, the alternatives per token

    def _top_logprobs(self) -> int | None:
        return self.logprobs

    def _templated(self) -> bool:
        return super()._templated() or bool(self.suffix)

    @model_validator(mode="after")
    def _prompt_or_template(self) -> "CompletionRequest":
        if self.suffix and super()._templated():
            raise invalid("'suffix' must be a string, and cannot be combined with 'template' or 'response_format'",
                          param="suffix")
        if not self.prompt and not self._templated():
            raise invalid(PROMPT_RULE, param="prompt")
        return self

    def completion_params(self, sampler_defaults: SamplerSettings) -> tuple[Params, Any]:
        """params(), and the template to lay out: the request's (or its response_format schema), or the infill's
        hole and suffix."""
        params = self.params(sampler_defaults)
        if self.suffix:  # a hole of up to max_tokens (filler allowed, so it may be shorter), then the suffix
            hole = Hole(params.max_tokens, None, True, "hole (template[0])")
            return dataclasses.replace(params, infill=True), [hole, self.suffix]
        return params, self.template if self.template is not None else self.response_format
