"""Gemma 4's chat format for tools and thinking: rendering (the fallback for files without a chat template) and
parsing generated text back into content, reasoning and tool calls.

The format, as the Gemma 4 chat template writes it (facts read from the model's template and llama.cpp's
parser; the code is ours):
  system turn   <|turn>system\\n[<|think|>\\n]SYSTEM
                <|tool>declaration:NAME{description:..,parameters:{..}}<tool|>..<turn|>\\n
  a call        <|tool_call>call:NAME{key:VALUE,...}<tool_call|>   (values: <|"|>str<|"|>, numbers, true/false,
                null, {k:v}, [..]; keys unquoted)
  its result    <|tool_response>response:NAME{value:<|"|>TEXT<|"|>}<tool_response|>, in the same model turn,
                after which the model continues that turn with its answer
  thinking      <|channel>thought\\n...<channel|>
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import uuid
import warnings
from typing import Any

from .errors import Error

TURN, TURN_END = "<|turn>", "<turn|>"
TOOL, TOOL_END = "<|tool>", "<tool|>"
CALL, CALL_END = "<|tool_call>", "<tool_call|>"
RESPONSE, RESPONSE_END = "<|tool_response>", "<tool_response|>"
CHANNEL, CHANNEL_END = "<|channel>", "<channel|>"
QUOTE = '<|"|>'  # Gemma 4's string delimiter (no escapes inside)
THINK = "<|think|>"  # in the system turn: thinking on
THOUGHT = "thought"  # the channel the model thinks in

# render()'s plain turn format as a Hugging Face chat template (what files made by diffgemma.testing store).
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}" + TURN + "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}" + TURN_END + "\n{% endfor %}{% if add_generation_prompt %}" + TURN + "model\n"
    "{% endif %}"
)

# Control tokens that generated text keeps for parsing (detokenize drops control tokens otherwise).
OUTPUT_MARKERS = (CALL, CALL_END, CHANNEL, CHANNEL_END, QUOTE, RESPONSE)
# Every marker of the format: text that no string value of a laid-out tool call may hold.
MARKERS = (TURN, TURN_END, TOOL, TOOL_END, CALL, CALL_END, RESPONSE, RESPONSE_END, CHANNEL, CHANNEL_END, QUOTE, THINK)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


# ---- tools and tool_choice (OpenAI shapes) -----------------------------------------------------------------


def check_tools(tools: Any) -> list[dict]:
    """Validate OpenAI function tools [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise Error("tools must be a list of {'type': 'function', 'function': {...}} objects")
    names = set()
    for i, t in enumerate(tools):
        if not (isinstance(t, dict) and t.get("type", "function") == "function"
                and isinstance(t.get("function"), dict)):
            raise Error(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise Error(f"tools[{i}].function.name must match {_NAME.pattern}, got {name!r}")
        if name in names:
            raise Error(f"tools[{i}]: the function name {name!r} is used twice")
        names.add(name)
        if not isinstance(f.get("description", ""), str):
            raise Error(f"tools[{i}].function.description must be a string")
        params = f.get("parameters")
        if params is not None:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise Error(f"tools[{i}].function.parameters must be a JSON schema of type 'object'")
            _check_schema(params, f"tools[{i}].function.parameters")
    return tools


def _check_schema(s: Any, where: str) -> None:
    if not isinstance(s, dict):
        raise Error(f"{where} must be a JSON schema object")
    props = s.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise Error(f"{where}.properties must be an object")
        for k, v in props.items():
            _check_schema(v, f"{where}.properties.{k}")
    if "items" in s and s["items"] is not None:
        _check_schema(s["items"], f"{where}.items")
    req = s.get("required")
    if req is not None and (not isinstance(req, list) or not all(isinstance(r, str) for r in req)):
        raise Error(f"{where}.required must be a list of strings")
    ty = s.get("type")
    if ty is not None and not (isinstance(ty, str) or (isinstance(ty, list) and all(isinstance(x, str) for x in ty))):
        raise Error(f"{where}.type must be a string or a list of strings")


def check_tool_choice(tool_choice: Any, tools: list[dict]) -> str | None:
    """The tool_choice as 'auto' | 'none' | 'required' | a function name (from {"type": "function",
    "function": {"name": ...}})."""
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not tools:
            raise Error("tool_choice='required' needs tools")
        return tool_choice
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise Error(f"tool_choice names the function {name!r}, which is not among the tools")
        return name
    raise Error("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")


def forced_prefix(choice: str | None) -> str:
    """Text appended after the generation prompt so the model must call a tool ('required') or one named
    function (the model then only writes the arguments). The parser reads it as part of the output."""
    if choice in (None, "auto", "none"):
        return ""
    if choice == "required":
        return CALL + "call:"
    return f"{CALL}call:{choice}{{"


# ---- writing the format ------------------------------------------------------------------------------------


def _q(s: str) -> str:
    return QUOTE + s + QUOTE


def format_value(v: Any) -> str:
    """A JSON value in Gemma 4's argument syntax (dict keys unquoted and sorted, as the template writes them)."""
    if isinstance(v, str):
        return _q(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise Error(f"tool arguments must be finite numbers, got {v!r}")
        return json.dumps(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    raise Error(f"cannot write {type(v).__name__} as a tool argument")


def _schema(s: dict) -> str:
    """A parameter schema in the declaration syntax: description, enum, items, nullable, properties, required,
    type (upper-case) — in that order."""
    parts = []
    if s.get("description"):
        parts.append(f"description:{_q(str(s['description']))}")
    if s.get("enum"):
        parts.append(f"enum:{format_value(list(s['enum']))}")
    if isinstance(s.get("items"), dict) and s["items"]:
        parts.append(f"items:{_schema(s['items'])}")
    if s.get("nullable"):
        parts.append("nullable:true")
    if isinstance(s.get("properties"), dict):
        parts.append("properties:{" + ",".join(f"{k}:{_schema(v)}" for k, v in sorted(s["properties"].items())) + "}")
    if s.get("required"):
        parts.append("required:[" + ",".join(_q(r) for r in s["required"]) + "]")
    ty = s.get("type")
    if isinstance(ty, str):
        parts.append(f"type:{_q(ty.upper())}")
    elif isinstance(ty, list):
        parts.append(f"type:{format_value([t.upper() for t in ty])}")
    return "{" + ",".join(parts) + "}"


def declaration(tool: dict) -> str:
    """One tool as the system turn declares it (without the <|tool> ... <tool|> around it)."""
    f = tool["function"]
    out = f"declaration:{f['name']}{{description:{_q(f.get('description') or '')}"
    if f.get("parameters"):
        out += f",parameters:{_schema(f['parameters'])}"
    return out + "}"


def call_text(name: str, arguments: dict) -> str:
    """One tool call as the model writes it."""
    return f"{CALL}call:{name}{format_value(arguments)}{CALL_END}"


def response_text(name: str, content: Any) -> str:
    """One tool result: a mapping's keys become fields, anything else (a string) is the field `value`."""
    body = format_value(content) if isinstance(content, dict) else "{value:" + format_value(content) + "}"
    return f"{RESPONSE}response:{name}{body}{RESPONSE_END}"


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def strip_thinking(text: str) -> str:
    """An assistant message's content without its thinking channels (history does not carry old thoughts)."""
    return re.sub(re.escape(CHANNEL) + ".*?" + re.escape(CHANNEL_END), "", text, flags=re.S).strip()


def prepare_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: tool-call arguments as dicts (OpenAI sends JSON strings)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_prepare_call(c) for c in calls]}
        out.append(m)
    return out


def _prepare_call(c: Any) -> dict:
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict) or not isinstance(
            c["function"].get("name"), str):
        raise Error(f"bad tool call {c!r}: expected {{'id': ..., 'function': {{'name': ..., 'arguments': ...}}}}")
    args = c["function"].get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as e:
            raise Error(f"tool call {c['function']['name']!r}: arguments are not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise Error(f"tool call {c['function']['name']!r}: arguments must be a JSON object")
    return {**c, "type": c.get("type", "function"), "function": {**c["function"], "arguments": args}}


def render(messages: list[dict], *, tools: list[dict] | None = None, bos_token: str = "",
           add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
    """The built-in Gemma 4 format (used when a file has no chat template): plain messages render as the plain
    turn format; tools, calls, results and thinking as the Gemma 4 template lays them out. enable_thinking=True
    puts <|think|> in the system turn; False opens the answer with an empty thought channel (as Gemma 4's
    template does when thinking is off); None (base models) neither."""
    messages = prepare_messages(messages)
    out = [bos_token]
    rest = messages
    system = messages[0]["role"] in ("system", "developer")
    if system or tools or enable_thinking:
        out.append(TURN + "system\n" + (THINK + "\n" if enable_thinking else ""))
        if system:
            out.append(_text_of(messages[0]["content"]).strip())
            rest = messages[1:]
        out += [TOOL + declaration(t) + TOOL_END for t in tools or []]
        out.append(TURN_END + "\n")
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    open_turn = ""  # what the model turn we are in ended with: "call", "response" or "" (closed)
    prev_role = None  # the previous non-tool message's role
    i = 0
    while i < len(rest):
        m = rest[i]
        if m["role"] == "tool":
            raise Error(f"a 'tool' message (messages[{i + (len(messages) - len(rest))}]) must follow an assistant "
                        "message with tool_calls")
        role = "model" if m["role"] == "assistant" else m["role"]
        if not (role == "model" and prev_role == "assistant"):  # an answer after tool results continues the turn
            out.append(TURN + role + "\n")
        prev_role = m["role"]
        calls = m.get("tool_calls") or []
        thinking = m.get("reasoning_content") or m.get("reasoning")
        if calls and thinking and i > last_user:  # thoughts between calls of the current exchange are kept
            out.append(f"{CHANNEL}{THOUGHT}\n{thinking}\n{CHANNEL_END}")
        out += [call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        n_results = 0
        while calls and i + 1 < len(rest) and rest[i + 1]["role"] == "tool":
            i += 1
            out.append(response_text(_result_name(rest[i], calls, n_results), _text_of(rest[i].get("content"))))
            n_results += 1
        content = _text_of(m.get("content"))
        out.append(strip_thinking(content) if role == "model" else content.strip())
        if calls and not n_results:
            out.append(RESPONSE)  # the model's turn stops where the result will go
            open_turn = "call"
        elif n_results and not content:
            open_turn = "response"
        else:
            out.append(TURN_END + "\n")
            open_turn = ""
        i += 1
    if add_generation_prompt and not open_turn:
        out.append(TURN + "model\n" + (f"{CHANNEL}{THOUGHT}\n{CHANNEL_END}" if enable_thinking is False else ""))
    return "".join(out)


def _result_name(msg: dict, calls: list[dict], k: int) -> str:
    """The function a tool message answers: by tool_call_id, else its name, else the k-th call."""
    for c in calls:
        if c.get("id") is not None and c.get("id") == msg.get("tool_call_id"):
            return c["function"]["name"]
    if isinstance(msg.get("name"), str):
        return msg["name"]
    return calls[min(k, len(calls) - 1)]["function"]["name"]


# ---- reading the format ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments (a dict); `id` is fresh per parse."""

    name: str
    arguments: dict
    id: str = dataclasses.field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24], compare=False)

    def to_dict(self) -> dict:
        """The OpenAI shape: {"id", "type": "function", "function": {"name", "arguments": JSON string}}."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


class _Reader:
    """Recursive descent over Gemma 4's value syntax."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{what} at offset {self.i}: {self.s[self.i:self.i + 20]!r}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def eat(self, lit: str) -> bool:
        self.ws()
        if self.s.startswith(lit, self.i):
            self.i += len(lit)
            return True
        return False

    def value(self) -> Any:
        self.ws()
        s = self.s
        if s.startswith(QUOTE, self.i):
            end = s.find(QUOTE, self.i + len(QUOTE))
            if end < 0:
                raise self.fail("unterminated string")
            v, self.i = s[self.i + len(QUOTE):end], end + len(QUOTE)
            return v
        if s.startswith('"', self.i):  # a JSON string, as models sometimes write
            v, self.i = json.JSONDecoder().raw_decode(s, self.i)
            return v
        if self.eat("{"):
            d: dict[str, Any] = {}
            if self.eat("}"):
                return d
            while True:
                k = self.key()
                d[k] = self.value()
                if self.eat("}"):
                    return d
                if not self.eat(","):
                    raise self.fail("expected ',' or '}'")
        if self.eat("["):
            a: list[Any] = []
            if self.eat("]"):
                return a
            while True:
                a.append(self.value())
                if self.eat("]"):
                    return a
                if not self.eat(","):
                    raise self.fail("expected ',' or ']'")
        for lit, v in (("true", True), ("false", False), ("null", None)):
            if self.eat(lit):
                return v
        m = _NUMBER.match(s, self.i)
        if m:
            self.i = m.end()
            return json.loads(m.group(0))
        raise self.fail("expected a value")

    def key(self) -> str:
        self.ws()
        if self.s.startswith((QUOTE, '"'), self.i):
            k = self.value()
        else:
            end = self.s.find(":", self.i)
            k = self.s[self.i:end].strip() if end >= 0 else ""
            if not k or any(c in k for c in '{}[],"<>'):
                raise self.fail("expected a key")
            self.i = end
        if not isinstance(k, str) or not self.eat(":"):
            raise self.fail("expected ':' after a key")
        return k


def parse_value(text: str) -> Any:
    """One value in Gemma 4's argument syntax (what format_value writes) -> its JSON value; ValueError if
    malformed or followed by more text."""
    r = _Reader(text)
    v = r.value()
    r.ws()
    if r.i != len(text):
        raise r.fail("text after the value")
    return v


def parse_call(body: str) -> ToolCall:
    """`call:NAME{...}` (the text between <|tool_call> and <tool_call|>) -> a ToolCall; ValueError if malformed."""
    body = body.strip()
    if not body.startswith("call:"):
        raise ValueError("a tool call starts with 'call:'")
    brace = body.find("{")
    name = body[5:brace].strip() if brace >= 0 else ""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad function name {name!r}")
    r = _Reader(body)
    r.i = brace
    args = r.value()
    r.ws()
    if r.i != len(body):
        raise r.fail("text after the arguments")
    return ToolCall(name, args)


def _strip_markers(text: str) -> str:
    for mk in OUTPUT_MARKERS:
        text = text.replace(mk, "")
    return text


def _malformed(raw: str, why: str) -> str:
    warnings.warn(f"diffgemma: a malformed tool call is returned as content ({why}): {raw[:80]!r}", stacklevel=3)
    return _strip_markers(raw)


def parse_chat_output(text: str, *, tools: bool = True, reasoning: bool = True, partial: bool = False
                      ) -> tuple[str, str, list[ToolCall]]:
    """Generated text (Gemma 4 markers kept) -> (content, reasoning, tool_calls).

    Thinking channels become `reasoning` (reasoning=False leaves them in the content, markers and all); each
    <|tool_call>call:NAME{...}<tool_call|> becomes a ToolCall (tools=False leaves calls in the content); a call
    that does not parse is returned as content, with a warning. Text after a call's <|tool_response> is the
    model imagining the result and is dropped. Stray markers are removed from the content, as detokenizing
    without special tokens would. partial=True reads a prefix of a longer text: an unclosed call (or a channel
    that may still become a thought) is left out rather than judged."""
    if not isinstance(text, str):
        raise Error(f"parse_chat_output takes the generated text (a str), got {type(text).__name__}")
    content: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while pos < len(text):
        hits = [(text.find(mk, pos), mk) for mk in (CALL, CHANNEL) + ((RESPONSE,) if calls else ())]
        hits = [(i, mk) for i, mk in hits if i >= 0]
        if not hits:
            content.append(_strip_markers(text[pos:]))
            break
        i, mk = min(hits)
        content.append(_strip_markers(text[pos:i]))
        if mk == RESPONSE:
            break
        end_mk = CALL_END if mk == CALL else CHANNEL_END
        j = text.find(end_mk, i + len(mk))
        body = text[i + len(mk): j if j >= 0 else len(text)]
        if mk == CHANNEL:
            if partial and j < 0 and THOUGHT.startswith(body):
                break  # may still become a thought
            if not body.startswith(THOUGHT):
                content.append(_strip_markers(body))  # an empty or unnamed channel: nothing to separate
            elif reasoning:
                thoughts.append(_strip_markers(body[len(THOUGHT):]).lstrip())
            else:
                content.append(text[i: j + len(end_mk) if j >= 0 else len(text)])
        elif not tools:
            content.append(_strip_markers(text[i: j if j >= 0 else len(text)]))
        elif j < 0:
            if not partial:
                content.append(_malformed(text[i:], "no <tool_call|>"))
            break
        else:
            try:
                calls.append(parse_call(body))
            except ValueError as e:
                content.append(_malformed(body, str(e)))
        if j < 0:
            break
        pos = j + len(end_mk)
    return "".join(content), "".join(thoughts), calls


@dataclasses.dataclass(frozen=True)
class Delta:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]  # calls that completed since the last update


class OutputStream:
    """Deltas of a growing output (whole canvases are committed one at a time): content and reasoning as they
    become certain, each tool call once its <tool_call|> arrived (so a call spanning canvases is one delta)."""

    def __init__(self, *, tools: bool = True, reasoning: bool = True, max_calls: int | None = None):
        self.tools, self.reasoning, self.max_calls = tools, reasoning, max_calls
        self.content, self.thinking = "", ""
        self.calls: list[ToolCall] = []

    def update(self, text: str, final: bool = False) -> Delta:
        if not final:  # a marker spelled out in plain text may be cut at the end: wait for the rest of it
            for k in range(max(map(len, OUTPUT_MARKERS)) - 1, 0, -1):
                if any(k < len(mk) and text.endswith(mk[:k]) for mk in OUTPUT_MARKERS):
                    text = text[:-k]
                    break
        content, thinking, calls = parse_chat_output(text, tools=self.tools, reasoning=self.reasoning,
                                                     partial=not final)
        calls = calls[: self.max_calls]
        if not (content.startswith(self.content) and thinking.startswith(self.thinking)):
            return Delta("", "", [])  # not prefix-stable here: what was sent stays, the rest waits
        d = Delta(content[len(self.content):], thinking[len(self.thinking):], calls[len(self.calls):])
        self.content, self.thinking = content, thinking
        self.calls = self.calls + d.tool_calls
        return d
