"""`diffgemma serve`: the OpenAI-compatible server on the tiny model, driven by the official `openai` client.

The server runs in this process on a background thread (127.0.0.1, a free port); the last test runs the real
command line in a subprocess to check graceful shutdown. Generations are kept short (few steps, few canvases).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest

import diffgemma
from diffgemma import cli
from diffgemma import server as srv
from diffgemma.chat import output_text

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffgemma.server.engine import Run  # noqa: E402
from diffgemma.server.protocol import GenerationRequest  # noqa: E402

QUEUE = 3
MSGS = [{"role": "user", "content": "Tell me about rivers."}]
# The adaptive stop off: every canvas takes exactly `steps` steps, so step counts are predictable.
FAST = {"steps": 2, "stability": None}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def http(server, path, body=None, *, raw=None):
    """(status, headers, parsed body) of a plain request (no client library in the way)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            status, headers = r.status, r.headers
    except urllib.error.HTTPError as e:
        text, status, headers = e.read().decode(), e.code, e.headers
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text


def sse_lines(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return [ln.decode().rstrip("\n") for ln in r if ln.strip()]


def expected_text(model, prompt, max_tokens, seed, **kw):
    """What the server must answer: the library's generation with the same seed, cut at max_tokens."""
    g = model.generate(prompt, max_new_tokens=max_tokens, seed=seed, **kw)
    return model.detokenize(g.tokens[:max_tokens]), g


def expected_chat(model, messages, max_tokens, seed, **kw):
    """A chat answer's content: the same generation, parsed (thinking and Gemma 4's markers taken out)."""
    g = model.generate(messages, max_new_tokens=max_tokens, seed=seed, **kw)
    return diffgemma.parse_chat_output(output_text(model, g.tokens[:max_tokens]), tools=False)[0], g


def health(server):
    return http(server, "/health")[2]


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- basics ------------------------------------------------------------------------------------------------


def test_health_models_and_web_page(server, client):
    h = health(server)
    assert h["status"] == "ok" and h["model"] == "tiny" and h["canvas_length"] == 16
    assert h["queue"] == {"waiting": 0, "running": 0, "capacity": QUEUE}
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]
    status, headers, page = http(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and "diffgemma" in page


def test_chat_matches_the_library_and_is_reproducible(model, client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=20, seed=5, extra_body=FAST)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    text, g = expected_chat(model, MSGS, 20, 5, steps=2, stability=None)
    assert a.choices[0].message.content == b.choices[0].message.content == text
    assert a.choices[0].message.role == "assistant" and a.object == "chat.completion" and a.model == "tiny"
    # max_tokens is honoured exactly even though canvases are 16 tokens (two canvases were denoised)
    assert a.usage.completion_tokens == 20 and a.usage.prompt_tokens == g.prompt_tokens
    assert a.usage.total_tokens == a.usage.prompt_tokens + 20
    assert a.choices[0].finish_reason == "length"
    d = a.model_extra["diffusion"]
    assert d["seed"] == 5 and [c["steps"] for c in d["canvases"]] == [2, 2] and d["timings"]["step_ms"] > 0


def test_chat_stream_is_the_same_text_in_canvas_chunks(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=48, seed=11, extra_body=FAST)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == whole
    assert 1 <= len(content) <= 3  # one chunk per committed canvas (at most)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48


def test_completions_text_and_token_prompts(model, client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, seed=3, extra_body=FAST)
    text, _ = expected_text(model, model.tokenize("Once upon a time"), 16, 3, steps=2, stability=None)
    assert r.object == "text_completion" and r.choices[0].text == text
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, seed=3,
                                         stream=True, extra_body=FAST)
    assert "".join(c.choices[0].text for c in streamed) == text
    ids = model.tokenize("Once upon a time")
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=16, seed=3, extra_body=FAST)
    assert r2.choices[0].text == text and r2.usage.prompt_tokens == len(ids)


def test_eos_ends_with_finish_reason_stop(model, client):
    ids = model.tokenize("The end")
    for seed in range(200):  # random weights: find a seed whose generation hits an EOS
        g = model.generate(ids, max_new_tokens=64, seed=seed, steps=1, stability=None)
        if g.canvases[-1].eos:
            break
    else:
        pytest.skip("no EOS within 200 seeds")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=64, seed=seed,
                                  extra_body={"steps": 1, "stability": None})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(g.tokens) and r.choices[0].text == g.text


def test_stop_sequences(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=48, seed=8, extra_body=FAST)
    text = client.completions.create(**kw).choices[0].text
    stop = text[20:23]
    want = text[: text.find(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_diffusion_frames_are_sse_comments(model, client, server):
    body = {"messages": MSGS, "max_tokens": 32, "seed": 2, "stream": True, "diffusion_frames": True, **FAST}
    lines = sse_lines(server, "/v1/chat/completions", body)
    frames = [json.loads(ln[len(": diffusion "):]) for ln in lines if ln.startswith(": diffusion ")]
    steps = [f for f in frames if f["type"] == "frame"]
    assert [(f["canvas"], f["step"]) for f in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    f = steps[-1]
    assert f["steps"] == 2 and len(f["tokens"]) == len(f["pieces"]) == 16 and f["text"] == model.detokenize(f["tokens"])
    assert 0 < f["accepted"] <= 16 and f["mean_entropy"] >= 0 and f["temperature"] > 0
    done = frames[-1]
    assert done["type"] == "done" and done["seed"] == 2 and done["usage"]["completion_tokens"] == 32
    assert lines[-1] == "data: [DONE]"
    # ... and the openai client does not see them: same chunks, same text as without frames
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=32, seed=2, extra_body=FAST)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=32, seed=2, stream=True,
                                                 extra_body={**FAST, "diffusion_frames": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content


def test_seed_minus_one_is_random(client):
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=8, seed=-1, extra_body=FAST)
    assert r.model_extra["diffusion"]["seed"] >= 0


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, param", [
    ({"extra_body": {"steps": 0}}, "steps"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 5}, "n"),  # more than the server runs at once (--max-batch 4)
    ({"n": 0}, "n"),
    ({"seed": -2}, "seed"),  # -1 means "random", as in llama.cpp
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"extra_body": {"t_min": 0.9, "t_max": 0.5}}, None),
    ({"extra_body": {"entropy_bound": "big"}}, "entropy_bound"),
    ({"stop": [""]}, "stop"),
])
def test_bad_requests_get_400_with_an_openai_error(client, kw, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(**{"model": "tiny", "messages": MSGS, "max_tokens": 16, **kw})
    err = ei.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_oversize_prompt_and_malformed_bodies(client, server):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="word " * 5000, max_tokens=16)
    err = ei.value.response.json()["error"]
    assert err["code"] == "context_length_exceeded" and "4096" in err["message"] and err["param"] == "prompt"
    status, _, body = http(server, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, _, body = http(server, "/v1/completions", [1, 2])
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, _, body = http(server, "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"


# ---- queueing, concurrency, disconnects ----------------------------------------------------------------------


def test_concurrent_requests_all_complete_correctly(model, client):
    seeds = [21, 22, 23, 24]  # 1 running + QUEUE waiting
    want = {s: expected_chat(model, MSGS, 32, s, steps=2, stability=None)[0] for s in seeds}
    got, errors = {}, []

    def one(seed):
        try:
            if seed % 2:
                r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=32, seed=seed,
                                                   extra_body=FAST)
                got[seed] = r.choices[0].message.content
            else:
                s = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=32, seed=seed,
                                                   stream=True, extra_body=FAST)
                got[seed] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        except Exception as e:  # reported below, with the seed
            errors.append((seed, e))

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == want


@pytest.fixture
def no_eos(monkeypatch):
    """Random weights can emit an EOS at any canvas; for "long" generations make sure none ends early."""
    monkeypatch.setattr(diffgemma.generation, "eos_ids", lambda model: frozenset())


def long_stream(client):
    # ~250 canvases x 48 steps: minutes of work unless it is cancelled
    return client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4000, stream=True,
                                          extra_body={"steps": 48, "stability": None})


def test_disconnect_mid_stream_frees_the_slot(client, server, no_eos):
    wait_for(lambda: health(server)["queue"]["running"] == 0)
    s = long_stream(client)
    it = iter(s)
    next(it)  # the role chunk
    assert next(it).choices[0].delta.content is not None  # the first committed canvas
    _, _, metrics = http(server, "/metrics")
    cancelled = float(re.search(r"^diffgemma_requests_cancelled_total (\S+)", metrics, re.M).group(1))
    s.close()  # the client goes away mid-generation
    t0 = time.monotonic()
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, seed=1, extra_body=FAST)
    assert r.choices[0].message.content and time.monotonic() - t0 < 5
    wait_for(lambda: health(server)["queue"]["running"] == 0)
    _, _, metrics = http(server, "/metrics")
    assert float(re.search(r"^diffgemma_requests_cancelled_total (\S+)", metrics, re.M).group(1)) == cancelled + 1


def test_queue_full_gives_503(client, server, no_eos):
    streams = [long_stream(client) for _ in range(srv.MAX_BATCH)]
    try:
        wait_for(lambda: health(server)["queue"]["running"] == srv.MAX_BATCH)
        streams += [long_stream(client) for _ in range(QUEUE)]  # these wait behind the running ones
        assert health(server)["queue"] == {"waiting": QUEUE, "running": srv.MAX_BATCH, "capacity": QUEUE}
        with pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16)
        assert ei.value.status_code == 503 and ei.value.response.headers["Retry-After"] == "1"
        assert ei.value.response.json()["error"]["code"] == "queue_full"
    finally:
        for s in streams:
            s.close()
    # waiting clients that leave give their places back at once; the running one stops within a step
    wait_for(lambda: health(server)["queue"] == {"waiting": 0, "running": 0, "capacity": QUEUE})
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, seed=1, extra_body=FAST)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_metrics(client, server):
    client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, seed=1, extra_body=FAST)
    status, headers, text = http(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = dict(re.findall(r"^(diffgemma_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    assert float(values['diffgemma_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 1
    assert float(values['diffgemma_requests_total{endpoint="/v1/chat/completions",status="400"}']) >= 1
    assert float(values["diffgemma_step_ms"]) > 0 and float(values["diffgemma_tokens_per_second"]) > 0
    assert float(values["diffgemma_steps_per_canvas"]) == 2
    assert float(values['diffgemma_canvas_steps_bucket{le="+Inf"}']) == float(values["diffgemma_canvas_steps_count"])
    assert float(values["diffgemma_queue_depth"]) == 0 and float(values["diffgemma_queue_capacity"]) == QUEUE
    assert "# TYPE diffgemma_canvas_steps histogram" in text


# ---- the engine: one request's run, fed its stream's events ---------------------------------------------------


def recorded_job(model, ids, **body):
    """A job as the HTTP side makes it, whose events are kept in .sent instead of going to an asyncio loop."""
    params = GenerationRequest.model_validate(body).params(model.sampler_defaults)
    sent = []
    job = types.SimpleNamespace(ids=ids, p=params, cancelled=threading.Event(), sent=sent, finished=False,
                                put=lambda kind, payload=None: sent.append((kind, payload)))
    return job


def run_jobs(engine, *jobs, timeout=60.0):
    """Submit the jobs to a running engine at once and wait until each has ended."""
    for job in jobs:
        engine.submit(job)
    wait_for(lambda: all(j.finished for j in jobs), timeout)


def test_a_stop_sequence_ends_the_stream_and_reports_its_timings(model):
    ids = model.tokenize("abc")
    text = model.detokenize(model.generate(ids, max_new_tokens=48, seed=8, **FAST).tokens)
    stop = text[20:23]  # inside the second of three canvases
    job = recorded_job(model, ids, max_tokens=48, seed=8, stop=[stop], **FAST)
    run = Run(job, model, srv.Metrics(), model.tokenizer.token_text)
    canvases = []
    with model.stream(run.prompt, **run.stream_kw) as s:  # the engine's loop, with the canvases kept
        for ev in s:
            canvases += [ev] if isinstance(ev, diffgemma.CanvasEvent) else []
            if not run.on_event(ev):
                break
    assert s.generation is None and len(canvases) == 2  # no third canvas was denoised
    done = run.finish(s.generation)
    assert job.sent[-1] == ("done", done) and done["finish_reason"] == "stop" and done["text"] == text[:20]
    want = {k: round(v, 3) for k, v in vars(canvases[-1].timings).items()}
    assert done["diffusion"]["timings"] == want and want["prefill_ms"] > 0 and want["forward_ms"] > 0
    assert [c["steps"] for c in done["diffusion"]["canvases"]] == [2, 2]


def test_finished_runs_report_the_generations_timings(model):
    ids = model.tokenize("abc")
    job = recorded_job(model, ids, max_tokens=20, seed=3, **FAST)
    run = Run(job, model, srv.Metrics(), model.tokenizer.token_text)
    with model.stream(run.prompt, **run.stream_kw) as s:
        assert all(run.on_event(ev) for ev in s)
    done = run.finish(s.generation)
    assert done["diffusion"]["timings"] == {k: round(v, 3) for k, v in vars(s.generation.timings).items()}
    assert done["usage"]["completion_tokens"] == 20 and done["text"] == model.detokenize(s.generation.tokens[:20])


def test_a_cancelled_job_leaves_the_batch_and_the_others_are_undisturbed(model, monkeypatch):
    engine = srv.Engine(model, 4, srv.Metrics(), max_batch=3)
    engine.start()
    try:
        job = recorded_job(model, model.tokenize("abc"), max_tokens=4000, seed=1, stream=True,
                           diffusion_frames=True, steps=48, stability=None)
        put = job.put
        job.put = lambda kind, payload=None: (put(kind, payload), kind == "frame" and job.cancelled.set())
        others = [recorded_job(model, model.tokenize(p), max_tokens=32, seed=s, **FAST)
                  for p, s in (("abc", 1), ("a longer prompt here", 2))]
        run_jobs(engine, job, *others)  # the first client leaves after its first frame; the others share steps
        assert [k for k, _ in job.sent] == ["frame"] and engine.metrics.cancelled == 1
        for j, (p, s) in zip(others, (("abc", 1), ("a longer prompt here", 2)), strict=True):
            kind, done = j.sent[-1]
            assert kind == "done" and done["text"] == expected_text(model, model.tokenize(p), 32, s, **FAST)[0]
        assert engine.depth() == (0, 0)
    finally:
        engine.close()


def test_a_failing_step_is_a_500_and_the_worker_goes_on(model, monkeypatch):
    engine = srv.Engine(model, 1, srv.Metrics())
    engine.start()
    try:
        def broken(*a, **kw):
            raise diffgemma.Error("out of device memory")

        monkeypatch.setattr(model, "denoise_batch", broken)
        jobs = [recorded_job(model, model.tokenize("abc"), max_tokens=16, seed=1, **FAST) for _ in range(2)]
        run_jobs(engine, *jobs)
        for job in jobs:  # both were in the failed pass
            kind, err = job.sent[-1]
            assert kind == "error" and err.status == 500 and "out of device memory" in err.message
        monkeypatch.undo()
        job2 = recorded_job(model, model.tokenize("abc"), max_tokens=16, seed=1, **FAST)
        run_jobs(engine, job2)
        assert job2.sent[-1][0] == "done"
    finally:
        engine.close()


def test_six_concurrent_clients_share_steps_and_get_their_own_answers(client, server, model, monkeypatch):
    sizes = []
    real = model.denoise_batch
    monkeypatch.setattr(model, "denoise_batch", lambda batch: sizes.append(len(batch)) or real(batch))
    prompts = ["Tell me about rivers.", "And mountains?", "abc", "What is the sea?", "Hi", "One more question"]
    answers: dict = {}

    def ask(i):  # half of them stream (SSE per canvas), half wait for the whole answer
        kw = dict(model="tiny", prompt=prompts[i], max_tokens=48, seed=i, extra_body={"steps": 3, "stability": None})
        if i % 2:
            answers[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)
                                 if c.choices)
        else:
            answers[i] = client.completions.create(**kw)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    assert max(sizes) == srv.MAX_BATCH == 4  # four at a time, the other two joined as places freed
    for i, p in enumerate(prompts):
        want, g = expected_text(model, model.tokenize(p), 48, i, steps=3, stability=None)
        if i % 2:
            assert answers[i] == want
        else:
            assert answers[i].choices[0].text == want
            assert answers[i].usage.completion_tokens == min(len(g.tokens), 48)


# ---- the command line ----------------------------------------------------------------------------------------


def test_serve_parser_wiring():
    p = cli.build_parser()  # serve is one of the CLI's subcommands, with the same model flags as the others
    a = p.parse_args(["serve", "-m", "tiny", "--port", "0", "--queue-size", "4", "-c", "512"])
    assert a.fn is cli._cmd_serve and a.model == "tiny" and a.host == "127.0.0.1"
    assert (a.alias, a.shutdown_timeout, a.reasoning_format, a.mmproj, a.verbose) == (None, 10.0, "auto", None, False)
    assert (a.port, a.queue_size, a.n_ctx, a.n_gpu_layers, a.threads) == (0, 4, 512, -1, None)
    assert (a.n_batch, a.kv_type) == (512, "f16")  # the same store flags as generate and chat
    a = p.parse_args(["serve", "-b", "64", "--kv-type", "f32"])
    assert (a.n_batch, a.kv_type) == (64, "f32")
    assert (a.api_key, a.api_key_file, a.log_disable) == (None, None, False)
    a = p.parse_args(["serve", "--api-key", "k1,k2", "--api-key-file", "keys.txt", "--log-disable"])
    assert (a.api_key, a.api_key_file, a.log_disable) == ("k1,k2", "keys.txt", True)


def test_cli_serve_finishes_open_streams_on_sigterm_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
        diffgemma.__file__)), os.environ.get("PYTHONPATH", "")] if p)}
    proc = subprocess.Popen([sys.executable, "-m", "diffgemma.server", "-m", "tiny", "--port", "0", "--n-ctx", "512",
                             "-t", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        s = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=160, seed=4, stream=True,
                                      extra_body={"steps": 6, "stability": None})
        it = iter(s)
        next(it)
        proc.send_signal(signal.SIGTERM)  # graceful: the open stream still runs to the end
        rest = list(it)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
