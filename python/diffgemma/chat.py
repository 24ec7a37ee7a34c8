"""Prompts: the file's chat template (Gemma 4 turn format) rendered with jinja2, and prompt -> token ids (with
image spans, for messages with pictures); `chat()`: messages (and tools) in, the parsed assistant message out."""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Any

from . import chat_format, multimodal, tool_layout
from .errors import Error

ROLES = ("system", "user", "assistant", "tool")  # what the chat template renders; anything else is a typo
# Generation.finish_reason in OpenAI's terms ("tool_calls" when the answer calls tools): an EOS or a filled
# template is a natural stop, max_new_tokens or a full context a cut.
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise Error("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Error(f"bad chat message {m!r}: expected {{'role': str, 'content': str}}")
        if m["role"] not in ROLES:
            raise Error(f"unknown chat role {m['role']!r}: use one of {', '.join(ROLES)}")
        content = m.get("content")
        # an assistant message that only calls tools may have no content
        if not (isinstance(content, str) or (content is None and m.get("tool_calls"))):
            raise Error(f"bad chat message {m!r}: expected {{'role': str, 'content': str}}")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise Error(f"bad chat message {m!r}: tool_calls must be a list")
    return messages


def render(template: str | None, messages: list[dict[str, Any]], *, bos_token: str = "<bos>",
           eos_token: str = "<eos>", add_generation_prompt: bool = True, tools: list[dict] | None = None,
           **template_kwargs: Any) -> str:
    """Render a Hugging Face-style chat template (sandboxed jinja2) the way transformers' apply_chat_template
    does: `tools` (OpenAI function schemas) and extra keywords (e.g. enable_thinking) reach the template, tool-call
    arguments arrive as dicts. template=None renders the built-in Gemma 4 format."""
    messages = chat_format.prepare_messages(_check_messages(messages))
    if not template:
        return chat_format.render(messages, tools=tools, bos_token=bos_token,
                                  add_generation_prompt=add_generation_prompt,
                                  enable_thinking=template_kwargs.get("enable_thinking"))
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise Error("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(msg: str) -> None:
        raise Error(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(**template_kwargs, messages=messages, tools=tools or None,
                                                bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise Error(f"chat template failed to render: {e}") from e


def prompt_ids(model: Any, prompt: Any, chat: bool | None, *, tools: list[dict] | None = None,
               template_kwargs: dict[str, Any] | None = None, prefix: str = "") -> list[int]:
    """Token ids for a str, a list of chat messages, or a list of token ids. chat=None applies the file's
    template to str/messages when the file has one. tools/template_kwargs go to the template; `prefix` is text
    appended after the rendered prompt (the start of the model's answer)."""
    if isinstance(prompt, list | tuple) and prompt and all(isinstance(t, int) for t in prompt):
        ids = [int(t) for t in prompt]
        if min(ids) < 0 or max(ids) >= model.hparams.n_vocab:
            raise Error(f"prompt token ids must be in [0, {model.hparams.n_vocab})")
        return ids
    template = model.metadata.get("tokenizer.chat_template")
    if isinstance(prompt, str):
        if not prompt:
            raise Error("the prompt is empty")
        if chat is False or (chat is None and not template):
            return model.tokenize(prompt)
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple):
        if not prompt:
            raise Error("the prompt is empty")
        messages = list(prompt)
        if chat is False:
            raise Error("chat=False needs a str or token-id prompt, not messages")
    else:
        raise Error("prompt must be a str, a list of chat messages or a list of token ids, "
                    f"not {type(prompt).__name__}")
    tok = model.tokenizer
    ids = model.tokenize(prompt_text(model, messages, tools=tools, template_kwargs=template_kwargs, prefix=prefix),
                         add_special=False)
    if tok.bos >= 0 and (not ids or ids[0] != tok.bos):
        ids = [tok.bos] + ids
    return ids


def prompt_text(model: Any, messages: list[dict[str, Any]], *, tools: list[dict] | None = None,
                template_kwargs: dict[str, Any] | None = None, prefix: str = "") -> str:
    """The text that text-only chat `messages` render to, `prefix` appended: what prompt_ids tokenizes (the
    file's chat template, or the built-in Gemma 4 format; BOS as text where the template writes it)."""
    return _render_for(model, messages, tools=tools, **(template_kwargs or {})) + prefix


def _render_for(model: Any, messages: list[dict[str, Any]], **kw: Any) -> str:
    """`messages` rendered through the model's chat template (None: the built-in Gemma 4 format) with its own
    BOS and EOS texts; keywords as for render."""
    tok = model.tokenizer
    return render(model.metadata.get("tokenizer.chat_template"), messages,
                  bos_token=tok.token_text(tok.bos) if tok.bos >= 0 else "",
                  eos_token=tok.token_text(tok.eos) if tok.eos >= 0 else "", **kw)


def build_prompt(model: Any, prompt: Any, chat: bool | None, image_budget: int
                 ) -> tuple[list[int], list[multimodal.ImageSpan]]:
    """Token ids and image spans of a prompt (messages with image parts; anything else has no images, and
    goes through prompt_ids). Each image is run through the model's vision tower."""
    if not multimodal.has_images(prompt):
        return prompt_ids(model, multimodal.text_messages(prompt), chat), []
    if chat is False:
        raise Error("chat=False needs a str or token-id prompt, not messages")
    if model.vision is None:
        raise Error("the prompt has images but the model was loaded without a vision tower "
                    "(dg.load(model, mmproj=...))")
    messages, pictures = multimodal.flatten(list(prompt))
    embeddings = [model.image_embeddings(p, image_budget=image_budget) for p in pictures]
    # The template renders with a marker for each image; splice puts the image tokens in their place.
    return multimodal.splice(model, _render_for(model, messages), embeddings)


_marker_ids: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def output_text(model: Any, tokens: Any) -> str:
    """Generated tokens as text that keeps Gemma 4's structure markers (<|tool_call>, <|channel>, <|"|>, ...)
    for parse_chat_output; between markers the text is exactly what detokenize gives (control tokens dropped)."""
    tok = model.tokenizer
    keep = _marker_ids.get(tok)
    if keep is None:
        keep = _marker_ids[tok] = frozenset(t for t in tok.control_ids
                                            if tok.token_text(t) in chat_format.OUTPUT_MARKERS)
    out: list[str] = []
    run: list[int] = []
    for t in (int(t) for t in tokens):
        if t in keep:
            out += [tok.detokenize(run), tok.token_text(t)]
            run = []
        else:
            run.append(t)
    out.append(tok.detokenize(run))
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """The assistant's message, parsed: `content`, `reasoning` (the thinking channel), `tool_calls`, and the
    Generation it came from. `to_message()` is the dict to append to `messages` for the next turn."""

    content: str
    reasoning: str
    tool_calls: list[chat_format.ToolCall]
    generation: Any
    finish_reason: str  # "tool_calls", "stop" (end of turn) or "length"

    @property
    def json(self) -> Any:
        """With json_schema: the parsed value of the content (see Generation.json)."""
        return self.generation.json

    def to_message(self) -> dict[str, Any]:
        m: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.reasoning:
            m["reasoning_content"] = self.reasoning
        return m


def chat(model: Any, messages: list[dict[str, Any]], *, tools: list[dict] | None = None, tool_choice: Any = "auto",
         template_kwargs: dict[str, Any] | None = None, **generate_kw: Any) -> ChatReply:
    """One assistant turn: render `messages` (and `tools`, unless tool_choice='none') through the file's chat
    template (else the built-in Gemma 4 format), generate, and parse the reply (see Model.chat)."""
    tools = chat_format.check_tools(tools)
    choice = chat_format.check_tool_choice(tool_choice, tools)
    offered = tools if choice != "none" else []
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise Error(f"template_kwargs must be a dict, got {type(template_kwargs).__name__}")
    structured = generate_kw.get("json_schema") is not None
    if structured and offered:
        raise Error("json_schema and tools in one chat turn are not supported yet (pass tool_choice='none')")
    # A forced call's arguments are laid out with the function's parameters schema (a template of its own or
    # logprobs, which a layout's fixed tokens do not have, leave the call free).
    free = generate_kw.get("template") is not None or generate_kw.get("logprobs")
    call = tool_layout.forced_call(model, offered, "auto" if free else choice)
    prefix = call.prefix or (chat_format.forced_prefix(choice) if offered else "")
    if call.unenforced:
        warnings.warn(f"diffgemma: the forced tool call is written freely ({call.unenforced})", stacklevel=3)
    if call.layout is not None:
        generate_kw = {**generate_kw, "template": call.layout}
    if multimodal.has_images(messages):
        if offered or template_kwargs or prefix:
            raise Error("tools (or template_kwargs) and images in one chat turn are not supported yet")
        _check_messages([{**m, "content": ""} if isinstance(m, dict) else m for m in messages])  # roles
        g = model.generate(messages, chat=True, **generate_kw)  # the image path renders the parts
    else:
        ids = prompt_ids(model, _check_messages(multimodal.text_messages(messages)), True, tools=offered or None,
                         template_kwargs=template_kwargs, prefix=prefix)
        g = model.generate(ids, **generate_kw)
    if structured:  # the answer is the laid-out JSON text itself, complete by construction
        return ChatReply(g.text, "", [], g, "stop")
    text = g.text if call.layout is not None else output_text(model, g.tokens)  # a laid-out call: its text
    content, reasoning, calls = chat_format.parse_chat_output(prefix + text, tools=bool(offered))
    finish = "tool_calls" if calls else OPENAI_FINISH[g.finish_reason]
    return ChatReply(content.strip(), reasoning.strip(), calls, g, finish)
