"""Tool calling end to end: `m.chat` / `dg.chat`, and the server with the `openai` client.

The model is the random tiny one with its denoiser scripted: every step returns the next canvas of a scripted
reply (a thought and a tool call, the answer after a tool result, or the arguments after a forced
`call:NAME{`). Everything else is real: the prompt goes through the file's chat template, canvases are
committed whole by the generation loop, markers are Gemma 4's control tokens, and the reply is parsed from
committed canvases; the scripted call spans canvases.
"""

import json

import jsonschema
import numpy as np
import pytest

import diffgemma
from diffgemma import ToolCall, testing

Q = '<|"|>'
THOUGHT = "The user asks about weather."
CALL_REPLY = (f"<|channel>thought\n{THOUGHT}<channel|><|tool_call>call:get_weather{{city:{Q}Paris, {{France}}{Q},"
              f"days:3}}<tool_call|><|tool_response>")
ANSWER = "It is sunny in Paris."
ARGS_REPLY = f"city:{Q}Rome{Q}}}<tool_call|><|tool_response>"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
# The same function with a schema outside the supported subset ("format"): its call is not laid out.
FREE_TOOLS = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "format": "city"}}}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
FAST = {"steps": 2, "stability": None}
# The file's chat template (ours, Gemma 4's layout in brief): tools in the system turn, calls and results.
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|turn>system\n{% for t in tools %}<|tool>declaration:{{ t.function.name }}"
    "<tool|>{% endfor %}<turn|>\n{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|tool_response>"
    "response:x{value:<|\"|>{{ m.content }}<|\"|>}<tool_response|>{% else %}<|turn>"
    "{{ 'model' if m.role == 'assistant' else m.role }}\n{% for c in m.tool_calls or [] %}<|tool_call>call:"
    "{{ c.function.name }}{{ '{' }}{% for k, v in c.function.arguments | dictsort %}{{ k }}:{{ v }}"
    "{% if not loop.last %},{% endif %}{% endfor %}{{ '}' }}<tool_call|>{% endfor %}{{ m.content or '' }}<turn|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def reply_for(prompt: str) -> str:
    if prompt.endswith("call:get_weather{"):
        return ARGS_REPLY
    if "<tool_response|>" in prompt:
        return ANSWER
    return CALL_REPLY


class Scripted:
    """Scripts a loaded model's denoiser: each step returns the next canvas of reply_for(prompt), certain. A
    request's prompt is what its sequence is first prefilled with (the model's own for m.chat, a batch
    sequence in the server)."""

    def __init__(self, model):
        self.model, self.prompts = model, []
        self.state: dict[int, tuple[list[int], list[int], int]] = {}  # sequence -> (prompt, script, canvas)
        L = model.hparams.canvas_length
        real_prefill = model.prefill

        def prefill(committed, *args, sequence=None, **kw):
            committed = [int(t) for t in committed]
            prompt, script, _ = self.state.get(id(sequence), ([], [], 0))
            n = len(prompt)
            ours = n and len(committed) > n and committed[:n] == prompt and committed[n:] == script[:len(committed) - n]
            if not ours:  # a new request: not the last prompt followed by its own canvases
                prompt = committed
                text = model.detokenize(prompt, special=True)
                self.prompts.append(text)
                ids = model.tokenize(reply_for(text), add_special=False) + [testing.EOS]
                script = ids + [testing.EOS] * (-len(ids) % L)
            self.state[id(sequence)] = (prompt, script, (len(committed) - len(prompt)) // L)
            real_prefill(committed, *args, sequence=sequence, **kw)

        def canvas_of(sequence):
            _, script, c = self.state[id(sequence)]
            out = np.asarray(script[c * L:(c + 1) * L] or [testing.EOS] * L, np.int64)
            return out, np.zeros(L, np.float32), out

        def denoise_step(canvas, temperature, self_cond, uniform, vocab=None, logprobs=None):  # vocab: templates
            return canvas_of(None)

        def denoise_batch(batch):
            return [canvas_of(seq) for seq, _ in batch]

        model.prefill, model.denoise_step, model.denoise_batch = prefill, denoise_step, denoise_batch


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    hp = testing.tiny_hparams()
    path = testing.write_model(tmp_path_factory.mktemp("tools") / "tools.gguf", hp,
                               weights=testing.random_weights(hp, 0, calm=True),
                               extra_metadata={"tokenizer.chat_template": TEMPLATE})
    m = diffgemma.load(path, threads=1)
    s = Scripted(m)
    yield s
    m.close()


def test_the_scripted_call_spans_canvases(scripted):
    m = scripted.model
    ids = m.tokenize(CALL_REPLY, add_special=False)
    start, end = ids.index(m.tokenize("<|tool_call>", add_special=False)[0]), ids.index(
        m.tokenize("<tool_call|>", add_special=False)[0])
    assert start // m.hparams.canvas_length < end // m.hparams.canvas_length  # opens and closes in different canvases


def test_chat_agent_loop(scripted):
    m = scripted.model
    r = m.chat(MSGS, tools=TOOLS, **FAST)
    assert "<|tool>declaration:get_weather<tool|><|tool>declaration:get_time<tool|>" in scripted.prompts[-1]
    assert r.tool_calls == [ToolCall("get_weather", {"city": "Paris, {France}", "days": 3})]
    assert r.reasoning == THOUGHT and r.content == "" and r.finish_reason == "tool_calls"
    assert len(r.generation.canvases) >= 3
    messages = [*MSGS, r.to_message(),
                {"role": "tool", "tool_call_id": r.tool_calls[0].id, "content": "sunny, 21 C"}]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                        "arguments": '{"city": "Paris, {France}", "days": 3}'}
    r2 = diffgemma.chat(messages, model=m, tools=TOOLS, **FAST)
    assert "<|tool_call>call:get_weather{city:Paris, {France},days:3}<tool_call|>" in scripted.prompts[-1]
    assert "response:x{value:<|\"|>sunny, 21 C<|\"|>}<tool_response|>" in scripted.prompts[-1]
    assert (r2.content, r2.tool_calls, r2.finish_reason) == (ANSWER, [], "stop")


def test_chat_tool_choice(scripted, monkeypatch):
    m = scripted.model
    n = len(scripted.prompts)
    r = m.chat(MSGS, tools=TOOLS, tool_choice=NAMED, **FAST)
    # The name is fixed; the arguments are laid out with the parameters schema, so they validate. (The script
    # does not follow the layout, so each canvas looks like a new request to it: the first is the prompt.)
    assert scripted.prompts[n].endswith("<|turn>model\n<|tool_call>call:get_weather")
    (call,) = r.tool_calls
    assert call.name == "get_weather" and r.finish_reason == "tool_calls"
    jsonschema.validate(call.arguments, TOOLS[0]["function"]["parameters"])
    # A schema outside the supported subset: the call is forced as before and its arguments written freely.
    with pytest.warns(UserWarning, match="written freely .*'format' is not supported"):
        r = m.chat(MSGS, tools=FREE_TOOLS, tool_choice=NAMED, **FAST)
    assert scripted.prompts[-1].endswith("<|turn>model\n<|tool_call>call:get_weather{")
    assert r.tool_calls == [ToolCall("get_weather", {"city": "Rome"})]
    r = m.chat(MSGS, tools=TOOLS, tool_choice="none", **FAST)
    assert "<|tool>" not in scripted.prompts[-1]  # no tools rendered, and no calls parsed
    assert r.tool_calls == [] and r.content.startswith("call:get_weather{city:Paris")
    # a file without a chat template: the built-in Gemma 4 format declares the tools
    monkeypatch.delitem(m.metadata, "tokenizer.chat_template")
    r = m.chat(MSGS, tools=TOOLS, **FAST)
    assert "<|tool>declaration:get_weather{description:<|\"|>Weather forecast<|\"|>,parameters:" in scripted.prompts[-1]
    assert r.tool_calls[0].arguments == {"city": "Paris, {France}", "days": 3}


def test_chat_bad_tools(scripted):
    with pytest.raises(diffgemma.Error, match="name must match"):
        scripted.model.chat(MSGS, tools=[{"type": "function", "function": {"name": "no spaces"}}])
    with pytest.raises(diffgemma.Error, match="not among the tools"):
        scripted.model.chat(MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    with pytest.raises(diffgemma.Error, match="not valid JSON"):
        scripted.model.chat([*MSGS, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "function": {"name": "get_time", "arguments": "{"}}]}], tools=TOOLS)
    assert json.loads(ToolCall("f", {"a": [1]}).to_dict()["function"]["arguments"]) == {"a": [1]}


# ---- the server, with the openai client ---------------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(scripted):
    pytest.importorskip("fastapi")
    from diffgemma import server as srv

    s = srv.Server(scripted.model, port=0, queue_size=2, log_level="warning").start()
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    s.stop()


def test_server_tool_call_round_trip(scripted, client):
    r = client.chat.completions.create(model="tools", messages=MSGS, tools=TOOLS, extra_body=FAST)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris, {France}", "days": 3}
    assert choice.message.model_extra["reasoning_content"] == THOUGHT
    assert len(r.model_extra["diffusion"]["canvases"]) >= 3  # the call was committed over several canvases
    # the agent runs the function and sends the result back: the model answers
    messages = [*MSGS, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, extra_body=FAST)
    assert "call:get_weather{city:Paris, {France},days:3}<tool_call|>" in scripted.prompts[-1]
    assert r2.choices[0].message.content == ANSWER and r2.choices[0].finish_reason == "stop"
    assert not r2.choices[0].message.tool_calls


def test_server_streams_tool_calls_as_openai_clients_expect(client):
    chunks = list(client.chat.completions.create(model="tools", messages=MSGS, tools=TOOLS, stream=True,
                                                 extra_body=FAST))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == THOUGHT
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 1 and calls[0][0].index == 0 and calls[0][0].function.name == "get_weather"
    assert not any(d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the client library's own stream accumulator puts the message together
    with client.chat.completions.stream(model="tools", messages=MSGS, tools=TOOLS, extra_body=FAST) as s:
        final = s.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris, {France}", "days": 3}
    assert final.choices[0].finish_reason == "tool_calls"


def test_server_tool_choice_and_reasoning_opt_out(scripted, client):
    r = client.chat.completions.create(model="tools", messages=MSGS, tools=TOOLS, tool_choice="none",
                                       extra_body=FAST)
    assert "<|tool>" not in scripted.prompts[-1] and "get_weather" not in scripted.prompts[-1]  # no tools rendered
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    n = len(scripted.prompts)
    r = client.chat.completions.create(model="tools", messages=MSGS, tools=TOOLS, extra_body=FAST, tool_choice=NAMED)
    assert scripted.prompts[n].endswith("<|tool_call>call:get_weather")  # the arguments are laid out
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments),
                        TOOLS[0]["function"]["parameters"])
    r = client.chat.completions.create(model="tools", messages=MSGS, tools=FREE_TOOLS, extra_body=FAST,
                                       tool_choice=NAMED)
    assert scripted.prompts[-1].endswith("<|tool_call>call:get_weather{")  # written freely, as before
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    r = client.chat.completions.create(model="tools", messages=MSGS, extra_body={**FAST, "reasoning_format": "none"})
    assert r.choices[0].message.content.startswith(f"<|channel>thought\n{THOUGHT}<channel|>")
    assert "reasoning_content" not in r.choices[0].message.model_extra


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "maybe"}, "tool_choice"),
    ({"extra_body": {"reasoning_format": "loud"}}, "reasoning_format"),
    ({"messages": [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]}]}, "messages"),
])
def test_server_bad_tools_get_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(**{"model": "tools", "messages": MSGS, **kw})
    err = ei.value.response.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


# ---- diffgemma chat --tools ---------------------------------------------------------------------------------


def test_cli_chat_with_tools(scripted, tmp_path, monkeypatch, capsys):
    from diffgemma import cli

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": TOOLS}))
    typed = iter(["Weather in Paris?", "sunny, 21 C", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    monkeypatch.setattr(cli, "_load", lambda a: scripted.model)
    assert cli.main(["chat", "--tools", str(tools), "-n", "160", "--steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert 'get_weather({"city": "Paris, {France}", "days": 3})' in out and ANSWER in out
    assert f"[thinking] {THOUGHT}" in err
    assert "response:x{value:<|\"|>sunny, 21 C<|\"|>}" in scripted.prompts[-1]  # the typed result went back
    tools.write_text('[{"type": "function", "function": {"name": "bad name"}}]')
    assert cli.main(["chat", "--tools", str(tools)]) == 2
    assert "--tools" in capsys.readouterr().err


def test_server_tools_with_images_is_a_clear_400(client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tools", tools=TOOLS, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "Weather there?"}]}])
    err = ei.value.response.json()["error"]
    assert err["param"] == "messages" and "cannot be combined with images" in err["message"]
