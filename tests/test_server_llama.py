"""`diffgemma serve` as a llama-server user drives it: /tokenize, /detokenize, /apply-template, /props, /slots,
`n` > 1 choices, --api-key, the paths llama-server also answers without /v1, the access log and the
context-exceeded message. A real Server on 127.0.0.1 (a free port) on the random tiny model, driven with httpx
and the openai client; the command-line tests run `diffgemma serve` in a subprocess.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import types

import pytest

import diffgemma
from diffgemma.chat import prompt_ids

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffgemma import server as srv  # noqa: E402
from diffgemma.server.auth import api_keys  # noqa: E402
from diffgemma.server.errors import ApiError  # noqa: E402
from diffgemma.server.protocol import GenerationRequest  # noqa: E402

MSGS = [{"role": "user", "content": "Tell me about rivers."}]
FAST = {"steps": 2, "stability": None}  # every canvas takes exactly 2 steps
QUEUE = 3  # the server fixture's queue


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def no_eos(monkeypatch):
    """Random weights can emit an EOS at any canvas; long generations must not end early."""
    monkeypatch.setattr(diffgemma.generation, "eos_ids", lambda model: frozenset())


def wait_for(cond, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def library_text(model, prompt, max_tokens, seed):
    return model.detokenize(model.generate(prompt, max_new_tokens=max_tokens, seed=seed, **FAST).tokens[:max_tokens])


# ---- /tokenize, /detokenize, /apply-template ------------------------------------------------------------------


def test_tokenize_and_detokenize_in_llama_servers_shapes(model, http):
    r = http.post("/tokenize", json={"content": "Hello world"})
    assert r.status_code == 200 and r.json() == {"tokens": model.tokenize("Hello world", add_special=False)}
    ids = http.post("/tokenize", json={"content": "Hello world", "add_special": True}).json()["tokens"]
    assert ids == model.tokenize("Hello world") and ids[0] == model.tokenizer.bos
    # control tokens written as text are recognised unless parse_special is false
    assert len(http.post("/tokenize", json={"content": "<|turn>user"}).json()["tokens"]) == 3
    assert len(http.post("/tokenize", json={"content": "<|turn>user", "parse_special": False}).json()["tokens"]) == 8
    # pieces: text where it is whole UTF-8, the bytes where a character is split over byte tokens
    text = "Hello 🦜 é"
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == model.tokenize(text, add_special=False)
    assert b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode()
                    for p in pieces) == text.encode()
    assert {"id": 89, "piece": "H"} in pieces and any(isinstance(p["piece"], list) for p in pieces)
    # ... and back; control tokens come back as their text, as llama-server writes them
    r = http.post("/detokenize", json={"tokens": [p["id"] for p in pieces]})
    assert r.status_code == 200 and r.json() == {"content": text}
    assert http.post("/detokenize", json={"tokens": [5, 373, 342]}).json() == {"content": "<|turn>user"}
    assert http.post("/detokenize", json={}).json() == {"content": ""}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 3}, "content"),
    ("/tokenize", {"content": "x", "with_pieces": "yes"}, "with_pieces"),
    ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/apply-template", {}, "messages"),
    ("/apply-template", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
])
def test_bad_llama_requests_are_400s_naming_the_field(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_apply_template_gives_the_prompt_chat_completions_uses(model, http, client):
    prompt = http.post("/apply-template", json={"messages": MSGS}).json()["prompt"]
    assert prompt.startswith("<bos><|turn>user") and "Tell me about rivers." in prompt
    ids = http.post("/tokenize", json={"content": prompt}).json()["tokens"]
    assert ids == prompt_ids(model, MSGS, None)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, seed=1, extra_body=FAST)
    assert r.usage.prompt_tokens == len(ids)
    # tools and a forced call are rendered as for the chat endpoint
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    with_tools = http.post("/apply-template", json={"messages": MSGS, "tools": tools, "tool_choice": forced})
    assert with_tools.json()["prompt"].startswith("<bos>") and "get_weather" in with_tools.json()["prompt"]
    assert with_tools.json()["prompt"].endswith("<|tool_call>call:get_weather")  # its arguments are laid out


# ---- /props, /slots -------------------------------------------------------------------------------------------


def test_props(model, http):
    p = http.get("/props").json()
    assert p["total_slots"] == srv.MAX_BATCH and p["model_path"] == str(model.path) and p["model_alias"] == "tiny"
    assert p["chat_template"] == model.metadata["tokenizer.chat_template"]
    assert p["modalities"] == {"vision": False, "audio": False} and p["build_info"].startswith("diffgemma ")
    assert p["canvas_length"] == 16 and p["is_sleeping"] is False
    d = p["default_generation_settings"]
    assert d["n_ctx"] == model.n_ctx and d["is_processing"] is False and d["id_task"] == -1
    assert d["params"]["n_predict"] == d["params"]["max_tokens"] == 256 and d["params"]["seed"] == -1
    assert d["params"]["steps"] == model.sampler_defaults.steps
    assert http.post("/props", json={}).status_code == 405  # read-only, as llama-server without --props


def test_slots_show_each_running_request_and_where_its_diffusion_is(model, http, client, no_eos):
    idle = http.get("/slots").json()
    assert [s["id"] for s in idle] == list(range(srv.MAX_BATCH)) and not any(s["is_processing"] for s in idle)
    assert http.get("/slots", params={"fail_on_no_slot": 1}).status_code == 200
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=4000, seed=9, n=srv.MAX_BATCH,
                                       stream=True, extra_body={"steps": 48, "stability": None})
    try:
        first = next(iter(stream))  # every slot holds one of its choices now
        slots = http.get("/slots").json()
        assert all(s["is_processing"] for s in slots)
        assert sorted(s["index"] for s in slots) == list(range(srv.MAX_BATCH))
        for s in slots:
            assert s["request_id"] == first.id and s["prompt_tokens"] == len(model.tokenize("abc"))
            assert s["params"]["seed"] == 9 + s["index"] and s["params"]["max_tokens"] == 4000
            assert s["params"]["steps"] == 48 and s["params"]["stream"] is True and s["n_ctx"] == model.n_ctx
            assert s["next_token"]["n_decoded"] + s["next_token"]["n_remain"] == 4000
        wait_for(lambda: all(s["step"] for s in http.get("/slots").json()))
        s = http.get("/slots").json()[0]
        assert s["canvas"] >= 0 and 1 <= s["step"] <= s["steps"] == 48
        assert len({s["id_task"] for s in slots}) == srv.MAX_BATCH  # a task number each, as llama-server's
        r = http.get("/slots", params={"fail_on_no_slot": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_slot_available"
    finally:
        stream.close()
    wait_for(lambda: not any(s["is_processing"] for s in http.get("/slots").json()))


# ---- n > 1 ----------------------------------------------------------------------------------------------------


def test_n_choices_are_the_library_generations_with_seed_plus_index(model, client, no_eos):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, seed=4, n=3,
                                  extra_body=FAST)
    ids = model.tokenize("Once upon a time")
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [library_text(model, ids, 20, 4 + i) for i in range(3)]
    assert r.usage.prompt_tokens == len(ids)  # the prompt counts once, the completions of every choice
    assert r.usage.completion_tokens == 60 and r.usage.total_tokens == len(ids) + 60
    d = r.model_extra["diffusion"]
    assert d["seed"] == 4 and [c["seed"] for c in d["choices"]] == [4, 5, 6]
    assert all(len(c["canvases"]) == 2 for c in d["choices"])
    chat = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, seed=4, n=2, extra_body=FAST)
    one = [client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, seed=4 + i, extra_body=FAST)
           for i in range(2)]
    assert [c.message.content for c in chat.choices] == [o.choices[0].message.content for o in one]
    assert [c.finish_reason for c in chat.choices] == [o.choices[0].finish_reason for o in one]
    assert "choices" not in one[0].model_extra["diffusion"]  # n = 1 answers are as before


def test_n_choices_stream_with_their_index(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=32, seed=12, n=3, extra_body=FAST)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert sorted(c.choices[0].index for c in chunks[:3]) == [0, 1, 2]
    assert all(c.choices[0].delta.role == "assistant" for c in chunks[:3])
    for i in range(3):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(ch.delta.content or "" for ch in mine) == whole.choices[i].message.content
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == [whole.choices[i].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = client.completions.create(model="tiny", prompt="abc", max_tokens=16, seed=3, n=2, stream=True,
                                     extra_body=FAST)
    got = {0: "", 1: ""}
    for c in text:
        got[c.choices[0].index] += c.choices[0].text
    want = client.completions.create(model="tiny", prompt="abc", max_tokens=16, seed=3, n=2, extra_body=FAST)
    assert got == {c.index: c.text for c in want.choices}


def test_n_choices_frames_carry_their_index(server):
    body = {"messages": MSGS, "max_tokens": 16, "seed": 2, "n": 2, "stream": True, "diffusion_frames": True, **FAST}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith(": diffusion ")]
    frames = [json.loads(ln[len(": diffusion "):]) for ln in lines]
    assert sorted((f["index"], f["step"]) for f in frames if f["type"] == "frame") == [(0, 1), (0, 2), (1, 1), (1, 2)]
    done = sorted((f["index"], f["seed"]) for f in frames if f["type"] == "done")
    assert done == [(0, 2), (1, 3)]


def test_n_above_max_batch_is_refused(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="abc", max_tokens=4, n=srv.MAX_BATCH + 1)
    err = ei.value.response.json()["error"]
    assert err["param"] == "n" and "--max-batch 4" in err["message"]


def test_a_request_with_n_choices_takes_n_places_in_the_queue(model):
    engine = srv.Engine(model, 1, srv.Metrics(), max_batch=2)  # not started: nothing leaves the queue
    params = GenerationRequest.model_validate({"max_tokens": 4}).params(model.sampler_defaults)

    def job():
        return types.SimpleNamespace(p=params, task=-1)

    engine.submit(job(), job(), job())  # two take the free places at the next step, one waits
    assert engine.depth() == (3, 0)
    with pytest.raises(ApiError) as ei:
        engine.submit(job(), job())  # all or none
    assert ei.value.status == 503 and ei.value.code == "queue_full" and engine.depth() == (3, 0)


# ---- paths without /v1 ----------------------------------------------------------------------------------------


def test_paths_llama_server_also_answers_without_v1(http):
    r = http.post("/chat/completions", json={"messages": MSGS, "max_tokens": 4, "seed": 1, **FAST})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert http.get("/models").json()["data"][0]["id"] == "tiny"
    assert http.get("/v1/health").json()["status"] == "ok"
    # llama-server's /completions is its own (non-OpenAI) API: not served here
    assert http.post("/completions", json={"prompt": "abc"}).status_code == 404


# ---- --api-key --------------------------------------------------------------------------------------------


def test_api_keys_read_from_the_flag_and_the_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# the team's keys\nk3\n\n  k4  \n")
    assert api_keys("k1, k2", f) == ["k1", "k2", "k3", "k4"]
    assert api_keys(None) == [] and api_keys(["a"]) == ["a"]
    with pytest.raises(diffgemma.Error, match="cannot read the API key file"):
        api_keys(None, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(diffgemma.Error, match="holds no key"):
        api_keys(None, tmp_path / "empty.txt")


def test_api_key_guards_all_but_health_models_and_the_page(model, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("k3\n")
    with srv.Server(model, port=0, log_level="warning", api_key="k1,k2", api_key_file=keyfile) as s:
        anon = httpx.Client(base_url=s.url, timeout=30)
        for path in ("/health", "/v1/health", "/models", "/v1/models", "/"):
            assert anon.get(path).status_code == 200, path
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                             ("GET", "/props"), ("GET", "/slots"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                             ("POST", "/apply-template"), ("POST", "/chat/completions")):
            r = anon.request(method, path, json={"content": "x"})
            assert r.status_code == 401, path
            assert r.json() == {"error": {"message": "Invalid API Key", "type": "authentication_error",
                                          "param": None, "code": 401}}
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert anon.get("/props", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert anon.get("/props", headers={"Authorization": "k1"}).status_code == 200  # llama-server takes it bare
        assert anon.get("/props", headers={"X-Api-Key": "k2"}).status_code == 200  # Anthropic clients' header
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.retrieve("tiny")
        for key in ("k1", "k3"):
            c = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=30)
            r = c.completions.create(model="tiny", prompt="abc", max_tokens=4, seed=1, extra_body=FAST)
            assert r.usage.completion_tokens == 4
        metrics = anon.get("/metrics", headers={"Authorization": "Bearer k1"}).text
        assert re.search(r'diffgemma_requests_total\{endpoint="/props",status="401"\} 2', metrics)
        anon.close()


# ---- the context-exceeded message ------------------------------------------------------------------------


def test_context_exceeded_names_the_servers_context(model, client, random_tiny):
    with pytest.raises(openai.BadRequestError) as ei:  # this server has the model's whole context
        client.completions.create(model="tiny", prompt="word " * 5000, max_tokens=16)
    msg = ei.value.response.json()["error"]["message"]
    assert "this server's context of 4096 tokens (the model's own context length)" in msg and "larger" not in msg
    small = diffgemma.load(random_tiny, threads=1, n_ctx=512)
    try:
        with srv.Server(small, port=0, log_level="warning") as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(openai.BadRequestError) as ei:
                c.completions.create(model="tiny", prompt="word " * 1000, max_tokens=16)
            err = ei.value.response.json()["error"]
            assert err["code"] == "context_length_exceeded"
            assert "this server's context of 512 tokens" in err["message"]
            assert "the model's own is 4096" in err["message"] and "-c" in err["message"]
            with pytest.raises(openai.BadRequestError) as ei:
                c.completions.create(model="tiny", prompt="abc", extra_body={"template": "{{hole 600}}"})
            assert "this server's context of 512 tokens" in ei.value.response.json()["error"]["message"]
    finally:
        small.close()


# ---- the command line: --api-key, --log-disable, the access log -----------------------------------------


def serve(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
        diffgemma.__file__)), os.environ.get("PYTHONPATH", "")] if p)}
    proc = subprocess.Popen([sys.executable, "-m", "diffgemma", "serve", "-m", "tiny", "--port", "0", "-c", "512",
                             "-t", "1", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    return proc, re.search(r"http://127\.0\.0\.1:\d+", line).group(0)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return out, err


ACCESS = re.compile(r'^INFO: +127\.0\.0\.1:\d+ - "(\w+) (\S+) HTTP/1\.1" (\d+)', re.M)


def test_cli_access_log_on_stderr_in_uvicorns_format():
    proc, url = serve()
    try:
        httpx.get(url + "/health")
        httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 4, **FAST}, timeout=30)
        httpx.post(url + "/v1/completions", json={"prompt": ""}, timeout=30)
        out, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ACCESS.findall(err) == [("GET", "/health", "200"), ("POST", "/v1/completions", "200"),
                                   ("POST", "/v1/completions", "400")]
    assert out == ""  # stdout stays clean: everything the server says goes to stderr


def test_cli_api_key_and_log_disable():
    proc, url = serve("--api-key", "sesame", "--log-disable")
    try:
        assert httpx.get(url + "/health").status_code == 200
        body = {"prompt": "abc", "max_tokens": 4, **FAST}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sesame"}, timeout=30)
        assert r.status_code == 200
        _, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not ACCESS.findall(err)


def test_cli_refuses_an_unreadable_key_file_before_loading(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffgemma", "serve", "-m", str(tmp_path / "no-such.gguf"),
                        "--api-key-file", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(diffgemma.__file__))})
    assert r.returncode == 2 and "cannot read the API key file" in r.stderr  # not the missing model


def test_concurrent_n_requests_all_complete(model, client):
    got, errors = {}, []

    def one(seed):
        try:
            r = client.completions.create(model="tiny", prompt="abc", max_tokens=16, seed=seed, n=2, extra_body=FAST)
            got[seed] = [c.text for c in r.choices]
        except Exception as e:  # reported below, with the seed
            errors.append((seed, e))

    threads = [threading.Thread(target=one, args=(s,)) for s in (30, 40, 50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = model.tokenize("abc")
    assert not errors and got == {s: [library_text(model, ids, 16, s + i) for i in range(2)] for s in (30, 40, 50)}
