"""The web view with a template: fixed text and holes drawn differently while denoising, the filled template
as the final text. Skipped like test_webview.py (needs /usr/bin/chromium and playwright)."""

import time

from test_webview import page, server  # noqa: F401  (fixtures)

import diffgemma


def test_template_fixed_text_and_holes_while_denoising(server, page, monkeypatch):  # noqa: F811
    model = server.app.state.engine.model
    step = model.denoise_batch

    def slow_step(*a, **kw):  # slow enough to look at a canvas mid-denoising
        time.sleep(0.05)
        return step(*a, **kw)

    monkeypatch.setattr(model, "denoise_batch", slow_step)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-meta').textContent.includes('canvas 16')")
    page.fill("#prompt", "")
    page.check("#raw")  # a raw completion: the template follows BOS alone, as generate("", template=...)
    page.fill("#template", "The quick brown fox{{hole 20 words}} jumps over the lazy dog.")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_selector("#canvas .tok.hole", timeout=30_000)
    assert page.locator("#canvas .tok.fixed").count() > 0
    fixed_text = "".join(page.locator("#canvas .tok.fixed").all_text_contents())
    assert "quick" in fixed_text  # the fixed pieces are the template's text
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30_000)
    text = page.text_content("#committed")
    lay = diffgemma.template.lay_out(model, "The quick brown fox{{hole 20 words}} jumps over the lazy dog.")
    want = model.generate("", template=lay, steps=4, seed=3)
    assert text == want.text and text.startswith("The quick brown fox") and text.endswith("lazy dog.")
    assert page.text_content("#finish") == "stop" and page.text_content("#error") == ""
    assert int(page.text_content("#hole-count")) > 0
