"""Structured output (json_schema=): compiling the supported subset (errors name the keyword and its JSON path),
the layout over canvases, the commit rules (check, re-noise, repair), and the guarantee: every answer parses with
json.loads and validates with the jsonschema library, on the embedded model (canvas 32) and on a random-weight
file (canvas 16). DIFFGEMMA_SCHEMA_SEEDS sets the seeds per schema and model of the property test (default 1;
the issue's acceptance run is 200)."""

import json
import os
import random
import string
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

import diffgemma as dg
from diffgemma import schema_compile, structured

SEEDS = int(os.environ.get("DIFFGEMMA_SCHEMA_SEEDS", "1"))
STEPS = (6, 1, 12)  # per seed in turn: a short run (stops and re-noises), one step (every value repaired), longer


@pytest.fixture(scope="module")
def tiny():
    with dg.load("tiny", threads=1) as m:  # one thread: no spin-barrier stalls on a busy machine
        yield m


@pytest.fixture(scope="module")
def rnd(random_tiny):
    with dg.load(random_tiny, threads=1) as m:
        yield m


def _valid(g, schema):
    value = json.loads(g.text)
    jsonschema.validate(value, schema)
    assert value == g.json
    return value


# ---- compiling ---------------------------------------------------------------------------------------------


def test_compile_writes_each_keyword_as_text_and_values():
    js = schema_compile.compile({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"}, "none": {"type": "null"}, "kind": {"const": "pet"},
        "color": {"enum": ["red", 2, None]}, "opt": {"type": "number"}}, "required": ["name", "n", "ok", "none",
                                                                                       "kind", "color"]})
    S = schema_compile
    assert js.nodes[0] == S.Fixed("{") and js.nodes[-1] == S.Fixed("}")
    name, n, ok, none, kind, color, opt = js.nodes[1:-1]
    assert name == S.Glue((S.Fixed('"name": '), S.Fixed('"'), S.Str("$.properties.name", 0, 5, 5), S.Fixed('"')))
    assert n == S.Glue((S.Fixed(', "n": '), S.Int("$.properties.n", 0, 99, 2)))
    assert ok.nodes[1] == S.Choice("$.properties.ok", ("true", "false"))
    assert none.nodes[1] == S.Fixed("null") and kind.nodes[1] == S.Fixed('"pet"')
    assert color.nodes[1] == S.Choice("$.properties.color", ('"red"', "2", "null"))
    assert isinstance(opt, S.Group) and opt.nodes[0] == S.Fixed(', "opt": ')  # optional: present or absent


def test_sizes_follow_the_bounds_and_the_documented_defaults():
    def leaf(s):
        return next(n for n in schema_compile.compile(s).nodes if not isinstance(n, schema_compile.Fixed))
    assert leaf({"type": "string"}).size == schema_compile.STRING_TOKENS
    assert leaf({"type": "string", "maxLength": 1000}).size == schema_compile.STRING_MAX_TOKENS
    assert leaf({"type": "string", "minLength": 80, "maxLength": 1000}).size == 80
    assert schema_compile.compile({"type": "string", "maxLength": 0}).nodes == (schema_compile.Fixed('""'),)
    assert leaf({"type": "integer"}).size == schema_compile.INTEGER_TOKENS
    assert leaf({"type": "integer", "minimum": -5, "maximum": 1000}).size == 4
    assert leaf({"type": "integer", "exclusiveMinimum": 0.5, "exclusiveMaximum": 10}) == \
        schema_compile.Int("$", 1, 9, 1)
    assert leaf({"type": "number", "minimum": 0, "maximum": 100}).size == 3 + 1 + schema_compile.NUMBER_FRACTION_DIGITS
    assert leaf({"type": "number"}).size == 1 + schema_compile.NUMBER_DIGITS + 1 + schema_compile.NUMBER_FRACTION_DIGITS
    items = schema_compile.compile({"type": "array", "items": {"type": "integer"}}).nodes[1]
    assert isinstance(items, schema_compile.Items) and len(items.slots) == schema_compile.ITEMS and items.head
    mixed = schema_compile.compile({"type": "array", "items": {"type": "null"}, "minItems": 2, "maxItems": 3}).nodes
    assert [type(n).__name__ for n in mixed] == ["Fixed", "Glue", "Glue", "Items", "Fixed"]
    assert schema_compile.compile({"type": "array", "items": {"type": "null"}, "maxItems": 0}).nodes == \
        (schema_compile.Fixed("[]"),)


class Pet:  # what a pydantic model class offers: model_json_schema()
    @classmethod
    def model_json_schema(cls):
        return {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_schema_forms_dict_json_text_pydantic_class_and_compiled():
    a = schema_compile.compile(Pet)
    assert schema_compile.compile(json.dumps(Pet.model_json_schema())).nodes == a.nodes
    assert schema_compile.compile(Pet.model_json_schema()).key == a.key
    assert schema_compile.compile(a) is a


def test_a_real_pydantic_model(rnd):
    pydantic = pytest.importorskip("pydantic")

    class Size(pydantic.BaseModel):
        w: int = pydantic.Field(ge=1, le=500)
        unit: str = pydantic.Field(default="cm", max_length=3)

    class Item(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        size: Size
        tags: list[bool] = pydantic.Field(max_length=2)
        note: str | None = pydantic.Field(default=None, max_length=4)

    g = rnd.generate("", json_schema=Item, seed=1, steps=4)
    Item.model_validate_json(g.text)
    _valid(g, Item.model_json_schema())


@pytest.mark.parametrize("schema,msg", [
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 2}}},
     r"^\$\.properties\.age: 'multipleOf' is not supported$"),
    ({"type": "string", "pattern": "^a"}, r"^\$: 'pattern' is not supported$"),
    ({"type": "string", "format": "date-time"}, r"^\$: 'format' is not supported$"),
    ({"oneOf": [{"type": "string"}]}, r"'oneOf' is not supported"),
    ({"allOf": [{"type": "string"}]}, r"'allOf' is not supported"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, r"^\$: 'uniqueItems' is not supported"),
    ({"type": "array", "prefixItems": [{"type": "string"}]}, r"'prefixItems' is not supported"),
    ({"type": "object", "minProperties": 1}, r"'minProperties' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLenght": 3}}},
     r"^\$\.properties\.a: 'maxLenght' is not supported$"),  # a typo is not ignored either
    ({"type": "object", "properties": {"odd key": {"not": {}}}}, r'^\$\.properties\["odd key"\]: \'not\''),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "if": {}}]}, r"^\$\.anyOf\[1\]: 'if' is not supported"),
    ({"type": "object", "additionalProperties": {"type": "string"}},
     r"^\$\.additionalProperties: a schema is not supported"),
    ({"$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string", "pattern": "x"}}}},
      "$ref": "#/$defs/Pet"}, r"^\$\.\$defs\.Pet\.properties\.name: 'pattern' is not supported$"),
    ({"$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
      "$ref": "#/$defs/Node"}, r"^\$\.\$defs\.Node\.properties\.next\.\$ref: the recursive reference"),
    ({"type": "object", "properties": {"me": {"$ref": "#"}}}, r"recursive reference '#'"),
    ({"$ref": "https://example.com/s.json"}, r"^\$\.\$ref: only references inside the schema"),
    ({"$ref": "#/$defs/Missing"}, r"'#/\$defs/Missing' points at nothing"),
    ({"$ref": "#/$defs/A", "maxLength": 2, "$defs": {"A": {"type": "string"}}}, r"'\$ref' next to \['maxLength'\]"),
    ({"properties": {"a": {"type": "string"}}}, r"^\$: a schema needs 'type'"),
    ({}, r"^\$: a schema needs 'type'"),
    ({"type": "text"}, r"^\$\.type: unknown type 'text'"),
    ({"type": "object", "properties": {"a": True}}, r"^\$\.properties\.a: the boolean schema true"),
    ({"type": "array"}, r"^\$: an array needs 'items'"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, r"maxLength 2 is below minLength 5"),
    ({"type": "string", "maxLength": -1}, r"^\$\.maxLength: must be an integer >= 0"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, r"^\$: no integer satisfies its bounds"),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, r"no number satisfies its bounds"),
    ({"type": "number", "minimum": "0"}, r"^\$\.minimum: must be a number"),
    ({"type": "integer", "minimum": 0, "exclusiveMinimum": True}, r"boolean exclusiveMinimum"),
    ({"enum": []}, r"^\$\.enum: must be a non-empty list"),
    ({"type": "string", "enum": [1, 2]}, r"^\$\.enum: no value is of type 'string'"),
    ({"enum": ["a", "b"], "maxLength": 1}, r"'maxLength' next to 'enum' is not supported"),
    ({"type": "integer", "maxLength": 3}, r"^\$: 'maxLength' does not apply to type 'integer'"),
    ({"type": ["integer", "null"], "maxLength": 3}, r"'maxLength' does not apply to the types"),
    ({"anyOf": [{"type": "string"}], "type": "string"}, r"'anyOf' next to \['type'\] is not supported"),
    ({"anyOf": []}, r"^\$\.anyOf: must be a non-empty list"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
     r"^\$\.required: 'b' is not in properties"),
    ("{not json", r"json_schema is not valid JSON"),
    ([{"type": "string"}], r"json_schema must be a JSON Schema object"),
])
def test_unsupported_or_bad_schemas_name_the_keyword_and_path(schema, msg):
    with pytest.raises(dg.Error, match=msg):
        schema_compile.compile(schema)


def test_annotations_are_accepted(rnd):
    s = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T", "description": "d",
         "$comment": "c", "type": "object", "examples": [{}], "properties": {
             "a": {"type": "integer", "default": 3, "deprecated": False, "readOnly": True, "minimum": 0}},
         "required": ["a"], "definitions": {}}
    _valid(rnd.generate("", json_schema=s, seed=0, steps=2), s)


# ---- the layout ----------------------------------------------------------------------------------------------


def test_layout_clamps_structure_and_keeps_values_inside_a_canvas(rnd):
    s = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                          "n": {"type": "integer", "minimum": -99, "maximum": 99},
                                          "x": {"type": "number"}, "tags": {"type": "array", "maxItems": 2,
                                                                              "items": {"enum": ["ab", "c"]}}},
         "required": ["name", "n", "x"]}
    lay = structured.lay_out(rnd, s)
    assert lay is structured.lay_out(rnd, json.dumps(s))  # cached: the device table is written once
    L = lay.canvas_length
    assert L == 16 and lay.n_canvas > 3
    for p in lay.parts:  # no value but a string crosses a canvas edge; no group does
        if isinstance(p, structured._Value) and not isinstance(p.leaf, schema_compile.Str) or \
                isinstance(p, structured._Group | structured._OneOf):
            assert p.start // L == (p.end - 1) // L
    name = next(p for p in lay.parts if isinstance(p, structured._Value))
    assert name.n == 30 and name.start // L != (name.end - 1) // L  # the long string does cross
    tok = rnd.tokenizer
    string_row = lay.table[lay.rows[name.start]]
    for t in np.flatnonzero(string_row):
        text = tok.detokenize([int(t)])
        assert t == lay.filler or (text and '"' not in text and "\\" not in text and min(map(ord, text)) >= 32)
    n = next(p for p in lay.parts if isinstance(p, structured._Value) and isinstance(p.leaf, schema_compile.Int))
    first, rest = lay.table[lay.rows[n.start]], lay.table[lay.rows[n.start + 1]]
    assert {tok.detokenize([int(t)]) for t in np.flatnonzero(first)} <= set("-0123456789")
    assert not first[lay.filler] and rest[lay.filler]  # a mandatory integer has a first digit (or sign)
    x = next(p for p in lay.parts if isinstance(p, structured._Value) and isinstance(p.leaf, schema_compile.Num))
    point = x.n - 1 - schema_compile.NUMBER_FRACTION_DIGITS
    assert {tok.detokenize([int(t)]) for t in np.flatnonzero(lay.table[lay.rows[x.start + point]])} == {".", ""}


def test_a_value_larger_than_a_canvas_is_a_clear_error(rnd):
    with pytest.raises(dg.Error, match=r"\$.properties.a: this value takes \d+ tokens, more than a canvas holds"):
        structured.lay_out(rnd, {"type": "object", "properties": {"a": {"enum": ["x" * 20, "y"]}}})


def test_a_group_larger_than_a_canvas_is_always_written(rnd):
    s = {"type": "object", "properties": {"a": {"type": "integer"}, "long": {"type": "string", "minLength": 20}},
         "required": ["a"]}
    g = rnd.generate("", json_schema=s, seed=0, steps=2)
    assert len(_valid(g, s)["long"]) >= 20


def test_all_fixed_schema_returns_at_once(rnd):
    s = {"type": "object", "properties": {"k": {"const": [1, {"a": None}]}, "z": {"type": "null"}},
         "required": ["k", "z"]}
    g = rnd.generate("", json_schema=s, seed=0)
    assert g.json == {"k": [1, {"a": None}], "z": None} and g.steps == 0


# ---- the commit rules ---------------------------------------------------------------------------------------


def _values(parts):
    for p in parts:
        if isinstance(p, structured._Value):
            yield p
        elif isinstance(p, structured._Group):
            yield from _values(p.parts)


def _canvas_with(lay, model, values):
    """The template's tokens with each value hole holding the tokens of the given text (None: leave filler)."""
    toks = lay.tokens.copy()
    toks[~lay.fixed] = lay.filler
    vals = list(_values(lay.parts))
    for v, text in zip(vals, values, strict=True):
        ids = model.tokenize(text, add_special=False) if text else []
        assert len(ids) <= v.n
        toks[v.start:v.start + len(ids)] = ids
    return toks


@pytest.mark.parametrize("schema,text,repaired", [
    ({"type": "integer", "minimum": 0, "maximum": 120}, "007", "7"),
    ({"type": "integer", "minimum": 0, "maximum": 120}, "500", "120"),
    ({"type": "integer", "minimum": 10, "maximum": 20}, "-5", "10"),
    ({"type": "integer"}, "-", "0"),
    ({"type": "number", "minimum": 0, "maximum": 10}, "12.5", "10"),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 10}, "0", "1"),
    ({"type": "number"}, "01.5", "1.5"),
    ({"type": "number"}, "3.", "3"),
    ({"type": "string", "maxLength": 4}, "hehehe", "hehe"),  # four positions, but six characters
    ({"type": "string", "minLength": 3, "maxLength": 6}, "", "..."),
    ({"enum": ["cat", "dog"]}, '"bat"', '"cat"'),  # the choice agreeing with most positions
    ({"type": "boolean"}, "frue", "true"),
])
def test_check_names_broken_values_and_repair_finds_the_nearest_valid_one(rnd, schema, text, repaired):
    lay = structured.lay_out(rnd, {"type": "object", "properties": {"v": schema}, "required": ["v"]})
    toks = _canvas_with(lay, rnd, [text])
    v = next(p for p in lay.parts if isinstance(p, structured._Value))
    c = v.start // lay.canvas_length
    done = toks[: (c + 1) * lay.canvas_length]
    bad = lay.check(done, c)
    a = c * lay.canvas_length
    assert bad is not None and bad[v.start - a:v.end - a].any() and not (bad & lay.fixed[lay.canvas(c)]).any()
    if text == "hehehe":  # too long: only the positions from the one that passes maxLength are re-noised
        assert bad[v.start - a:v.end - a].tolist() == [False, False, True, True]
    canvas, n = lay.repair(done, c)
    assert n == 1
    toks[lay.canvas(c)] = canvas
    assert lay.check(toks[: (c + 1) * lay.canvas_length], c) is None
    assert lay.fill(toks, rnd.detokenize)[1] == [repaired.strip('"') if schema.get("type") == "string" else repaired]


def test_optional_groups_are_whole_or_absent(rnd):
    s = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9, "minimum": 0},
                                          "b": {"type": "integer", "maximum": 9, "minimum": 0}}, "required": ["a"]}
    lay = structured.lay_out(rnd, s)
    group = next(p for p in lay.parts if isinstance(p, structured._Group))
    run = group.parts[0]
    toks = _canvas_with(lay, rnd, ["1", None])
    c = group.start // lay.canvas_length
    end = (c + 1) * lay.canvas_length
    assert lay.check(toks[:end], c) is None and lay.fill(toks, rnd.detokenize)[0] == '{"a": 1}'  # absent
    toks[run.start:run.start + len(run.ids)] = run.ids
    assert lay.check(toks[:end], c) is not None  # its key, but no value
    toks[group.parts[1].start] = rnd.tokenize("5", add_special=False)[0]
    assert lay.check(toks[:end], c) is None and lay.fill(toks, rnd.detokenize)[0] == '{"a": 1, "b": 5}'
    toks[run.start] = lay.filler  # half its key: broken, re-noised whole, repaired to absent
    a = c * lay.canvas_length
    assert lay.check(toks[:end], c)[group.start - a:group.end - a].all()
    toks[lay.canvas(c)] = lay.repair(toks[:end], c)[0]
    assert lay.fill(toks, rnd.detokenize)[0] == '{"a": 1}'


# ---- the guarantee: random canvases (no model), then real generations ------------------------------------


def _scalar(r):
    k = r.choice(["string", "integer", "number", "boolean", "null", "enum", "const", "types"])
    if k == "string":
        s = {"type": "string"}
        if r.random() < 0.6:
            s["maxLength"] = r.randint(0, 12)
        if r.random() < 0.4:
            s["minLength"] = r.randint(0, s.get("maxLength", 6))
        return s
    if k == "integer":
        s = {"type": "integer"}
        if r.random() < 0.5:
            s["minimum"] = r.randint(-50, 50)
        if r.random() < 0.5:
            s["maximum"] = s.get("minimum", -60) + r.randint(0, 1000)
        if r.random() < 0.2:
            s["exclusiveMinimum"] = s.pop("minimum", r.randint(-5, 5))
        return s
    if k == "number":
        s = {"type": "number"}
        if r.random() < 0.5:
            s["minimum"] = round(r.uniform(-10, 10), 2)
        if r.random() < 0.5:
            s["maximum"] = s.get("minimum", -10) + round(r.uniform(0.5, 100), 2)
        if r.random() < 0.3:
            s["exclusiveMaximum"] = s.pop("maximum", 3.5) + 50
        return s
    if k in ("boolean", "null"):
        return {"type": k}
    if k == "enum":
        return {"enum": r.sample(["red", "green", "blue", 1, 2.5, True, None, "a b", 'x"y', "é", -3], r.randint(1, 4))}
    if k == "const":
        return {"const": r.choice(["fixed", 7, False, None, [1, 2], {"k": "v"}])}
    types = r.sample(["string", "integer", "null", "boolean", "number"], 2)
    if "string" in types:
        return {"type": types, "maxLength": 4}
    return {"type": types, "minimum": 0} if {"integer", "number"} & set(types) else {"type": types}


def _schema(r, depth=0):
    """A random schema over the supported subset: nested objects, arrays, anyOf, every keyword."""
    k = r.random()
    if depth >= 2 or k < 0.45:
        return _scalar(r)
    if k < 0.75:
        props = {f"k{i}{r.choice(string.ascii_lowercase)}": _schema(r, depth + 1) for i in range(r.randint(0, 4))}
        s = {"type": "object", "properties": props}
        if props and r.random() < 0.8:
            s["required"] = r.sample(list(props), r.randint(0, len(props)))
        if r.random() < 0.5:
            s["additionalProperties"] = False
        return s
    if k < 0.9:
        s = {"type": "array", "items": _schema(r, depth + 1)}
        if r.random() < 0.5:
            s["minItems"] = r.randint(0, 2)
        if r.random() < 0.7:
            s["maxItems"] = s.get("minItems", 0) + r.randint(0, 3)
        return s
    alts = [_scalar(r) for _ in range(r.randint(1, 3))] + ([_schema(r, depth + 1)] if r.random() < 0.3 else [])
    return {"anyOf": alts}


def random_schema(seed):
    r = random.Random(seed)
    if r.random() < 0.2:  # shared definitions
        return {"$defs": {"Thing": _schema(r, 1)}, "type": "object", "required": ["a"], "properties": {
            "a": {"$ref": "#/$defs/Thing"}, "b": {"type": "array", "items": {"$ref": "#/$defs/Thing"}, "maxItems": 2}}}
    return _schema(r)


def _layouts(model, schemas):
    for s in schemas:
        try:
            yield s, structured.lay_out(model, s)
        except dg.Error as e:  # a value wider than this model's canvas: the only allowed refusal
            assert "more than a canvas holds" in str(e)


def test_any_canvas_is_repaired_into_a_valid_answer(tiny, rnd):
    """The generation loop's commit rule over random canvases (masked draws and raw noise): each canvas
    commits as is when check passes, else repaired; the text always validates."""
    n = 0
    for model in (tiny, rnd):
        for seed, (s, lay) in enumerate(_layouts(model, [random_schema(i) for i in range(60)])):
            rng = np.random.default_rng(seed)
            for trial in range(4):
                done = np.zeros(0, dtype=np.int64)
                for c in range(lay.n_canvas):
                    sl = lay.canvas(c)
                    noise = rng.integers(0, model.hparams.n_vocab, lay.canvas_length)
                    canvas = np.where(lay.fixed[sl], lay.tokens[sl], noise)
                    if trial % 2 == 0 and lay.table is not None:  # what the device mask allows
                        canvas = np.array([t if f else rng.choice(np.flatnonzero(lay.table[r]))
                                           for t, f, r in zip(canvas, lay.fixed[sl], lay.rows[sl], strict=True)])
                    full = np.concatenate([done, canvas])
                    if lay.check(full, c) is not None:
                        canvas = lay.repair(full, c)[0]
                        assert lay.check(np.concatenate([done, canvas]), c) is None
                    done = np.concatenate([done, canvas])
                jsonschema.validate(lay.value(lay.fill(done, model.detokenize)[0]), s)
                n += 1
    assert n > 300


HAND_WRITTEN = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "pet"}, "species": {"enum": ["cat", "dog", "bird"]},
                                      "legs": {"enum": [2, 4]}, "ok": {"type": "boolean"}},
     "required": ["kind", "species", "legs", "ok"]},
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"type": "integer"},
                                      "c": {"type": "number", "exclusiveMinimum": -1, "exclusiveMaximum": 1}}},
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                        "maximum": 99}},
                                "required": ["id"]}, "maxItems": 2},
    {"type": "object", "properties": {"s": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
                                      "t": {"anyOf": [{"type": "integer", "maximum": 50}, {"type": "boolean"}]},
                                      "u": {"type": ["string", "null"], "maxLength": 2}},
     "required": ["s", "t", "u"]},
    {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                      "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                     "required": ["x", "y"]}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/P"}, "to": {"$ref": "#/$defs/P"}},
     "required": ["from", "to"]},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
     "required": ["lat", "lon"]},
    {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 5}},
     "required": ["code"]},
    {"type": "integer", "minimum": 1000, "maximum": 9999},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "string", "maxLength": 40},  # longer than the random file's canvas: crosses its edges
    {"enum": ["north", "south", 3, None]},
    {"type": "object", "properties": {"p": {"type": "integer"}, "q": {"type": "boolean"}}},  # all optional
    {"type": "object", "required": ["deep"], "properties": {"deep": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "required": ["v"], "properties": {"v": {"anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}}}}},
]


@pytest.mark.parametrize("which", ["tiny", "rnd"])
def test_every_answer_parses_and_validates(which, request):
    model = request.getfixturevalue(which)
    schemas = HAND_WRITTEN + [random_schema(1000 + i) for i in range(12)]
    n = 0
    for i, (s, _) in enumerate(_layouts(model, schemas)):
        for seed in range(SEEDS):
            steps = STEPS[(i + seed) % len(STEPS)]
            g = model.generate("ROMEO:" if seed % 2 else "", json_schema=s, seed=seed, steps=steps)
            try:
                _valid(g, s)
            except (ValueError, jsonschema.ValidationError) as e:
                raise AssertionError(f"schema {json.dumps(s)} seed {seed} steps {steps}: {g.text!r}: {e}") from e
            n += 1
    assert n >= len(schemas) * SEEDS - 2


# ---- the surfaces ------------------------------------------------------------------------------------------------


def test_renoise_and_repair_are_counted_and_deterministic(tiny):
    s = HAND_WRITTEN[1]
    g = tiny.generate("ROMEO:", json_schema=s, seed=0)
    again = tiny.generate("ROMEO:", json_schema=s, seed=0)
    assert g.text == again.text and g.timings.renoised == again.timings.renoised > 0  # the choice mixes tokens
    one = tiny.generate("ROMEO:", json_schema=HAND_WRITTEN[0], seed=0, steps=1)
    assert one.timings.renoised == 0 and one.timings.repaired >= 1  # no step left to re-noise
    _valid(one, HAND_WRITTEN[0])


def test_generate_stream_batch_chat_and_dg_generate(rnd):
    s, t = HAND_WRITTEN[0], HAND_WRITTEN[9]
    g = rnd.generate("hi", json_schema=s, seed=3, steps=3)
    _valid(g, s)
    with rnd.stream("hi", json_schema=s, seed=3, steps=3) as st:
        deltas = [ev.text_delta for ev in st if isinstance(ev, dg.CanvasEvent)]
    assert "".join(deltas) == g.text and st.generation.json == g.json
    batch = rnd.generate_batch(["hi", "yo"], json_schema=[s, t], seed=[3, 4], steps=3)
    assert batch[0].text == g.text and 1000 <= batch[1].json <= 9999
    same = rnd.generate_batch(["a", "b"], json_schema=s, seed=1, steps=2)  # one schema for all
    assert all(_valid(x, s) for x in same)
    assert dg.generate("hi", model=rnd, json_schema=s, seed=3, steps=3) == g.text
    reply = rnd.chat([{"role": "user", "content": "Who?"}], json_schema=s, seed=2, steps=2)
    assert json.loads(reply.content) == reply.json and reply.finish_reason == "stop" and not reply.tool_calls
    jsonschema.validate(reply.json, s)
    assert rnd.generate("hi", steps=1, seed=1).json is None


def test_bad_combinations_are_errors(rnd):
    with pytest.raises(dg.Error, match="a template or a json_schema, not both"):
        rnd.generate("hi", json_schema={"type": "boolean"}, template="{{hole 2}}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(dg.Error, match="json_schema and tools"):
        rnd.chat([{"role": "user", "content": "x"}], tools=tools, json_schema={"type": "boolean"})
    with pytest.raises(dg.Error, match="prompt 1: .*'pattern' is not supported"):
        rnd.generate_batch(["a", "b"], json_schema=[{"type": "boolean"}, {"type": "string", "pattern": "x"}])


def test_cli_json_schema(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(HAND_WRITTEN[0]))
    cli = [sys.executable, "-m", "diffgemma", "generate", "--threads", "1"]
    r = subprocess.run(cli + ["--json-schema", str(f), "--seed", "2", "--steps", "3", "--json"], capture_output=True,
                       text=True, check=True)
    out = json.loads(r.stdout)
    assert json.loads(out["text"]) == out["json"]
    jsonschema.validate(out["json"], HAND_WRITTEN[0])
    plain = subprocess.run(cli + ["--json-schema", "-", "-p", "ROMEO.", "--steps", "2"], input='{"type": "boolean"}',
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() in ("true", "false")
    f.write_text('{"type": "string", "format": "email"}')
    bad = subprocess.run(cli + ["--json-schema", str(f)], capture_output=True, text=True)
    assert bad.returncode != 0 and "$: 'format' is not supported" in bad.stderr and "Traceback" not in bad.stderr
