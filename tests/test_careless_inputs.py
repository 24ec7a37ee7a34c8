"""Careless inputs found by a new-user trial of the whole package: each is a clear dg.Error or just works."""

import numpy as np
import pytest

import diffgemma as dg


@pytest.fixture(scope="module")
def m(random_tiny):
    with dg.load(random_tiny, threads=1) as model:
        yield model


def test_text_only_content_parts_are_plain_text(m):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "hello there"}]
    kw = dict(max_new_tokens=16, steps=3, seed=5)
    assert m.generate(parts, **kw).tokens == m.generate(plain, **kw).tokens
    assert m.chat(parts, **kw).generation.tokens == m.chat(plain, **kw).generation.tokens


def test_image_parts_without_a_tower_are_an_error(m):
    msg = [{"role": "user", "content": [{"type": "image", "image": np.zeros((8, 8, 3), np.uint8)}]}]
    with pytest.raises(dg.Error, match="vision tower"):
        m.generate(msg, max_new_tokens=8, steps=2)
    with pytest.raises(dg.Error, match="vision tower"):
        m.chat(msg, max_new_tokens=8, steps=2)


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate("x", on_prefill=5, max_new_tokens=8), "on_prefill must be callable"),
    (lambda m: m.generate("x", on_step="no", max_new_tokens=8), "on_step must be callable"),
    (lambda m: m.chat([{"role": "user", "content": "x"}], template_kwargs="x"), "template_kwargs must be a dict"),
])
def test_bad_callbacks_and_kwargs(m, call, match):
    with pytest.raises(dg.Error, match=match):
        call(m)


@pytest.mark.parametrize("kw, match", [
    (dict(n_ctx=8192), "above the file's context length 4096"),
    (dict(threads="a"), "threads must be an int"),
    (dict(threads=True), "threads must be an int"),
])
def test_load_arguments(random_tiny, kw, match):
    with pytest.raises(dg.Error, match=match):
        dg.load(random_tiny, **kw)


@pytest.mark.parametrize("path", [123, None, ""])
def test_load_needs_a_path(path):
    with pytest.raises(dg.Error, match="model must be a GGUF file path"):
        dg.load(path)


def test_huge_n_batch_is_capped_at_the_context_and_kv_type_is_case_insensitive(random_tiny):
    with dg.load(random_tiny, n_batch=10**7, kv_type="F16", threads=1) as model:
        assert model.n_batch == model.n_ctx and model.kv_type == "f16"


@pytest.mark.parametrize("text", [None, 123, b"<|tool_call>", ["x"]])
def test_parse_chat_output_needs_text(text):
    with pytest.raises(dg.Error, match="a str"):
        dg.parse_chat_output(text)


def test_quantize_takes_llama_ftype_numbers(random_tiny, tmp_path):
    by_number = dg.quantize(random_tiny, tmp_path / "a.gguf", recipe=15, dry_run=True, progress=False)
    by_name = dg.quantize(random_tiny, tmp_path / "a.gguf", recipe="Q4_K_M", dry_run=True, progress=False)
    assert by_number.census == by_name.census


@pytest.mark.parametrize("kw, match", [
    (dict(dst=None, recipe="Q4_K_M"), "dst must be an output file path"),
    (dict(recipe="Q4_K_M", imatrix=123), "imatrix must be"),
    (dict(recipe=3.5), "expected a recipe name or a list"),
])
def test_quantize_argument_types(random_tiny, tmp_path, kw, match):
    kw = {"dst": tmp_path / "out.gguf", **kw}
    with pytest.raises(dg.Error, match=match):
        dg.quantize(random_tiny, kw.pop("dst"), dry_run=True, progress=False, **kw)
