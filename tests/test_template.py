"""Templates: the hole syntax, laying templates over canvases, clamped fixed tokens, per-hole vocabularies
masked on the device, the stop rule over holes only, infill."""

import numpy as np
import pytest
from test_generate import _peaked

import diffgemma as dg
from diffgemma import template as tpl

SETTINGS = {"steps": 6, "seed": 3}


def _recording(monkeypatch, m):
    """Record every canvas fed to the model and every (argmax) it returned."""
    seen = []
    real = m.denoise_step

    def spy(canvas, *a, **kw):
        out = real(canvas, *a, **kw)
        seen.append((np.array(canvas), out[0].copy()))
        return out

    monkeypatch.setattr(m, "denoise_step", spy)
    return seen


# ---- syntax ------------------------------------------------------------------------------------------------


def test_parse_holes_classes_texts_and_escapes():
    H = dg.Hole
    assert dg.parse_template('{"name": "{{hole 6}}", "year": {{hole 2 digits}}}') == [
        '{"name": "', H(6), '", "year": ', H(2, "digits"), "}"]
    assert dg.parse_template('{{ hole 1 "yes" "no" empty }}') == [H(1, ("yes", "no"), True)]
    assert dg.parse_template('{{hole 2 "}}" "\\n"}}') == [H(2, ("}}", "\n"))]  # quotes may hold braces
    assert dg.parse_template("{{hole 3 letters digits}}") == [H(3, "letters digits")]
    assert dg.parse_template("{{{hole 2}}}") == ["{", H(2), "}"]  # a brace run: the tag is its last two
    assert dg.parse_template(r"a \{{b}} c") == ["a {{b}} c"]  # escaped: literal braces
    assert dg.parse_template(r"x\\{{hole 1}}") == ["x\\", H(1)]  # an escaped backslash, then a tag
    assert dg.parse_template("no tags } here {") == ["no tags } here {"]


@pytest.mark.parametrize("text,msg", [
    ("ab\n  {{hole 3", "unclosed hole at line 2, column 3"),
    ('{{hole 3 "abc}}', "unclosed hole at line 1, column 1"),
    ("x {{hole 0}}", "hole at line 1, column 3 has zero size"),
    ("{{hole}}", "needs a size"),
    ("{{hole -2}}", "needs a size"),
    ("{{name}}", r"unknown tag \{\{name\}\} at line 1, column 1"),
    ("{{hole 2 digitz}}", "unknown token class 'digitz'"),
    ('{{hole 2 digits "x"}}', "either class names or quoted strings"),
])
def test_bad_template_text(text, msg):
    with pytest.raises(dg.Error, match=msg):
        dg.parse_template(text)


def test_bad_templates_for_a_model(random_tiny):
    with dg.load(random_tiny) as m:
        with pytest.raises(dg.Error, match=r"hole \(template part 1\).*allowed set.*empty"):
            m.generate("hi", template=["a", dg.Hole(2, allowed=[""])])  # nothing left after tokenization
        with pytest.raises(dg.Error, match=r"template part 0.*positive number of tokens"):
            m.generate("hi", template=[dg.Hole(0)])
        with pytest.raises(dg.Error, match="token id 9999"):
            m.generate("hi", template=[dg.Hole(1, allowed={5, 9999})])
        with pytest.raises(dg.Error, match="template part 1 must be a str or a dg.Hole"):
            m.generate("hi", template=["a", 3])
        with pytest.raises(dg.Error, match="unclosed hole at line 1, column 3"):
            m.generate("hi", template="a {{hole 2")
        with pytest.raises(dg.Error, match="the template is empty"):
            m.generate("hi", template=[])
        with pytest.raises(dg.Error, match="n_ctx"):
            m.generate("hi", template=[dg.Hole(10_000)])


def test_layout_over_canvases(random_tiny):
    with dg.load(random_tiny) as m:
        L = m.hparams.canvas_length
        lay = tpl.lay_out(m, ["ab", dg.Hole(20, "digits"), "cd", dg.Hole(3, "digits", empty=True), dg.Hole(2)])
        n_ab, n_cd = len(m.tokenize("ab", add_special=False)), len(m.tokenize("cd", add_special=False))
        n = n_ab + 20 + n_cd + 3 + 2
        assert lay.n_canvas == -(-n // L) and lay.n_template == n
        assert lay.fixed[n:].all() and (lay.tokens[n:] == m.tokenizer.pad).all()  # the tail is filler
        assert lay.table.shape == (3, m.hparams.n_vocab)  # any token, digits, digits + filler: one row each
        assert (lay.rows[n_ab:n_ab + 20] == 1).all() and (lay.rows[n - 5:n - 2] == 2).all()
        assert lay.table[2, m.tokenizer.pad] and not lay.table[1, m.tokenizer.pad]
        assert lay.vocab(0) is not None
        free = tpl.lay_out(m, ["ab", dg.Hole(4)])
        assert free.table is None and free.vocab(0) is None  # nothing restricted: the plain graph


# ---- generation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts,n_canvas", [
    (["To be, or", dg.Hole(5), " that is the", dg.Hole(2), "."], 1),
    # 3 canvases of 16; the first hole spans canvases 1 and 2, the second ends in canvas 3
    (["The quick brown fox", dg.Hole(14), " jumps over the lazy dog", dg.Hole(9), " the question:"], 3),
])
def test_fixed_tokens_survive_every_step(random_tiny, monkeypatch, parts, n_canvas):
    with dg.load(random_tiny) as m:
        lay = tpl.lay_out(m, parts)
        assert lay.n_canvas == n_canvas
        seen = _recording(monkeypatch, m)
        events = []
        g = m.generate("Fill in:", template=parts, on_step=events.append, **SETTINGS)
    L = m.hparams.canvas_length
    assert len(seen) == len(events) == g.steps > 0
    for (canvas, _), ev in zip(seen, events, strict=True):
        sl = lay.canvas(ev.canvas_index)
        fixed, tokens = lay.fixed[sl], lay.tokens[sl]
        assert (canvas[fixed] == tokens[fixed]).all()  # fed to the model
        assert (ev.argmax[fixed] == tokens[fixed]).all()  # and in the argmax canvas
        assert (ev.fixed == fixed).all() and len(ev.argmax) == L
    # the fixed text verbatim with each hole's text in its place
    assert len(g.holes) == 2 and len(g.canvases) == n_canvas
    assert g.text == parts[0] + g.holes[0] + parts[2] + g.holes[1] + parts[4]
    assert g.tokens[:len(m.tokenize(parts[0], add_special=False))] == m.tokenize(parts[0], add_special=False)
    assert all(c.eos is False for c in g.canvases)


def test_hole_tokens_come_only_from_their_allowed_sets(random_tiny):
    with dg.load(random_tiny) as m:
        yes_no = set(m.tokenize("yes", add_special=False)) | set(m.tokenize("no", add_special=False))
        ids = {300, 301, 302}
        parts = ["Year:", dg.Hole(6, "digits"), " name:", dg.Hole(7, "letters"), " ok:", dg.Hole(2, ["yes", "no"]),
                 " id:", dg.Hole(3, ids), " note:", dg.Hole(8, "no-newline", empty=True)]
        lay = tpl.lay_out(m, parts)
        events = []
        g = m.generate("", template=parts, on_step=events.append, steps=8, seed=1)
        digits, letters = tpl.class_mask(m.tokenizer, "digits"), tpl.class_mask(m.tokenizer, "letters")
        no_nl = tpl.class_mask(m.tokenizer, "no-newline")
        allowed = [set(np.flatnonzero(digits)), set(np.flatnonzero(letters)), yes_no, ids,
                   set(np.flatnonzero(no_nl)) | {m.tokenizer.pad}]
        for ev in events:  # every step, not only the committed canvas
            hole = lay.hole[lay.canvas(ev.canvas_index)]
            for h, ok in enumerate(allowed):
                assert set(ev.argmax[hole == h].tolist()) <= ok
        # a random model would pick from the whole vocabulary: the classes are a small part of it
        assert digits.sum() < 30 and letters.sum() < m.hparams.n_vocab / 2
    assert g.holes[0].isdigit() and len(g.holes[0]) == 6  # single-digit tokens
    assert g.holes[1].isalpha()
    assert "\n" not in g.holes[4]
    assert g.text.startswith("Year:" + g.holes[0] + " name:")


def test_device_masking_matches_numpy(random_tiny):
    """Masked argmax, entropy and sample are those of the renormalised softmax over the allowed tokens."""
    with dg.load(random_tiny) as m:
        hp = m.hparams
        L, V = hp.canvas_length, hp.n_vocab
        rng = np.random.default_rng(0)
        table = np.ones((3, V), dtype=bool)
        table[1] = rng.random(V) < 0.1
        table[2] = False
        table[2, [17, 40, 41]] = True
        rows = rng.integers(0, 3, L).astype(np.int32)
        prompt = m.tokenize("to be or not")
        canvas = rng.integers(0, V, L)
        logits = m.logits(prompt, canvas)
        u = rng.random(L, dtype=np.float32)
        T = 0.7
        argmax, entropy, sample = m.denoise_step(canvas, T, False, u, (table, rows))
        plain = m.denoise_step(canvas, T, False, u)
    s = np.where(table[rows], logits.astype(np.float64) / T, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_array_equal(argmax, s.argmax(1))
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
    np.testing.assert_allclose(entropy, ent, atol=2e-5)
    assert table[rows, sample].all()
    cdf = np.cumsum(p, 1)
    want = (cdf < u[:, None] * cdf[:, -1:]).sum(1)
    assert (sample == want).mean() >= 0.9
    unrestricted = rows == 0  # rows of all-True: the same as the plain graph
    np.testing.assert_array_equal(argmax[unrestricted], plain[0][unrestricted])
    np.testing.assert_allclose(entropy[unrestricted], plain[1][unrestricted], atol=1e-6)


def test_stop_rule_ignores_fixed_positions(random_tiny):
    """A random model is uncertain everywhere; a 1-token hole restricted to one token has entropy 0. With
    stability 1 the canvas stops at step 2, and only that position is ever accepted."""
    with dg.load(random_tiny) as m:
        events = []
        g = m.generate("", template=["To be, or not to be", dg.Hole(1, {300}), " that is the question"],
                       steps=10, seed=0, stability=1, confidence=0.005, on_step=events.append)
        full = m.generate("To be", max_new_tokens=16, steps=10, seed=0, stability=1, confidence=0.005)
    assert [c.steps for c in g.canvases] == [2] and g.canvases[0].stopped_early
    assert [e.accepted for e in events] == [1, 1] and all(e.mean_entropy < 1e-6 for e in events)
    assert full.canvases[0].steps == 10  # the same settings without a template: no early stop
    assert g.tokens[len(m.tokenize("To be, or not to be", add_special=False))] == 300


@pytest.mark.parametrize("stability", [1, 3])
def test_peaked_model_one_token_hole_stops_in_predicted_steps(tmp_path, stability):
    with dg.load(_peaked(tmp_path, target=300)) as m:
        parts = ["a b c", dg.Hole(1), " d e f g h i j k l m n o p q r s t u v w x y z"]  # 3 canvases
        lay = tpl.lay_out(m, parts)
        g = m.generate([2, 50], template=parts, steps=10, seed=0, stability=stability)
    n_holed = sum(not lay.fixed[lay.canvas(c)].all() for c in range(lay.n_canvas))
    assert lay.n_canvas == 3 and n_holed == 1
    assert [c.steps for c in g.canvases] == [stability + 1, 0, 0]  # all-fixed canvases take no step
    assert g.holes == [m.detokenize([300])]


def test_all_fixed_template_returns_immediately(random_tiny, monkeypatch):
    with dg.load(random_tiny) as m:
        def boom(*a, **kw):
            raise AssertionError("the model ran")

        monkeypatch.setattr(m, "denoise_step", boom)
        monkeypatch.setattr(m, "encode", boom)
        text = "The quick brown fox jumps over the lazy dog. " * 2
        g = m.generate("ignored prompt", template=text + r"\{{literal}}")
    assert g.text == text + "{{literal}}" and g.holes == [] and g.steps == 0
    assert [c.steps for c in g.canvases] == [0] * len(g.canvases)


def test_fillers_are_dropped_and_same_seed_same_fill(random_tiny):
    with dg.load(random_tiny) as m:
        filler = m.tokenizer.pad
        # a hole that may only hold the filler or one word: its text is that word or nothing
        word = m.tokenize(" fox", add_special=False)
        parts = ["The quick brown", dg.Hole(4, [" fox"], empty=True), " jumps"]
        a = m.generate("", template=parts, **SETTINGS)
        b = m.generate("", template=parts, **SETTINGS)
    assert a.text == b.text and a.tokens == b.tokens
    assert filler not in a.tokens
    assert set(a.holes[0].split()) <= {"fox"} and a.text == "The quick brown" + a.holes[0] + " jumps"
    assert len(word) == 1


def test_infill(random_tiny):
    with dg.load(random_tiny) as m:
        mid = m.infill("def main(): return ", "\n# done", 4, allowed="digits", seed=2, steps=5)
        again = m.infill("def main(): return ", "\n# done", 4, allowed="digits", seed=2, steps=5)
        free = m.infill("", "", 3, seed=1, steps=3)
    assert mid == again and mid.isdigit() and len(mid) == 4
    assert isinstance(free, str)


def test_no_template_is_unchanged(random_tiny):
    """template=None runs the plain loop and graph: the same tokens as before templates existed (the golden
    lock-step test pins them against transformers)."""
    with dg.load(random_tiny) as m:
        a = m.generate("The quick brown fox", max_new_tokens=20, seed=7, steps=6)
        b = m.generate("The quick brown fox", max_new_tokens=20, seed=7, steps=6, template=None)
        assert m._graph.key[:1] == ("dec",) and "vocab_rows" not in m._graph.io  # no vocabulary input
    assert a.tokens == b.tokens and a.holes == [] and b.holes == []


def test_class_predicates():
    assert tpl.CLASSES["digits"]("2026") and not tpl.CLASSES["digits"]("\u00b2") and not tpl.CLASSES["digits"](" 1")
    assert tpl.CLASSES["words"](" the") and tpl.CLASSES["words"](" ") and not tpl.CLASSES["words"]("a1")
    assert not tpl.CLASSES["no-newline"]("a\n") and tpl.CLASSES["letters"]("abc") and not tpl.CLASSES["letters"]("a b")


# ---- surfaces ------------------------------------------------------------------------------------------------


def test_cli_template_file(tmp_path):
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-m", "diffgemma.cli", "generate"]
    f = tmp_path / "form.txt"
    f.write_text('{"speaker": "{{hole 3 upper}}", "act": {{hole 1 digits}}}\n', encoding="utf-8")
    r = subprocess.run(cli + ["--template", str(f), "--seed", "2", "--steps", "5", "--json"], capture_output=True,
                       text=True, check=True)
    out = json.loads(r.stdout)
    speaker, act = out["holes"]
    assert out["text"] == f'{{"speaker": "{speaker}", "act": {act}}}\n'
    assert speaker.isupper() and act.isdigit() and len(out["canvases"]) == 1
    plain = subprocess.run(cli + ["--template", "-", "-p", "ROMEO.", "--steps", "3"], input="O {{hole 4}}!",
                           capture_output=True, text=True, check=True)
    assert plain.stdout.startswith("O ") and plain.stdout.endswith("!\n")
    f.write_text('{"a": {{hole 2 digitz}}}', encoding="utf-8")
    bad = subprocess.run(cli + ["--template", str(f)], capture_output=True, text=True)
    assert bad.returncode == 2 and "line 1, column 7" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(cli + ["--template", str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read the template" in missing.stderr


@pytest.fixture(scope="module")
def served(random_tiny):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from diffgemma import server as srv

    m = dg.load(random_tiny, threads=1)
    s = srv.Server(m, port=0, log_level="warning").start()
    yield m, s
    s.stop()
    m.close()


def _post(server, path, body, *, stream=False):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            if stream:
                return r.status, [ln.decode().rstrip("\n") for ln in r if ln.strip()]
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_template_extension_field(served):
    openai = pytest.importorskip("openai")
    m, s = served
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "A date, please."}]
    t = "Year: {{hole 4 digits}}, day {{hole 2 digits}}."
    r = client.chat.completions.create(model="tiny", messages=msgs, seed=4, extra_body={"template": t, "steps": 3})
    want = m.generate(msgs, template=t, seed=4, steps=3)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(want.tokens)
    # completions: parts as JSON, no prompt, streamed with frames that mark the fixed positions
    parts = ["The quick brown fox", {"hole": 20, "allowed": "words", "empty": True}, " over the lazy dog."]
    body = {"template": parts, "seed": 2, "steps": 2, "stability": None, "stream": True, "diffusion_frames": True}
    status, lines = _post(s, "/v1/completions", body, stream=True)
    import json

    frames = [json.loads(ln[len(": diffusion "):]) for ln in lines if ln.startswith(": diffusion ")]
    steps = [f for f in frames if f["type"] == "frame"]
    lay = tpl.lay_out(m, [parts[0], dg.Hole(20, "words", True), parts[2]])
    holed = [c for c in range(lay.n_canvas) if not lay.fixed[lay.canvas(c)].all()]
    assert status == 200 and len(holed) >= 2  # the hole spans canvases
    assert [(f["canvas"], f["step"]) for f in steps] == [(c, k) for c in holed for k in (1, 2)]
    for f in steps:
        assert f["fixed"] == lay.fixed[lay.canvas(f["canvas"])].astype(int).tolist()
    text = "".join(json.loads(ln[5:])["choices"][0]["text"] for ln in lines
                   if ln.startswith("data: {") and json.loads(ln[5:])["choices"])
    assert text.startswith("The quick brown fox") and text.endswith(" over the lazy dog.")
    assert text == m.generate(None, template=lay, seed=2, steps=2, stability=None).text


@pytest.mark.parametrize("template,msg", [
    ("a {{hole 3", "unclosed hole at line 1, column 3"),
    (["a", {"hole": 0}], r"hole \(template\[1\]\) must have a positive number"),
    (["a", {"hole": 2, "allowed": [""]}], "is empty in this vocabulary"),
    (["a", {"hole": "x"}], "template\\[1\\].hole must be an integer"),
    (["a", {"size": 2}], "template\\[1\\] must be a string or"),
    (7, "'template' must be a string or an array"),
])
def test_server_bad_templates_are_400(served, template, msg):
    import re

    _, s = served
    status, body = _post(s, "/v1/completions", {"prompt": "hi", "template": template})
    assert status == 400 and body["error"]["param"] == "template" and re.search(msg, body["error"]["message"])
    status, body = _post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "template": "{{hole 2}}", "stop": ["x"]})
    assert status == 400 and body["error"]["param"] == "stop"


def test_docs_examples_on_the_embedded_model():
    """docs/templates.md's examples: a Shakespeare speech heading and a JSON skeleton on the trained model."""
    import json

    with dg.load("tiny", threads=1) as m:  # one thread: no spin-barrier stalls on a busy machine
        t = "{{hole 4 upper}}.\nO {{hole 12 no-newline}},\n{{hole 12 no-newline}}.\n\nJULIET.\n{{hole 16}}"
        g = m.generate("", template=t, seed=3, steps=16)
        speaker, first, second, reply = g.holes
        assert g.text == f"{speaker}.\nO {first},\n{second}.\n\nJULIET.\n{reply}"
        assert speaker.isalpha() and speaker.isupper() and "\n" not in first + second
        j = m.generate("", template='{"speaker": "{{hole 3 upper}}", "act": {{hole 1 digits}}, '
                                    '"line": "{{hole 10 no-newline}}"}', seed=1, steps=16)
    obj = json.loads(j.text)  # keys and punctuation fixed, so it parses whatever the model says
    assert obj["speaker"].isupper() and isinstance(obj["act"], int) and "\n" not in obj["line"]


def test_server_completions_suffix_is_infill(served):
    openai = pytest.importorskip("openai")
    m, s = served
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    r = client.completions.create(model="tiny", prompt="The quick brown", suffix=" over the lazy dog.", max_tokens=6,
                                  seed=5, extra_body={"steps": 3})
    want = m.infill("The quick brown", " over the lazy dog.", 6, empty=True, seed=5, steps=3)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    status, body = _post(s, "/v1/completions", {"prompt": "a", "suffix": "b", "template": "{{hole 2}}"})
    assert status == 400 and body["error"]["param"] == "suffix"
