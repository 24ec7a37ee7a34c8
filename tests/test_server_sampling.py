"""The server's sampling fields and accounting (issue 29, defects 4, 5 and 6; logprobs), driven by the `openai`
client: max_tokens, finish_reason, usage.completion_tokens (the tokens of the returned text, never more than
max_tokens), temperature (0: greedy) and the knobs refused with a 400."""

import pytest

import diffgemma
from diffgemma import server as srv

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

FAST = {"steps": 2, "stability": None}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model(random_tiny):
    with diffgemma.load(random_tiny, threads=1, n_ctx=96) as m:
        yield m


@pytest.fixture(scope="module")
def client(model):
    s = srv.Server(model, port=0, log_level="warning").start()
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    s.stop()


def _covering(model, tokens, text):
    """The fewest leading tokens whose text holds `text`."""
    return next(k for k in range(len(tokens) + 1) if len(model.detokenize(tokens[:k])) >= len(text))


def test_max_tokens_is_the_library_limit(model, client):
    g = model.generate(model.tokenize(PROMPT), max_new_tokens=5, seed=4, **FAST)
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, seed=4, extra_body=FAST)
    assert r.choices[0].text == g.text and r.usage.completion_tokens == len(g.tokens) == 5
    assert r.choices[0].finish_reason == "length"


def test_a_stop_sequence_counts_only_the_returned_tokens(model, client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=32, seed=8, extra_body=FAST)
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 32
    g = model.generate(model.tokenize(PROMPT), max_new_tokens=32, seed=8, **FAST)
    stop = text[:1]  # the very first character: the answer is ''
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == _covering(model, g.tokens, "") == 0
    stop = text[20:23]
    want = text[: text.find(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == want
    assert r.usage.completion_tokens == _covering(model, g.tokens, want) < 32
    chunks = list(client.completions.create(stop=[stop], stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_suffix_counts_the_inserted_tokens(model, client):
    r = client.completions.create(model="m", prompt="The river", suffix=" the sea.", max_tokens=4, seed=2,
                                  extra_body=FAST)
    n = r.usage.completion_tokens
    assert n <= 4 and r.usage.total_tokens == r.usage.prompt_tokens + n
    # the hole's tokens, fillers dropped: what the inserted text is made of
    assert (n == 0) == (r.choices[0].text == "")


def test_chat_with_a_stop_sequence(model, client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me about rivers."}], max_tokens=32, seed=5,
              extra_body=FAST)
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = text.strip()[:1]
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 32


def test_a_full_context_finishes_with_length(model, client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=10_000, seed=1, extra_body=FAST)
    g = model.generate(model.tokenize(PROMPT), max_new_tokens=10_000, seed=1, **FAST)
    assert g.finish_reason in ("context", "eos")
    assert r.choices[0].finish_reason == ("length" if g.finish_reason == "context" else "stop")
    assert r.usage.completion_tokens == len(g.tokens) and r.choices[0].text == g.text


# ---- temperature and the knobs this sampler has no counterpart for (defect 4) ----


def test_temperature_zero_is_deterministic_without_a_seed(model, client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=16, temperature=0, extra_body=FAST)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.model_extra["diffusion"]["seed"] == b.model_extra["diffusion"]["seed"] == 0
    g = model.generate(model.tokenize(PROMPT), max_new_tokens=16, temperature=0, **FAST)
    assert a.choices[0].text == g.text


def test_temperature_scales_the_schedule(model, client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0.5, seed=3, extra_body=FAST)
    g = model.generate(model.tokenize(PROMPT), max_new_tokens=16, temperature=0.5, seed=3, **FAST)
    assert r.choices[0].text == g.text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                          temperature=1.5, seed=3, extra_body=FAST)
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", "warm"), ("temperature", 1e-9), ("temperature", 1e9), ("top_p", 0.9),
    ("top_k", 40), ("min_p", 0.05),
    ("typical_p", 0.5), ("logit_bias", {"50": 10}), ("frequency_penalty", 0.5), ("presence_penalty", -1),
    ("repeat_penalty", 1.1), ("repetition_penalty", 1.2), ("mirostat", 2), ("dynatemp_range", 0.5),
    ("xtc_probability", 0.1), ("dry_multiplier", 0.8), ("top_p", True),
])
def test_sampling_knobs_are_refused_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=4, extra_body={field: value, **FAST})
    err = ei.value.response.json()["error"]
    assert err["param"] == field and field in err["message"]
    if field != "temperature":
        assert err["code"] == "unsupported_parameter" and "temperature" in err["message"]


def test_neutral_knobs_pass(client):
    neutral = {"top_p": 1, "top_k": 0, "min_p": 0, "typical_p": 1.0, "logit_bias": {}, "frequency_penalty": 0,
               "presence_penalty": 0.0, "repeat_penalty": 1, "repetition_penalty": 1, "mirostat": 0,
               "dynatemp_range": 0, "xtc_probability": 0, "dry_multiplier": 0}
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, seed=1, extra_body={**neutral, **FAST})
    assert r.usage.completion_tokens == 4


# ---- logprobs ----


def test_completion_logprobs(model, client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=20, seed=6, logprobs=3, extra_body=FAST)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    g = model.generate(model.tokenize(PROMPT), max_new_tokens=20, seed=6, logprobs=3, **FAST)
    assert r.choices[0].text == g.text and len(lp.tokens) == r.usage.completion_tokens == 20
    assert lp.tokens == [model.tokenizer.token_text(t) for t in g.tokens]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in g.logprobs], abs=1e-5)
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[chosen] == pytest.approx(value) and 1 <= len(top) <= 4 and all(v <= 0 for v in top.values())
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for i, offset in enumerate(lp.text_offset):  # exact up to the first character split over byte tokens
        if "\ufffd" in model.detokenize(g.tokens[:i]):
            break
        assert offset == len(model.detokenize(g.tokens[:i]))
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    streamed = [c.logprobs for c in chunks if c.logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs)
    plain = client.completions.create(**{**kw, "logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].text == g.text


def test_chat_logprobs(model, client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me about rivers."}], max_tokens=20, seed=6,
              logprobs=True, top_logprobs=2, extra_body=FAST)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs]
    assert [e.token for s in streamed for e in s.content] == [e.token for e in content]
    only = client.chat.completions.create(**{**kw, "top_logprobs": None})
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)


def test_logprobs_with_a_stop_sequence_cover_the_returned_text(client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=32, seed=8, extra_body=FAST)
    text = client.completions.create(**kw).choices[0].text
    r = client.completions.create(stop=[text[20:23]], logprobs=1, **kw)
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens < 32


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "template": "A {{hole 2}}"}, "logprobs"),
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"logprobs": 2, "suffix": " end."}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
])
def test_bad_logprobs_requests(client, endpoint, body, param):
    with pytest.raises(openai.BadRequestError) as ei:
        if endpoint == "chat":
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body=body)
        else:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=4, extra_body=body)
    assert ei.value.response.json()["error"]["param"] == param
