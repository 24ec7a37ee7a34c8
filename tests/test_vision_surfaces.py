"""Images through the surfaces: `diffgemma generate --image`, chat `/image`, `info` on an mmproj, the server's
image_url parts (data: URLs only) and the web view's attached picture. A random tower on the random tiny model."""

import base64
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import diffgemma
from diffgemma import cli, testing

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from diffgemma import server as srv  # noqa: E402

FAST = ["-n", "16", "--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def files(random_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("vision-surfaces")
    mm = testing.write_random_mmproj(d / "mmproj.gguf", diffgemma.load(random_tiny).hparams.n_embd)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "a.png").write_bytes(buf.getvalue())
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return random_tiny, mm, d


def test_info_describes_an_mmproj(files, capsys):
    _, mm, _ = files
    assert cli.main(["info", str(mm)]) == 0
    out = capsys.readouterr().out
    assert "projector gemma4v" in out and "projects to text width 64" in out
    assert cli.main(["info", str(mm), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2


def test_generate_with_images(files, capsys):
    model, mm, d = files
    args = ["generate", "-m", str(model), "--mmproj", str(mm), *FAST, "--json"]
    assert cli.main([*args, "--image-budget", "70", "--image", str(d / "a.png"), "--image", str(d / "a.png"), "-p",
                     "Describe."]) == 0
    with_image = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "-p", "Describe."]) == 0
    without = json.loads(capsys.readouterr().out)
    assert with_image["tokens"] != without["tokens"]  # the picture reached the canvas
    assert cli.main([*args, "--image", str(d / "bad.png"), "-p", "x"]) == 2
    assert f"cannot read the image {d / 'bad.png'}: " in capsys.readouterr().err  # the file is named
    assert cli.main(["generate", "-m", str(model), *FAST, "--image", str(d / "a.png"), "-p", "x"]) == 2
    assert "--mmproj" in capsys.readouterr().err


def test_chat_image_command(files, capsys, monkeypatch):
    model, mm, d = files
    lines = iter([f"/image {d / 'missing.png'}", f"/image {d / 'a.png'}", "What is it?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert cli.main(["chat", "-m", str(model), "--mmproj", str(mm), *FAST, "--image-budget", "70"]) == 0
    err = capsys.readouterr().err
    assert "cannot use" in err and f"attached {d / 'a.png'}" in err


def _post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(files):
    model, mm, _ = files
    m = diffgemma.load(model, mmproj=mm, threads=1)
    s = srv.Server(m, port=0, log_level="warning").start()
    yield s
    s.stop()
    m.close()


def _msg(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]


def test_server_image_url(files, server):
    _, _, d = files
    data = "data:image/png;base64," + base64.b64encode((d / "a.png").read_bytes()).decode()
    fast = {"max_tokens": 16, "steps": 2, "seed": 1, "image_budget": 70}
    status, body = _post(server.url, {"messages": _msg(data), **fast})
    assert status == 200 and body["usage"]["prompt_tokens"] > 20  # the soft tokens count as prompt
    for url, why in (("https://example.com/cat.png", "does not fetch remote URLs"),
                     ("data:image/png;base64,!!!", "not valid base64"),
                     ("data:image/png;base64," + base64.b64encode(b"garbage").decode(),
                      "cannot read the image: not in a format Pillow knows")):
        status, body = _post(server.url, {"messages": _msg(url), **fast})
        assert status == 400 and why in body["error"]["message"]
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        assert json.loads(r.read())["vision"] is True


CHROMIUM = "/usr/bin/chromium"


def test_web_view_shows_and_sends_the_image(files, server):
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    _, _, d = files
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("!document.getElementById('image-row').hidden")
        page.set_input_files("#image", str(d / "a.png"))
        page.wait_for_function("!document.getElementById('image-preview').hidden")
        assert page.get_attribute("#image-preview", "src").startswith("data:image/png;base64,")
        page.fill("#prompt", "What is it?")
        page.fill("#max-tokens", "16")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        assert page.text_content("#error") == ""
        browser.close()
