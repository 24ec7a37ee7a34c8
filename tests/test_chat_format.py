"""Gemma 4's tool-calling and thinking format: rendering (built-in fallback and a file's template, which gets
`tools` as transformers passes them) and parsing generated text. Pure: no model."""

import json

import pytest

from diffgemma import Error, ToolCall, chat_format, parse_chat_output
from diffgemma.chat import render
from diffgemma.chat_format import OutputStream, check_tool_choice, check_tools, forced_prefix, format_value, parse_call

Q = '<|"|>'
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Sum numbers",
        "parameters": {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}}}}}},
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need the tool.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
]
FOLLOW_UP = [{"role": "assistant", "content": "Sunny, 21 C."}, {"role": "user", "content": "Thanks!"}]

SYSTEM_TURN = (
    "<bos><|turn>system\nBe brief."
    f"<|tool>declaration:get_weather{{description:{Q}Current weather{Q},parameters:{{properties:{{"
    f"city:{{description:{Q}City name{Q},type:{Q}STRING{Q}}},unit:{{enum:[{Q}c{Q},{Q}f{Q}],type:{Q}STRING{Q}}}}},"
    f"required:[{Q}city{Q}],type:{Q}OBJECT{Q}}}}}<tool|>"
    f"<|tool>declaration:add{{description:{Q}Sum numbers{Q},parameters:{{properties:{{"
    f"xs:{{items:{{type:{Q}NUMBER{Q}}},type:{Q}ARRAY{Q}}}}},type:{Q}OBJECT{Q}}}}}<tool|>"
    "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
)
CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},unit:{Q}c{Q}}}<tool_call|>"
RESULT = f"<|tool_response>response:get_weather{{value:{Q}sunny, 21{Q}}}<tool_response|>"


# ---- rendering -------------------------------------------------------------------------------------------------


def test_fallback_renders_tools_a_call_its_result_and_the_answer():
    # after the result the model continues its own turn: no new turn, no generation prompt
    assert render(None, CONVERSATION, tools=TOOLS) == (
        SYSTEM_TURN + "<|channel>thought\nI need the tool.\n<channel|>" + CALL + RESULT)
    # the answer continues that turn; the next user turn drops the old thoughts
    assert render(None, CONVERSATION + FOLLOW_UP, tools=TOOLS) == (
        SYSTEM_TURN + CALL + RESULT + "Sunny, 21 C.<turn|>\n<|turn>user\nThanks!<turn|>\n<|turn>model\n")
    # a call without its result yet: the turn stops where the result goes
    assert render(None, CONVERSATION[:3], tools=TOOLS, add_generation_prompt=True).endswith(
        CALL + "<|tool_response>")


def test_fallback_plain_messages_and_thinking_switches():
    msgs = [{"role": "user", "content": " hi "}]
    assert render(None, msgs) == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"  # unchanged plain format
    assert render(None, msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")
    assert render(None, msgs, enable_thinking=False).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    old = [*msgs, {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello."}, *msgs]
    assert "hmm" not in render(None, old)  # thoughts of earlier answers are not carried


def test_the_plain_template_is_the_fallback_format():
    """chat_format.PLAIN_TEMPLATE (the template tiny test files store) renders plain messages exactly as the
    built-in fallback does: one format, written once."""
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "more\n"}]
    for gen in (True, False):
        plain = render(chat_format.PLAIN_TEMPLATE, msgs, add_generation_prompt=gen)
        assert plain == render(None, msgs, add_generation_prompt=gen)


def test_a_tool_message_needs_a_call_before_it():
    with pytest.raises(Error, match="must follow an assistant message with tool_calls"):
        render(None, [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}])
    with pytest.raises(Error, match="not valid JSON"):
        render(None, [{"role": "assistant", "content": None,
                       "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])


# A file's own template (written here; it reads tools, tool_calls with dict arguments and extra keywords).
FILE_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|turn>system\n{% for t in tools %}<|tool>{{ t.function.name }}("
    "{{ t.function.parameters.required | default([]) | join(',') }})<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|tool_response>{{ m.content }}<tool_response|>"
    "{% else %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{% for c in m.tool_calls or [] %}"
    "<|tool_call>call:{{ c.function.name }}{{ '{' }}{% for k, v in c.function.arguments | dictsort %}{{ k }}:{{ v }}"
    "{% if not loop.last %},{% endif %}{% endfor %}{{ '}' }}<tool_call|>{% endfor %}{{ m.content or '' }}<turn|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% if not enable_thinking %}"
    "<|channel>thought\n<channel|>{% endif %}{% endif %}"
)


def test_a_files_template_gets_tools_as_transformers_passes_them():
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = render(FILE_TEMPLATE, CONVERSATION, tools=TOOLS, enable_thinking=False)
    assert "<|tool>get_weather(city)<tool|><|tool>add()<tool|>" in ours
    assert "call:get_weather{city:Paris,unit:c}" in ours  # arguments arrived as a dict, not a JSON string
    as_dicts = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in CONVERSATION]
    (hf,), _ = render_jinja_template(conversations=[as_dicts], tools=TOOLS, chat_template=FILE_TEMPLATE,
                                     add_generation_prompt=True, enable_thinking=False, bos_token="<bos>",
                                     eos_token="<eos>")
    assert ours == hf


@pytest.mark.parametrize("tools, match", [
    ("get_weather", "must be a list"),
    ([{"type": "function"}], "must be"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "name must match"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "type 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
     "properties must be an object"),
    ([TOOLS[0], TOOLS[0]], "used twice"),
])
def test_bad_tool_schemas(tools, match):
    with pytest.raises(Error, match=match):
        check_tools(tools)


def test_tool_choice():
    assert check_tool_choice(None, TOOLS) == "auto" and check_tool_choice("none", TOOLS) == "none"
    assert check_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS) == "add"
    assert forced_prefix("add") == "<|tool_call>call:add{" and forced_prefix("required") == "<|tool_call>call:"
    assert forced_prefix("auto") == ""
    with pytest.raises(Error, match="not among the tools"):
        check_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(Error):
        check_tool_choice("sometimes", TOOLS)


# ---- parsing ---------------------------------------------------------------------------------------------------


def test_single_call():
    content, reasoning, calls = parse_chat_output(CALL + "<|tool_response>")
    assert (content, reasoning) == ("", "") and calls == [ToolCall("get_weather", {"city": "Paris", "unit": "c"})]
    d = calls[0].to_dict()
    assert d["type"] == "function" and d["id"].startswith("call_") and d["function"]["name"] == "get_weather"
    assert json.loads(d["function"]["arguments"]) == {"city": "Paris", "unit": "c"}


def test_several_calls_with_text_around_and_an_imagined_result_dropped():
    text = (f"Checking both.<|tool_call>call:get_weather{{city:{Q}Oslo{Q}}}<tool_call|>"
            "<|tool_call>call:add{xs:[1,2.5,-3e2]}<tool_call|><|tool_response>response:add{value:0}<tool_response|>"
            "It is warm.")
    content, _, calls = parse_chat_output(text)
    assert content == "Checking both."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"}),
                                                      ("add", {"xs": [1, 2.5, -300.0]})]
    assert len({c.id for c in calls}) == 2


def test_nested_arguments_and_strings_with_braces():
    text = (f"<|tool_call>call:run{{code:{Q}def f(x): return {{'a': [x, \"}}\"]}}{Q},opts:{{deep:{{list:[true,false,"
            f"null,{{k:{Q}v, w: {{}}{Q}}}]}},n:0}},empty:{{}},none:[]}}<tool_call|>")
    (_, _, (call,)) = parse_chat_output(text)
    assert call.arguments == {"code": "def f(x): return {'a': [x, \"}\"]}",
                              "opts": {"deep": {"list": [True, False, None, {"k": "v, w: {}"}]}, "n": 0},
                              "empty": {}, "none": []}


def test_format_and_parse_round_trip():
    args = {"s": "a, b: {c} [d]", "i": 3, "f": -0.5, "b": False, "z": None, "l": [1, "x", [], {}],
            "d": {"inner": {"q": 'say "hi"'}}}
    assert parse_call(f"call:f{format_value(args)}").arguments == args


@pytest.mark.parametrize("body", ["call:f{a:}", "call:f{a:1", "call:{a:1}", "call:f{a:1}trailing", f"f{{a:{Q}x{Q}}}",
                                  f"call:f{{a:{Q}unterminated}}"])
def test_malformed_calls_are_content_with_a_warning(body):
    with pytest.warns(UserWarning, match="malformed tool call"):
        content, _, calls = parse_chat_output(f"before <|tool_call>{body}<tool_call|> after")
    assert calls == [] and content.startswith("before ") and content.endswith(" after")
    with pytest.warns(UserWarning, match="no <tool_call|>"):  # cut off before its end
        content, _, calls = parse_chat_output("x<|tool_call>call:f{a:1")
    assert calls == [] and content == "xcall:f{a:1"


def test_thinking_and_a_call():
    text = f"<|channel>thought\nThe user wants weather.\n<channel|>Let me look.{CALL}"
    assert parse_chat_output(text) == ("Let me look.", "The user wants weather.\n",
                                       [ToolCall("get_weather", {"city": "Paris", "unit": "c"})])
    # reasoning=False keeps the thought in the content; tools=False keeps the call as (marker-free) text
    assert parse_chat_output(text, reasoning=False)[0].startswith("<|channel>thought\nThe user wants weather.")
    content, _, calls = parse_chat_output(text, tools=False)
    assert calls == [] and content == "Let me look.call:get_weather{city:Paris,unit:c}"


def test_stray_markers_are_dropped_like_control_tokens():
    assert parse_chat_output('a<channel|>b<|"|>c<|channel>d<channel|>e') == ("abcde", "", [])
    assert parse_chat_output("plain text, no markers {a:1}") == ("plain text, no markers {a:1}", "", [])


def _stream(text, cuts):
    s = OutputStream()
    deltas = [s.update(text[:c]) for c in cuts] + [s.update(text, final=True)]
    return ("".join(d.content for d in deltas), "".join(d.reasoning for d in deltas),
            [c for d in deltas for c in d.tool_calls], deltas)


@pytest.mark.parametrize("step", [1, 3, 7, 16, 40])
def test_a_call_split_across_canvases_parses(step):
    text = (f"<|channel>thought\nhmm, {{x}}<channel|>Sure: <|tool_call>call:add{{xs:[1,2]}}<tool_call|>"
            f"<|tool_call>call:get_weather{{city:{Q}Rome, {{IT}}{Q}}}<tool_call|>")
    content, reasoning, calls, deltas = _stream(text, range(0, len(text), step))
    whole = parse_chat_output(text)
    assert (content, reasoning, calls) == whole
    assert [c.name for d in deltas for c in d.tool_calls] == ["add", "get_weather"]  # each call once, when closed
    assert not any(set(d.content) & set("{}[]<|>") for d in deltas)  # no piece of a call or marker leaks out


def test_stream_holds_back_what_is_not_certain_yet():
    s = OutputStream()
    assert s.update("Hello <|tool_call>call:add{xs:[1,").content == "Hello "
    assert s.update("Hello <|tool_call>call:add{xs:[1,").content == ""  # nothing twice
    assert s.update("Hello <|tool_call>call:add{xs:[1,2]}<tool_").tool_calls == []  # the end marker is incomplete
    d = s.update("Hello <|tool_call>call:add{xs:[1,2]}<tool_call|>")
    assert [c.arguments for c in d.tool_calls] == [{"xs": [1, 2]}]
    s = OutputStream()
    assert s.update("<|channel>tho").reasoning == "" and s.update("<|channel>tho").content == ""
    assert s.update("<|channel>thought\nstep one").reasoning == "step one"
