"""dg.SamplerSettings: reference defaults, the file's values, replace/override, validation, and the CLI flags and
server fields derived from its fields."""

from __future__ import annotations

import dataclasses

import pytest

import diffgemma as dg
from diffgemma import cli, cli_flags, layout, sampler, server, testing
from diffgemma.server import protocol

REFERENCE = {"steps": 48, "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1, "stability": 1, "confidence": 0.005}
FILE_KEYS = {"diffusion.eb_max_steps": 3, "diffusion.eb_t_min": 0.3, "diffusion.eb_t_max": 0.9,
             "diffusion.eb_entropy_bound": 0.2, "diffusion.eb_stability_threshold": 100,
             "diffusion.eb_confidence_threshold": 0.01}


@pytest.fixture(scope="module")
def own_settings(tmp_path_factory):
    """A tiny model whose file stores its own sampler settings (a stability no canvas reaches: no early stop)."""
    path = tmp_path_factory.mktemp("sampler") / "own.gguf"
    return testing.write_model(path, testing.tiny_hparams(), extra_metadata=FILE_KEYS)


def test_reference_defaults_are_the_spec_table():
    assert dataclasses.asdict(dg.SamplerSettings()) == REFERENCE  # spec §7.1, the released checkpoint's too
    assert dg.SamplerSettings.from_metadata({}) == dg.SamplerSettings()
    assert not {f.name for f in dataclasses.fields(dg.HParams)} & set(REFERENCE)  # HParams: architecture only


def test_file_values_are_the_models_defaults(own_settings, random_tiny):
    with dg.load(own_settings) as m:
        assert m.sampler_defaults == dg.SamplerSettings(steps=3, t_min=0.3, t_max=0.9, entropy_bound=0.2,
                                                        stability=100, confidence=0.01)
        g = m.generate("hi", max_new_tokens=16, seed=0)
        assert [c.steps for c in g.canvases] == [3]  # the file's step budget, no early stop
        events = []
        m.generate("hi", max_new_tokens=16, seed=0, on_step=events.append)
        assert events[0].temperature == pytest.approx(0.9)  # the file's t_max
    with dg.load(random_tiny) as m:
        assert m.sampler_defaults == dg.SamplerSettings()  # written with the reference settings


def test_float32_keys_read_back_as_written():
    s = dg.SamplerSettings.from_metadata({"diffusion.eb_t_min": 0.30000001192092896, "diffusion.eb_max_steps": 7})
    assert (s.t_min, s.steps) == (0.3, 7)
    assert dg.SamplerSettings.from_metadata(s.to_metadata()) == s


def test_replace_validates_and_names_unknown_settings():
    s = dg.SamplerSettings()
    r = s.replace(steps=5, stability=None)
    assert (r.steps, r.stability, s.steps) == (5, None, 48)
    with pytest.raises(dg.Error, match="unknown sampler setting.*stepz.*steps, t_min"):
        s.replace(stepz=5)
    with pytest.raises(dg.Error, match="t_min < t_max"):
        s.replace(t_min=0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3  # type: ignore[misc]


def test_override_keeps_none_and_from_file():
    """generate()'s convention: None keeps a value; for stability/confidence FROM_FILE keeps, None is 'off'."""
    s = dg.SamplerSettings(steps=9)
    assert s.override(steps=None, t_min=None, stability=dg.FROM_FILE, confidence=dg.FROM_FILE) == s
    off = s.override(stability=None)
    assert off.stability is None and off.confidence == 0.005
    assert s.override(steps=4, confidence=0.5) == s.replace(steps=4, confidence=0.5)


@pytest.mark.parametrize("kw,msg", [
    ({"steps": 0}, "steps must be a positive int"), ({"steps": 2.0}, "steps must be a positive int"),
    ({"steps": True}, "steps"), ({"t_min": float("nan")}, "t_min must be a finite number"),
    ({"t_max": "hot"}, "t_max must be a finite number"), ({"t_min": 0.8, "t_max": 0.8}, r"0 <= t_min < t_max"),
    ({"t_min": -0.1}, r"0 <= t_min < t_max"), ({"entropy_bound": 0}, "entropy_bound must be > 0"),
    ({"stability": -1}, "stability must be an int >= 0 or None"), ({"stability": 1.5}, "stability"),
    ({"confidence": 0}, "confidence must be a number > 0 or None"), ({"confidence": True}, "confidence"),
])
def test_validation_errors(kw, msg):
    with pytest.raises(dg.Error, match=msg):
        dg.SamplerSettings(**kw)


def test_every_problem_is_listed():
    with pytest.raises(dg.Error, match="steps.*; entropy_bound.*; confidence"):
        dg.SamplerSettings(steps=0, entropy_bound=-1, confidence=-1)


def test_bad_file_values_fail_at_load(tmp_path):
    path = testing.write_model(tmp_path / "bad.gguf", testing.tiny_hparams(),
                               extra_metadata={"diffusion.eb_max_steps": 0, "diffusion.eb_t_min": "cold"})
    with pytest.raises(dg.GGUFError, match="diffusion.eb_t_min has a non-numeric value"):
        dg.load(path)
    md = {**layout.hparams_to_metadata(testing.tiny_hparams()), "diffusion.eb_max_steps": 0,
          "tokenizer.ggml.tokens": ["x"] * 512}
    assert any("steps must be a positive int" in p for p in layout.hparams_from_metadata(md)[1])


def test_sampler_keyword_and_explicit_keywords_over_it(random_tiny):
    base = dg.SamplerSettings(steps=2, stability=None)
    with dg.load(random_tiny) as m:
        g = m.generate("hi", max_new_tokens=32, seed=1, sampler=base)
        assert [c.steps for c in g.canvases] == [2, 2]
        assert [c.steps for c in m.generate("hi", max_new_tokens=16, seed=1, sampler=base, steps=3).canvases] == [3]
        assert g.tokens == m.generate("hi", max_new_tokens=32, seed=1, steps=2, stability=None).tokens
        s = dg.stream("hi", model=m, max_new_tokens=16, seed=1, sampler=base)
        assert sum(isinstance(ev, dg.StepEvent) for ev in s) == 2
        assert dg.generate("hi", model=m, max_new_tokens=16, seed=1, sampler=base) == s.generation.text
        with pytest.raises(dg.Error, match="sampler must be a dg.SamplerSettings"):
            m.generate("hi", sampler={"steps": 2})


# ---- derived surfaces -----------------------------------------------------------------------------------------


def _flags(parser) -> dict[str, type]:
    sub = next(a for a in parser._actions if a.dest == "cmd").choices["generate"]
    return {a.dest: a.type for a in sub._actions if a.option_strings}


def test_cli_flags_and_server_fields_are_the_fields():
    flags = _flags(cli.build_parser())
    for f in dataclasses.fields(dg.SamplerSettings):
        assert flags[f.name] is type(f.default), f.name  # --steps int, --t-min float, ...
        bad = {f.name: "x"}
        with pytest.raises(server.ApiError) as ei:
            protocol.sampler_settings(bad, dg.SamplerSettings())
        assert ei.value.status == 400 and ei.value.param == f.name
    body = {"steps": 5, "t_min": 0.2, "t_max": None, "stability": None, "unrelated": 1}
    assert protocol.sampler_settings(body, dg.SamplerSettings()) == dg.SamplerSettings(steps=5, t_min=0.2,
                                                                                      stability=None)
    with pytest.raises(server.ApiError) as ei:
        protocol.sampler_settings({"t_min": 0.9, "t_max": 0.5}, dg.SamplerSettings())
    assert ei.value.param is None and "t_min < t_max" in ei.value.message


@dataclasses.dataclass(frozen=True)
class _WithNewSetting(sampler.SamplerSettings):
    patience: int = dataclasses.field(default=7, metadata={"gguf": "diffusion.eb_patience", "hf": "patience",
                                                            "help": "a setting added later", "off": False})


def test_a_new_field_shows_up_on_the_command_line_and_in_the_server(monkeypatch):
    monkeypatch.setattr(sampler, "SamplerSettings", _WithNewSetting)
    a = cli.build_parser().parse_args(["generate", "hi", "--patience", "3", "--steps", "4"])
    assert cli_flags.sampler_kw(a) == {"max_new_tokens": 256, "seed": None, "steps": 4, "patience": 3}
    got = protocol.sampler_settings({"patience": 2}, _WithNewSetting())
    assert got.patience == 2 and got.steps == 48
    assert _WithNewSetting(patience=5).to_metadata()["diffusion.eb_patience"] == 5
