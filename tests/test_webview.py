"""The web view at `/`: headless Debian chromium (driven by Playwright) types a prompt, watches the canvas
denoise frame by frame and reads the final text and stats. Skipped without /usr/bin/chromium or playwright."""

import json
import os
import pathlib
import time
import urllib.request

import pytest

import diffgemma

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffgemma import server as srv  # noqa: E402


@pytest.fixture(scope="module")
def server(random_tiny):
    m = diffgemma.load(random_tiny, threads=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffgemma.generation, "eos_ids", lambda model: frozenset())  # random weights: no early EOS
        s = srv.Server(m, port=0, log_level="warning").start()
        yield s
        s.stop()
    m.close()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 800})
        yield pg
        browser.close()


def test_prompt_frames_final_text_and_stats(server, page, tmp_path):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-meta').textContent.includes('canvas 16')")
    page.fill("#prompt", "Write a haiku about rivers.")
    page.fill("#max-tokens", "48")
    page.fill("#steps", "6")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30_000)
    # 3 canvases x up to 6 steps: at least one frame per canvas, never more than the step budget allows
    frames = int(page.text_content("#frame-count"))
    assert 3 <= frames <= 18
    text = page.text_content("#committed")
    assert text.strip()
    chips = page.locator("#chips .chip").all_text_contents()
    assert len(chips) == 3 and all(1 <= int(c) <= 6 for c in chips)
    assert float(page.text_content("#ms-step")) > 0 and float(page.text_content("#tok-s")) > 0
    assert page.text_content("#finish") in ("stop", "length")
    assert page.text_content("#seed-used") == "7"
    assert page.text_content("#error") == ""
    shot = pathlib.Path(tmp_path) / "webview.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("DIFFGEMMA_WEBVIEW_SHOT"):  # handy for looking at the page by hand
        page.screenshot(path=os.environ["DIFFGEMMA_WEBVIEW_SHOT"], full_page=True)


def test_stop_button_cancels_and_errors_are_shown(server, page, monkeypatch):
    model = server.app.state.engine.model
    step = model.denoise_batch

    def slow_step(*a, **kw):  # the tiny model is too quick to catch mid-generation (or may hit an EOS early)
        time.sleep(0.02)
        return step(*a, **kw)

    monkeypatch.setattr(model, "denoise_batch", slow_step)
    monkeypatch.setattr(diffgemma.generation, "eos_ids", lambda model: frozenset())  # no early end either
    page.goto(server.url + "/")
    page.fill("#prompt", "A long story.")
    page.fill("#max-tokens", "3000")
    page.fill("#steps", "48")
    page.click("#generate")
    page.wait_for_function("Number(document.getElementById('frame-count').textContent) > 0", timeout=30_000)
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    # the server gives the model back within a step or so
    deadline = time.monotonic() + 10
    while json.load(urllib.request.urlopen(server.url + "/health"))["queue"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.fill("#entropy-bound", "0")  # passes the form's own checks, not the server's: its 400 is shown
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent === 'error'")
    assert "HTTP 400" in page.text_content("#error") and "entropy_bound" in page.text_content("#error")


def test_a_server_with_an_api_key_asks_for_it_once(server, page):
    model = server.app.state.engine.model
    with srv.Server(model, port=0, log_level="warning", api_key="sesame") as guarded:
        asked = []

        def answer(dialog):  # the page's prompt for the key
            asked.append(dialog.message)
            dialog.accept("sesame")

        page.on("dialog", answer)
        try:
            page.goto(guarded.url + "/")
            page.evaluate("localStorage.removeItem('diffgemma-api-key')")
            for _ in range(2):  # the second run sends the kept key without asking
                page.fill("#prompt", "Hi")
                page.fill("#max-tokens", "16")
                page.fill("#steps", "2")
                page.click("#generate")
                page.wait_for_function("['done', 'error'].includes(document.getElementById('status').textContent)",
                                       timeout=30_000)
                assert page.text_content("#status") == "done", page.text_content("#error")
        finally:
            page.remove_listener("dialog", answer)
        assert len(asked) == 1 and "API key" in asked[0]
