"""Structured output on the server: `response_format` json_schema on /v1/chat/completions and /v1/completions
(the openai SDK's `parse` with a pydantic model, streaming per canvas, n > 1, the 400s), and forced tool calls
whose arguments are laid out with the function's parameters schema. The random tiny model (canvas 16); one
canvas of 64 for tool_choice "required" with several tools."""

import json

import jsonschema
import pytest

import diffgemma
from diffgemma import testing

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

from diffgemma import server as srv  # noqa: E402

FAST = {"steps": 3, "stability": None}
MSGS = [{"role": "user", "content": "Describe the weather."}]
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "temp": {"type": "integer", "minimum": -40, "maximum": 50},
    "sunny": {"type": "boolean"}, "wind": {"type": "number", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["rain", "fog", "snow"]}, "maxItems": 2}},
    "required": ["city", "temp", "sunny"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    temp: int = pydantic.Field(ge=-40, le=50)
    sunny: bool


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                         "label": {"type": ["string", "null"], "maxLength": 6}},
        "required": ["hour"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: no arguments
]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _error(ei):
    return ei.value.response.json()["error"]


# ---- response_format ----------------------------------------------------------------------------------------


def test_the_openai_sdk_parses_a_pydantic_model(client):
    r = client.chat.completions.parse(model="tiny", messages=MSGS, response_format=Weather, seed=3, extra_body=FAST)
    choice = r.choices[0]
    assert isinstance(choice.message.parsed, Weather) and choice.finish_reason == "stop"
    assert choice.message.parsed == Weather.model_validate_json(choice.message.content)
    assert r.model_extra["diffusion"]["seed"] == 3 and "renoised" in r.model_extra["diffusion"]["timings"]
    if hasattr(client, "beta") and hasattr(client.beta, "chat"):  # older SDKs: the same call under beta
        b = client.beta.chat.completions.parse(model="tiny", messages=MSGS, response_format=Weather, seed=3,
                                               extra_body=FAST)
        assert b.choices[0].message.parsed == choice.message.parsed


def test_chat_json_schema_is_the_library_answer(model, client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format=FORMAT, seed=4, extra_body=FAST)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    g = model.chat(MSGS, json_schema=SCHEMA, seed=4, **FAST)
    assert text == g.content and r.usage.completion_tokens == len(g.generation.tokens)
    assert not r.choices[0].message.tool_calls


def test_completions_json_schema(model, client):
    r = client.completions.create(model="tiny", prompt="The weather:", seed=5,  # not in the SDK's signature
                                  extra_body={**FAST, "response_format": FORMAT})
    text = r.choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)
    g = model.generate("The weather:", chat=False, json_schema=SCHEMA, seed=5, **FAST)
    assert text == g.text and r.choices[0].finish_reason == "stop"
    # no prompt: the layout alone, after BOS
    r = client.completions.create(model="tiny", prompt="", seed=5, extra_body={**FAST, "response_format": FORMAT})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_streaming_sends_the_json_so_far_per_canvas(client):
    kw = dict(model="tiny", messages=MSGS, response_format=FORMAT, seed=6, extra_body=FAST)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    parts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(parts) == whole and len(parts) > 2  # the schema spans several canvases: text comes as they commit
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    texts = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Weather:", seed=6, stream=True, extra_body={**FAST, "response_format": FORMAT})
        if c.choices]
    jsonschema.validate(json.loads("".join(texts)), SCHEMA)
    assert sum(bool(t) for t in texts) > 2


def test_n_choices_each_follow_the_schema(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format=FORMAT, n=2, seed=7,
                                       extra_body=FAST)
    assert [c.index for c in r.choices] == [0, 1]
    values = [json.loads(c.message.content) for c in r.choices]
    for v in values:
        jsonschema.validate(v, SCHEMA)
    assert values[0] != values[1]  # seeds 7 and 8


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5}}}}}},
     "response_format", ["'multipleOf' is not supported", "$.properties.age"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "$defs": {"P": {"type": "string", "pattern": "a+"}}, "$ref": "#/$defs/P"}}}},
     "response_format", ["'pattern'", "$.$defs.P"]),
    ({"response_format": {"type": "json_object"}}, "response_format", ["json_schema", "json_object"]),
    ({"response_format": {"type": "xml"}}, "response_format", ["unknown 'response_format' type"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format", ["'schema'"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}},
     "response_format", ["strict"]),
    ({"response_format": FORMAT, "template": "{{hole 3}}"}, "response_format", ["not both"]),
    ({"response_format": FORMAT, "stop": ["}"]}, "stop", ["response_format"]),
    ({"response_format": FORMAT, "logprobs": True}, "logprobs", ["response_format"]),
    ({"response_format": FORMAT, "tools": TOOLS}, "response_format", ["tools"]),
])
def test_chat_refusals_are_400s_naming_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=MSGS, extra_body=body)
    err = _error(ei)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    for w in words:
        assert w in err["message"], err


def test_completion_refusals(client):
    for body, param in [({"response_format": FORMAT, "suffix": "x"}, "suffix"),
                        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
                            "type": "object", "properties": {"a": {"type": "string", "format": "date"}}}}}},
                         "response_format")]:
        with pytest.raises(openai.BadRequestError) as ei:
            client.completions.create(model="tiny", prompt="a", extra_body=body)
        assert _error(ei)["param"] == param


def test_strict_false_text_and_llama_servers_json_object(client):
    loose = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": False}}
    a = client.chat.completions.create(model="tiny", messages=MSGS, response_format=loose, seed=9, extra_body=FAST)
    b = client.chat.completions.create(model="tiny", messages=MSGS, response_format=FORMAT, seed=9, extra_body=FAST)
    assert a.choices[0].message.content == b.choices[0].message.content
    llama = {"type": "json_object", "schema": SCHEMA}  # llama-server's spelling of a schema
    d = client.chat.completions.create(model="tiny", messages=MSGS, seed=9,
                                       extra_body={**FAST, "response_format": llama})
    assert d.choices[0].message.content == b.choices[0].message.content
    c = client.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "text"}, seed=9,
                                       max_tokens=8, extra_body=FAST)
    assert c.choices[0].finish_reason == "length"  # a plain answer


# ---- forced tool calls -----------------------------------------------------------------------------------------


def _named(name):
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize("seed", range(3))
def test_a_named_call_has_valid_arguments(client, seed):
    for tool in TOOLS:
        name = tool["function"]["name"]
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=_named(name),
                                           seed=seed, extra_body=FAST)
        choice = r.choices[0]
        (call,) = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments),
                            tool["function"].get("parameters", {"type": "object", "additionalProperties": False}))


def test_a_named_call_streams_whole(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, stream=True, seed=1,
                                                 tool_choice=_named("set_alarm"), extra_body=FAST))
    calls = [d.tool_calls for c in chunks if c.choices for d in [c.choices[0].delta] if d.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "set_alarm"
    jsonschema.validate(json.loads(calls[0][0].function.arguments), TOOLS[1]["function"]["parameters"])


def test_required_with_several_tools_calls_one_with_valid_arguments(tmp_path):
    """Canvas 128: the three calls (92 positions) fit in one canvas as alternatives; one is written, and its
    arguments validate."""
    hp = testing.tiny_hparams(canvas_length=128)
    path = testing.write_model(tmp_path / "c128.gguf", hp, wtype="f32", seed=0,
                               weights=testing.random_weights(hp, 0, calm=True))
    with diffgemma.load(path, threads=1) as m:
        s = srv.Server(m, port=0, queue_size=2, log_level="warning").start()
        try:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
            for seed in range(3):
                r = c.chat.completions.create(model="c128", messages=MSGS, tools=TOOLS, tool_choice="required",
                                              seed=seed, extra_body=FAST)
                (call,) = r.choices[0].message.tool_calls
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        finally:
            s.stop()
