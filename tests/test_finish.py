"""max_new_tokens is a limit everywhere (Python, stream, batch, CLI) and Generation.finish_reason says why a
generation ended (issue 29, defect 5)."""

import json

import pytest
from test_generate import _peaked

import diffgemma as dg
from diffgemma import cli, testing

FAST = {"steps": 2, "stability": None}


def test_max_new_tokens_cuts_the_canvas(model):
    whole = model.generate("The quick brown fox", max_new_tokens=16, seed=3, **FAST)
    assert len(whole.tokens) == 16 and whole.finish_reason == "length"  # one canvas of 16
    g = model.generate("The quick brown fox", max_new_tokens=4, seed=3, **FAST)
    assert g.tokens == whole.tokens[:4]  # the same canvas, cut
    assert g.text == model.detokenize(g.tokens)
    assert g.finish_reason == "length" and len(g.canvases) == 1
    g = model.generate("The quick brown fox", max_new_tokens=20, seed=3, **FAST)
    assert len(g.tokens) == 20 and len(g.canvases) == 2 and g.tokens[:16] == whole.tokens


def test_stream_and_batch_are_cut_the_same_way(model):
    g = model.generate("The quick brown fox", max_new_tokens=21, seed=5, **FAST)
    with model.stream("The quick brown fox", max_new_tokens=21, seed=5, **FAST) as s:
        canvases = [ev for ev in s if isinstance(ev, dg.CanvasEvent)]
    assert [len(ev.tokens) for ev in canvases] == [16, 5]
    assert "".join(ev.text_delta for ev in canvases) == g.text == s.generation.text
    assert [ev.finish_reason for ev in canvases] == [None, "length"]
    batch = model.generate_batch(["The quick brown fox", "A river"], max_new_tokens=[21, 3], seed=[5, 6], **FAST)
    assert batch[0].tokens == g.tokens and len(batch[1].tokens) == 3
    assert [b.finish_reason for b in batch] == ["length", "length"]


def test_context_end_is_reported(random_tiny):
    with dg.load(random_tiny, threads=1, n_ctx=64) as m:
        g = m.generate("The quick brown fox", max_new_tokens=10**9, seed=1, steps=1, stability=None)
    n_prompt = g.prompt_tokens
    assert len(g.canvases) == (64 - n_prompt) // 16
    assert g.finish_reason == "context" and len(g.tokens) == 16 * len(g.canvases)


def test_eos_and_template_reasons(tmp_path, model):
    with dg.load(_peaked(tmp_path, target=testing.EOS)) as m:
        g = m.generate([2, 50, 51], max_new_tokens=64, steps=3, seed=0)
    assert g.finish_reason == "eos" and g.tokens == [testing.EOS]
    g = model.generate("", template="Name: {{hole 3}}.", seed=1, **FAST)
    assert g.finish_reason == "stop"


def test_chat_reply_maps_the_reason(model):
    r = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=3, seed=2, **FAST)
    assert len(r.generation.tokens) <= 3
    assert r.finish_reason == {"eos": "stop", "length": "length"}[r.generation.finish_reason]


def test_cli_generate_n_is_a_limit(random_tiny, capsys):
    assert cli.main(["generate", "-m", str(random_tiny), "-t", "1", "-p", "The quick brown fox", "-n", "4",
                     "--seed", "3", "--steps", "2", "--no-chat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 4 and out["finish_reason"] == "length"


def test_minus_one_means_until_eos_or_a_full_context(random_tiny):
    """llama.cpp's -n -1: no limit of its own; generation ends at an EOS or when the context is full."""
    with dg.load(random_tiny, threads=1, n_ctx=96) as m:
        g = m.generate("The quick brown fox", max_new_tokens=-1, seed=3, **FAST)
        assert g.finish_reason in ("eos", "context")
        assert g.prompt_tokens + len(g.tokens) <= m.n_ctx
        if g.finish_reason == "context":  # every canvas the context holds was generated
            assert len(g.tokens) == (m.n_ctx - g.prompt_tokens) // m.hparams.canvas_length * m.hparams.canvas_length
        with pytest.raises(dg.Error, match="-1 for no limit"):
            m.generate("x", max_new_tokens=-2)
    assert cli.main(["generate", "hi", "-m", str(random_tiny), "-t", "1", "-n", "-1", "--steps", "2", "-c", "96"]) == 0


def test_random_seeds_fit_32_bits_and_huge_seeds_are_refused(model):
    from diffgemma.generation import resolve_seed

    assert all(0 <= resolve_seed(None) < 2**32 for _ in range(20))
    with pytest.raises(dg.Error, match="2\\*\\*64"):
        model.generate("x", seed=2**64, max_new_tokens=4, **FAST)
