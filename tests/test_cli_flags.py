"""The command line's flags (issue 29, defect 7): no abbreviations (`--temp` is never `--template`, `-hf` never
`-h`), llama.cpp's spellings as aliases of ours, --temp scaling the temperature schedule, the prompt from -f."""

import argparse
import json

import pytest

import diffgemma as dg
from diffgemma import cli

FAST = ["-n", "4", "--steps", "1", "--seed", "3"]


def _parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


def _parsers():
    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return [top, *sub.choices.values()]


def test_no_parser_accepts_abbreviations(capsys):
    assert all(p.allow_abbrev is False for p in _parsers())
    a = _parse("generate", "hi", "--temp", "0.5")
    assert a.temperature == 0.5 and a.template is None  # was --template 0.5
    for argv in (["generate", "hi", "--tem", "0.5"], ["generate", "hi", "--templ", "t.txt"],
                 ["chat", "--sys", "be brief"], ["quantize", "a", "b", "--recip", "q8_0"], ["--vers"]):
        with pytest.raises(SystemExit) as ei:
            _parse(*argv)
        assert ei.value.code == 2, argv
    assert "unrecognized arguments: --tem" in capsys.readouterr().err


@pytest.mark.parametrize("argv, dest, value", [
    (["generate", "hi", "-c", "640"], "n_ctx", 640),
    (["generate", "hi", "--ctx-size", "640"], "n_ctx", 640),
    (["generate", "hi", "--n-ctx", "640"], "n_ctx", 640),
    (["serve", "--ctx-size", "640"], "n_ctx", 640),
    (["chat", "-b", "64"], "n_batch", 64),
    (["chat", "--batch-size", "64"], "n_batch", 64),
    (["chat", "--n-batch", "64"], "n_batch", 64),
    (["generate", "hi", "-ngl", "0"], "n_gpu_layers", 0),
    (["generate", "hi", "--gpu-layers", "0"], "n_gpu_layers", 0),
    (["generate", "hi", "--n-gpu-layers", "0"], "n_gpu_layers", 0),
    (["serve", "--gpu-layers", "0"], "n_gpu_layers", 0),
    (["bench", "--gpu-layers", "0"], "n_gpu_layers", 0),
    (["imatrix", "--text", "x", "-o", "o.gguf", "--gpu-layers", "0"], "n_gpu_layers", 0),
    (["validate", "tiny", "--gpu-layers", "0"], "n_gpu_layers", 0),
    (["generate", "hi"], "flash_attn", "auto"),
    (["generate", "hi", "-fa"], "flash_attn", "on"),
    (["generate", "hi", "-fa", "off"], "flash_attn", "off"),
    (["serve", "--flash-attn", "on"], "flash_attn", "on"),
    (["generate", "-f", "p.txt"], "file", "p.txt"),
    (["generate", "--file", "p.txt"], "file", "p.txt"),
    (["chat", "-sys", "be brief"], "system", "be brief"),
    (["chat", "--system-prompt", "be brief"], "system", "be brief"),
    (["chat", "--system", "be brief"], "system", "be brief"),
    (["chat", "--temp", "0.7"], "temperature", 0.7),
    (["serve", "-np", "2"], "max_batch", 2),
])
def test_llama_cpp_spellings_are_aliases(argv, dest, value):
    assert getattr(_parse(*argv), dest) == value


@pytest.mark.parametrize("cmd", [["generate"], ["chat"], ["serve"], ["bench"], ["imatrix", "--text", "x", "-o", "o"]])
def test_hf_is_not_help(capsys, cmd):
    a = _parse(*cmd, "-hf", "unsloth/some-GGUF:Q4_K_M")  # was: -h with 'f' (--help in generate)
    assert a.hf_repo == "unsloth/some-GGUF:Q4_K_M"
    assert "usage:" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["-1", "nan", "1000"])
def test_temp_out_of_range_is_an_error(capsys, random_tiny, bad):
    assert cli.main(["generate", "hi", "-m", str(random_tiny), *FAST, "--temp", bad]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("generate", "hi", "--temp", "x")


def test_temp_scales_the_files_schedule(monkeypatch, random_tiny):
    seen = []
    real = dg.Model.stream

    def stream(self, prompt, **kw):
        seen.append(kw)
        return real(self, prompt, **kw)

    monkeypatch.setattr(dg.Model, "stream", stream)
    assert cli.main(["generate", "hi", "-m", str(random_tiny), *FAST, "--temp", "0.5"]) == 0
    assert seen[0]["temperature"] == 0.5  # generate's own keyword: one meaning for Python, CLI and server
    with dg.load(random_tiny) as m:  # the schedule's first step runs at the scaled t_max
        temps = []
        m.generate("hi", max_new_tokens=4, steps=2, stability=None, seed=0, temperature=0.5,
                   on_step=lambda ev: temps.append(ev.temperature))
        assert temps[0] == pytest.approx(m.sampler_defaults.t_max / 2)


def test_flash_attn_reaches_the_model(random_tiny):
    for flag, want in (("off", False), ("on", True)):
        with cli._load(_parse("generate", "hi", "-m", random_tiny, "-fa", flag)) as m:
            assert m.flash is want


def test_prompt_from_a_file(capsys, tmp_path, random_tiny):
    p = tmp_path / "prompt.txt"
    p.write_text("To be, or not to be")
    args = ["generate", "-m", str(random_tiny), *FAST, "--json"]
    assert cli.main([*args, "-f", str(p)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "-p", "To be, or not to be"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == from_file["tokens"]
    assert cli.main([*args, "-f", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read the prompt file" in capsys.readouterr().err
    for twice in (["-p", "a", "-f", str(p)], ["a", "-p", "b"]):  # one prompt, never one silently dropped
        assert cli.main([*args, *twice]) == 2
        assert "the prompt is given twice" in capsys.readouterr().err


def test_list_devices_at_the_top_level(capsys):
    assert cli.main(["--list-devices"]) == 0  # llama.cpp's spelling, no command needed
    assert "CPU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ei:
        cli.main([])
    assert ei.value.code == 2 and "give a COMMAND" in capsys.readouterr().err


def test_an_unknown_flag_gets_the_commands_own_usage(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["generate", "x", "--tem", "0"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "usage: diffgemma generate" in err and "unrecognized arguments: --tem 0" in err


def test_json_with_stats_prints_the_stats_line(capsys, random_tiny):
    assert cli.main(["generate", "hi", "-m", str(random_tiny), *FAST, "-n", "8", "--json", "--stats"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("{") and "tokens/s" in out.err
