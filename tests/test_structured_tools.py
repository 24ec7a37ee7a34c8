"""Forced tool calls laid out with the function's parameters schema (tool_layout, schema_compile.GEMMA): the
arguments are written in Gemma 4's call syntax and validate (jsonschema) over several schemas and seeds on the
random tiny model; what falls back to a free call, and why; a json_schema's text streamed per canvas."""

import json
import os
import warnings

import jsonschema
import numpy as np
import pytest

import diffgemma as dg
from diffgemma import chat_format, schema_compile, structured, testing, tool_layout

SEEDS = int(os.environ.get("DIFFGEMMA_SCHEMA_SEEDS", "2"))
MSGS = [{"role": "user", "content": "Call the tool."}]
PARAMETERS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city"]},
    {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit", 0]}, "ok": {"type": "boolean"},
                                      "x": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["unit", "ok", "x"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "minItems": 1, "maxItems": 3},
                                      "when": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                         {"type": "null"}]}},
     "required": ["tags", "when"], "additionalProperties": False},
    {"type": "object", "properties": {"odd key": {"const": "fixed"}, "to": {"$ref": "#/$defs/P"}},
     "required": ["odd key", "to"], "$defs": {"P": {"type": "object", "properties": {
         "name": {"type": "string", "minLength": 2, "maxLength": 5}, "age": {"type": ["integer", "null"]}},
         "required": ["name"]}}},
    {"type": "object", "properties": {}},
]


@pytest.fixture(scope="module")
def rnd(random_tiny):
    with dg.load(random_tiny, threads=1) as m:
        yield m


def _tool(name, parameters):
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize("k", range(len(PARAMETERS)))
def test_named_calls_validate_over_schemas_and_seeds(rnd, k):
    tools = [_tool("f", PARAMETERS[k]), _tool("other", PARAMETERS[0])]
    for seed in range(SEEDS):
        for steps in (1, 6):  # every value repaired; re-noised at commits
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback to a free call
                r = rnd.chat(MSGS, tools=tools, tool_choice={"type": "function", "function": {"name": "f"}},
                             seed=seed, steps=steps)
            (call,) = r.tool_calls
            assert call.name == "f" and r.finish_reason == "tool_calls" and r.content == ""
            jsonschema.validate(call.arguments, PARAMETERS[k])
            assert r.generation.text.endswith(chat_format.CALL_END) and r.generation.json is None


def test_required_with_one_tool_is_that_tool_laid_out(rnd):
    call = tool_layout.forced_call(rnd, [_tool("f", PARAMETERS[0])], "required")
    assert call.prefix == "<|tool_call>call:f" and call.layout is not None and call.unenforced is None
    assert tool_layout.forced_call(rnd, [_tool("f", PARAMETERS[0])], "auto") == tool_layout.ForcedCall("")


def test_gemma_syntax_writes_what_the_call_parser_reads():
    js = schema_compile.compile(PARAMETERS[3], schema_compile.GEMMA)
    fixed = "".join(n.text for n in _flat(js.nodes) if isinstance(n, schema_compile.Fixed))
    assert fixed.startswith('{<|"|>odd key<|"|>:<|"|>fixed<|"|>,to:{name:<|"|><|"|>')  # an odd key is quoted
    leaf = next(n for n in _flat(js.nodes) if isinstance(n, schema_compile.Str))
    assert leaf.forbidden == chat_format.MARKERS and not leaf.valid("a<tool_call|>b")
    assert leaf.clean("a<tool_<tool_call|>call|>b") == "ab" and leaf.valid("a<b|")
    choice = schema_compile.compile({"enum": ["a b", 1, None]}, schema_compile.GEMMA).nodes[0]
    assert choice.texts == ('<|"|>a b<|"|>', "1", "null")
    for bad in ({"const": 'x<|"|>y'}, {"enum": ["<|tool_call>"]}):
        with pytest.raises(dg.Error, match="cannot be written in Gemma 4's tool-call syntax"):
            schema_compile.compile(bad, schema_compile.GEMMA)
    assert schema_compile.compile(PARAMETERS[0], schema_compile.GEMMA).key != schema_compile.compile(PARAMETERS[0]).key


def _flat(nodes):
    for n in nodes:
        inner = getattr(n, "nodes", None) or getattr(n, "options", None) or getattr(n, "slots", None)
        yield from _flat(inner) if inner is not None else [n]


def test_a_marker_spelled_out_in_a_string_argument_is_renoised_and_repaired(rnd):
    call = tool_layout.forced_call(rnd, [_tool("f", {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 14}}, "required": ["s"]})], "f")
    lay = call.layout
    v = next(p for p in lay.parts if isinstance(p, structured._Value))
    toks = lay.tokens.copy()
    toks[~lay.fixed] = lay.filler
    ids = [t for ch in "a<tool_call|>" for t in rnd.tokenize(ch, add_special=False)]  # plain text, not the token
    toks[v.start:v.start + len(ids)] = ids
    assert rnd.detokenize(ids) == "a<tool_call|>"
    c, end = (v.end - 1) // lay.canvas_length, (v.end - 1) // lay.canvas_length * lay.canvas_length + lay.canvas_length
    assert lay.check(toks[:end], c) is not None
    toks[lay.canvas(c)], n = lay.repair(toks[:end], c)
    assert n == 1 and lay.check(toks[:end], c) is None
    text = lay.fill(toks, rnd.detokenize)[0]
    assert chat_format.parse_chat_output(call.prefix + text)[2][0].arguments["s"] in ("a", "a<tool_call|")


def test_required_with_several_tools_lays_out_alternatives(tmp_path):
    """A canvas of 128 holds the calls of two tools as alternatives: either one, written whole, passes the commit
    check and parses as that call; on the canvas of 16 they do not fit and the call is free (with the reason)."""
    hp = testing.tiny_hparams(canvas_length=128)
    path = testing.write_model(tmp_path / "c128.gguf", hp, wtype="f32", seed=0,
                               weights=testing.random_weights(hp, 0, calm=True))
    tools = [_tool("get_weather", PARAMETERS[0]), _tool("set_alarm", PARAMETERS[1])]
    with dg.load(path, threads=1) as m:
        call = tool_layout.forced_call(m, tools, "required")
        assert call.prefix == "<|tool_call>call:" and call.layout is not None
        lay = call.layout
        (one_of,) = [p for p in lay.parts if isinstance(p, structured._OneOf)]
        for keep, name in enumerate(["get_weather", "set_alarm"]):
            toks = lay.tokens.copy()
            toks[~lay.fixed] = lay.filler
            lay._canonical(toks, one_of.options[keep])  # that alternative present, with canonical values
            assert lay.check(toks[:lay.canvas_length], 0) is None
            (parsed,) = chat_format.parse_chat_output(call.prefix + lay.fill(toks, m.detokenize)[0])[2]
            assert parsed.name == name
            jsonschema.validate(parsed.arguments, tools[keep]["function"]["parameters"])
        toks = lay.tokens.copy()
        toks[~lay.fixed] = lay.filler
        for o in one_of.options:
            lay._canonical(toks, o)
        assert lay.check(toks[:lay.canvas_length], 0) is not None  # both: re-noised
        for seed in range(SEEDS):
            r = m.chat(MSGS, tools=tools, tool_choice="required", seed=seed, steps=4)
            (c,) = r.tool_calls
            jsonschema.validate(c.arguments, {t["function"]["name"]: t["function"]["parameters"]
                                              for t in tools}[c.name])


def test_what_cannot_be_laid_out_is_a_free_call_with_the_reason(rnd):
    tools = [_tool("f", {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}),
             _tool("g", PARAMETERS[0])]
    call = tool_layout.forced_call(rnd, tools, "f")
    assert call == tool_layout.ForcedCall("<|tool_call>call:f{", None, call.unenforced)
    assert "function 'f', parameters $.properties.d: 'format' is not supported" in call.unenforced
    call = tool_layout.forced_call(rnd, [_tool("g", PARAMETERS[0]), _tool("h", PARAMETERS[1])], "required")
    assert call.prefix == "<|tool_call>call:" and call.layout is None and "more than a canvas" in call.unenforced
    with pytest.warns(UserWarning, match="written freely"):
        rnd.chat(MSGS, tools=tools, tool_choice={"type": "function", "function": {"name": "f"}}, seed=0, steps=2)


# ---- a json_schema streamed per canvas ------------------------------------------------------------------------


def test_stream_sends_the_json_of_committed_canvases(rnd):
    s = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
                                          "c": {"type": "string", "maxLength": 20}, "d": {"type": "null"}},
         "required": ["a", "b", "c", "d"]}
    with rnd.stream("", json_schema=s, seed=1, steps=4) as st:
        deltas = [ev.text_delta for ev in st if isinstance(ev, dg.CanvasEvent)]
    g = st.generation
    assert "".join(deltas) == g.text and len(deltas) == len(g.canvases) > 3
    assert sum(bool(d) for d in deltas[:-1]) >= 2  # text before the last canvas, each a start of the answer
    assert deltas[0].startswith('{"a": ') and json.loads(g.text) == g.json
    # a plain template still comes whole with its last canvas
    with rnd.stream("", template="x {{hole 20}} y", seed=1, steps=2) as st:
        deltas = [ev.text_delta for ev in st if isinstance(ev, dg.CanvasEvent)]
    assert not any(deltas[:-1]) and deltas[-1] == st.generation.text


def test_partial_text_holds_back_an_open_string(rnd):
    lay = structured.lay_out(rnd, {"type": "object", "properties": {"s": {"type": "string", "maxLength": 30}},
                                   "required": ["s"]})
    v = next(p for p in lay.parts if isinstance(p, structured._Value))
    toks = np.where(lay.fixed, lay.tokens, lay.filler)
    assert lay.partial(toks, v.start + 1) == '{"s": "'  # the string is open at the edge: it waits
    assert lay.partial(toks, len(toks)) == lay.fill(toks, rnd.detokenize)[0] == '{"s": ""}'
