"""Small things a llama.cpp user tripped on (issue 29, items 9 and 10): each is now an error that says what is
wrong, or does what the user meant."""

import ast
import io
import json
import pathlib
import shutil

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import bench, cli, imatrix_file
from diffgemma.cli_display import LiveCanvas
from diffgemma.generation import StepEvent

FAST = ["-n", "8", "--steps", "2", "--seed", "3"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("content", ['{"bad": 1}', "[]", '{"tools": []}', "null"])
def test_chat_tools_file_without_tools_is_an_error(capsys, tmp_path, content):
    f = tmp_path / "tools.json"
    f.write_text(content)
    rc, _, err = _run(capsys, "chat", "--tools", f)
    assert rc == 2 and f"--tools: {f}: no tools in it" in err


def test_image_budget_without_an_image_is_an_error(capsys, random_tiny):
    rc, _, err = _run(capsys, "generate", "hi", "-m", random_tiny, *FAST, "--image-budget", "70")
    assert rc == 2 and "--image-budget" in err and "no --image" in err
    rc, _, err = _run(capsys, "chat", "-m", random_tiny, "--image-budget", "70")
    assert rc == 2 and "--image-budget" in err and "--mmproj" in err
    assert cli.build_parser().parse_args(["generate", "hi"]).image_budget is None  # given or not: it is known


def test_generate_dash_reads_the_prompt_from_stdin(capsys, monkeypatch, random_tiny):
    rc, out, _ = _run(capsys, "generate", "-p", "ROMEO: speak", "-m", random_tiny, *FAST, "--json")
    want = json.loads(out)["tokens"]
    monkeypatch.setattr("sys.stdin", io.StringIO("ROMEO: speak"))
    rc, out, _ = _run(capsys, "generate", "-", "-m", random_tiny, *FAST, "--json")
    assert rc == 0 and json.loads(out)["tokens"] == want
    monkeypatch.setattr("sys.stdin", io.StringIO("x"))
    rc, _, err = _run(capsys, "generate", "-", "--template", "-", "-m", random_tiny)
    assert rc == 2 and "standard input" in err


def test_info_describes_an_imatrix_file(capsys, tmp_path, random_tiny):
    out = tmp_path / "im.gguf"
    dg.imatrix(random_tiny, "to be or not to be " * 40, out, chunks=2, progress=False)
    data = imatrix_file.load(out)
    legacy = data.save(tmp_path / "im.dat")
    rc, text, err = _run(capsys, "info", out)
    assert rc == 0, err
    assert "importance matrix (GGUF" in text and f"entries       {len(data)} weights" in text
    assert f"chunks        2 of {data.chunk_size} tokens" in text and "coverage min" in text
    rc, text, _ = _run(capsys, "info", out, "--json")
    d = json.loads(text)
    assert rc == 0 and d["type"] == "imatrix" and d["entries"] == len(data) and d["chunk_count"] == 2
    assert d["datasets"] == data.datasets and 0 < d["expert_coverage_min"] <= 1
    rc, text, _ = _run(capsys, "info", legacy)
    assert rc == 0 and "legacy .dat" in text and f"{len(data)} weights" in text
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x01\x00")
    rc, _, err = _run(capsys, "info", bad)
    assert rc == 2 and "Traceback" not in err


def _step(text: str) -> StepEvent:
    ids = np.arange(4)
    return StepEvent(canvas_index=11, step=47, steps=48, temperature=0.812, accepted=123, mean_entropy=1.2345,
                     argmax=ids, detokenize=lambda _: text)


def test_visual_status_line_fits_a_narrow_terminal(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: shutil.os.terminal_size((30, 10)))
    out = io.StringIO()
    live = LiveCanvas(out)
    live.show(_step("word " * 20))
    first = out.getvalue()
    lines = first.removeprefix("\x1b[?2026h\x1b[J").removesuffix("\n\x1b[?2026l").split("\n")
    assert lines[0].startswith("canvas 12  step 47/48") and len(lines) == live.lines
    assert all(len(ln) <= 29 for ln in lines), lines  # none wraps: the repaint moves up by the lines it wrote
    live.show(_step("word " * 20))
    assert out.getvalue()[len(first):].startswith(f"\x1b[?2026h\x1b[{len(lines)}F\x1b[J")


def test_dir_of_the_package_is_its_public_api():
    names = set(dir(dg))
    assert names == set(dg.__all__)
    assert not names & {"Any", "Callable", "os", "threading", "annotations"}
    assert all(hasattr(dg, n) for n in dg.__all__)


def test_validate_says_how_the_prompts_were_given(random_tiny):
    plain = bench.validate("tiny", max_new_tokens=4, progress=False, prompts={"one": "hi"})  # no chat template
    assert "prompts as plain text (no chat template)." in plain
    templated = bench.validate(random_tiny, max_new_tokens=4, progress=False, prompts={"one": "hi"})
    assert "prompts through its chat template." in templated
    both = bench.validate(random_tiny, "tiny", max_new_tokens=4, progress=False, prompts={"one": "hi"})
    assert "`tiny.gguf` through its chat template, `shakespeare.gguf` as plain text (no chat template)." in both


def test_readme_json_template_fills_the_name_without_spaces():
    """The README's template example (docs/templates.md: a hole after '"' starts with a space unless told)."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "template=" in ln and "name" in ln)
    text = ast.literal_eval(line.split("template=", 1)[1].rsplit(")", 1)[0])  # the string literal as written
    with dg.load("tiny") as m:
        for seed in range(4):
            g = m.generate("", template=text, seed=seed)
            doc = json.loads(g.text)
            assert doc["name"] and doc["name"] == doc["name"].strip() and isinstance(doc["year"], int), g.text
