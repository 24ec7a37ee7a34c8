"""Structured output: a JSON Schema laid over the canvas as a template whose every completion validates
(docs/structured.md).

`compile(schema)` turns a schema (a dict, its JSON text or a pydantic model class) into a tree of nodes, with
no model involved: fixed text (braces, keys, quotes, commas), values (string characters, integers, numbers,
whole choices) and groups that are present or absent as a whole (optional properties, array slots, anyOf
alternatives). Anything outside the supported subset is an Error naming the keyword and its JSON path.

`lay_out(model, schema)` tokenizes that tree for one model into a `SchemaLayout` (a template Layout):
mandatory fixed text is clamped like a template's; values are holes whose per-position vocabularies follow
their grammar (a string takes no `"`, backslash or control character; an integer digits and a leading `-`);
a group's own text becomes hole positions that allow exactly its token or the filler. What a per-position
set cannot say (no leading zeros, a bound, one enum choice, a whole group present or absent) is checked when a
canvas would commit: `check` names the positions to re-noise, and `repair` replaces a broken value by the
nearest valid one when no step is left, so every answer parses and validates.

Sizes (in canvas positions; documented in docs/structured.md):
* string: `maxLength` positions (at most STRING_MAX_TOKENS), at least `minLength`; STRING_TOKENS without
  maxLength. The first `minLength` positions take no filler, so the value has at least minLength characters.
* integer: the characters of its widest bound when both are given, else INTEGER_TOKENS (or a wider bound).
* number: a sign, the integer digits of its bounds (NUMBER_DIGITS without both), a point and
  NUMBER_FRACTION_DIGITS.
* array: one slot per item up to `maxItems` (at most MAX_ITEMS slots, at least minItems), ITEMS without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import Error
from .template import Layout, filler_id, token_texts

STRING_TOKENS = 16  # a string without maxLength
STRING_MAX_TOKENS = 64  # most positions a string takes, whatever its maxLength (unless minLength needs more)
INTEGER_TOKENS = 10  # an integer without both bounds: a sign and nine digits
NUMBER_DIGITS = 6  # integer digits of a number without both bounds
NUMBER_FRACTION_DIGITS = 4  # room after the decimal point
ITEMS = 3  # array slots without maxItems (or minItems, if more)
MAX_ITEMS = 16  # most array slots, whatever maxItems (unless minItems needs more)
PAD_CHAR = "."  # what lengthens a string cut below its minLength by a repair

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
BY_TYPE: dict[str, frozenset[str]] = {  # the validation keywords that apply to each type
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
GENERAL = frozenset({"type", "enum", "const", "anyOf", "$ref"})
# Keywords that never change what validates: accepted and left alone.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions"})
SUPPORTED = GENERAL | ANNOTATIONS | frozenset().union(*BY_TYPE.values())

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


# ---- the compiled tree (model-independent) ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Text that is always there (or, inside a group, there exactly when the group is)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Str:
    """The characters of a JSON string between its quotes."""

    path: str
    min_len: int
    max_len: int | None
    size: int

    def valid(self, text: str, remaining: int = 0) -> bool:
        """Legal characters and a length that fits (`remaining` positions still to come may add characters)."""
        return (not _has_forbidden(text) and (self.max_len is None or len(text) <= self.max_len)
                and len(text) + remaining >= self.min_len)


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer within inclusive bounds (exclusive ones are converted)."""

    path: str
    lo: int | None
    hi: int | None
    size: int

    def valid(self, text: str, remaining: int = 0) -> bool:
        return _INTEGER.fullmatch(text) is not None and _in_range(int(text), self.lo, self.hi)

    def candidates(self, text: str) -> list[str]:
        """Valid texts near `text`: its digits without leading zeros, clamped to the bounds."""
        digits = "".join(ch for ch in text if ch.isascii() and ch.isdigit())
        if not digits:
            return []
        v = -int(digits) if text.lstrip().startswith("-") else int(digits)
        return [str(_clamp(v, self.lo, self.hi))]

    def canonical(self) -> str:
        return str(_clamp(0, self.lo, self.hi))


@dataclasses.dataclass(frozen=True)
class Num:
    """A number within its bounds, as JSON writes numbers."""

    path: str
    minimum: float | None
    maximum: float | None
    exclusive_minimum: float | None
    exclusive_maximum: float | None
    size: int

    def accepts(self, v: float) -> bool:
        return (math.isfinite(v) and (self.minimum is None or v >= self.minimum)
                and (self.maximum is None or v <= self.maximum)
                and (self.exclusive_minimum is None or v > self.exclusive_minimum)
                and (self.exclusive_maximum is None or v < self.exclusive_maximum))

    def valid(self, text: str, remaining: int = 0) -> bool:
        return _NUMBER.fullmatch(text) is not None and self.accepts(json.loads(text))

    def candidates(self, text: str) -> list[str]:
        """Valid texts near `text`: its first number, moved into the bounds if outside."""
        m = re.search(r"-?[0-9]+(?:\.[0-9]+)?", text)
        if m is None:
            return []
        v = float(m.group())
        lo, hi = self.lower(), self.upper()
        tries = [v]
        if lo is not None and v <= lo:
            tries += [lo, math.floor(lo) + 1, lo + 0.5 if hi is None else (lo + hi) / 2]
        if hi is not None and v >= hi:
            tries += [hi, math.ceil(hi) - 1, hi - 0.5 if lo is None else (lo + hi) / 2]
        return [_number_text(x) for x in tries if self.accepts(x)][:1]

    def lower(self) -> float | None:
        b = [x for x in (self.minimum, self.exclusive_minimum) if x is not None]
        return max(b) if b else None

    def upper(self) -> float | None:
        b = [x for x in (self.maximum, self.exclusive_maximum) if x is not None]
        return min(b) if b else None

    def canonical(self) -> str:
        lo, hi = self.lower(), self.upper()
        tries = [0.0, lo, hi, None if lo is None or hi is None else (lo + hi) / 2,
                 None if lo is None else math.floor(lo) + 1, None if hi is None else math.ceil(hi) - 1]
        for v in tries:
            if v is not None and self.accepts(v):
                return _number_text(v)
        raise Error(f"{self.path}: no number satisfies its bounds")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of several whole JSON texts (enum, boolean)."""

    path: str
    texts: tuple[str, ...]

    def valid(self, text: str, remaining: int = 0) -> bool:
        return text in self.texts


Leaf = Str | Int | Num | Choice


@dataclasses.dataclass(frozen=True)
class Glue:
    """Nodes kept in one canvas when they fit in one (a property's key with its value)."""

    nodes: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Group:
    """Nodes present or absent together: an optional property (with its comma), an array slot, an alternative."""

    path: str
    nodes: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class OneOf:
    """anyOf: exactly one of its groups is present."""

    path: str
    options: tuple[Group, ...]


@dataclasses.dataclass(frozen=True)
class Items:
    """An array's optional slots; with `head`, the first slot has no comma, so the others need it present."""

    path: str
    slots: tuple[Group, ...]
    head: bool


Node = Fixed | Leaf | Glue | Group | OneOf | Items


@dataclasses.dataclass(frozen=True)
class JsonSchema:
    """A JSON Schema checked against the supported subset and compiled into nodes (see `compile`)."""

    schema: dict[str, Any]
    nodes: tuple[Node, ...]
    key: str  # the schema as canonical JSON (what layouts are cached by)


# ---- compiling ------------------------------------------------------------------------------------------


def _has_forbidden(text: str) -> bool:
    """Characters a JSON string cannot hold unescaped: the quote, the backslash, control characters (and
    U+FFFD, what an incomplete UTF-8 sequence decodes to)."""
    return any(ch in '"\\\ufffd' or ord(ch) < 0x20 for ch in text)


def _in_range(v: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _clamp(v: int, lo: int | None, hi: int | None) -> int:
    return max(lo, v) if lo is not None and v < lo else (min(hi, v) if hi is not None and v > hi else v)


def _cut(text: str, n: int, least: int) -> str:
    """`text` cut to at most n characters, at a word boundary when that keeps at least `least` of them."""
    if len(text) <= n:
        return text
    space = text.rfind(" ", 0, n + 1)
    return text[:space] if space >= max(least, 1) else text[:n]


def _number_text(v: float) -> str:
    """JSON text of a number: integral values without a fraction, others in their shortest form."""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _at(path: str, key: str | int) -> str:
    """The JSON path of a member: $.properties.age, $.anyOf[1], $.properties["odd key"]."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", key) else f"{path}[{json.dumps(key)}]"


def _dump(value: Any) -> str:
    """A JSON value's text, as the layout writes it (spaces after ':' and ',', as json.dumps)."""
    return json.dumps(value, ensure_ascii=False)


def _as_dict(schema: Any) -> dict[str, Any]:
    """The schema as a dict: given as one, as JSON text, or as a pydantic model class."""
    if isinstance(schema, JsonSchema):
        return schema.schema
    if isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None)):
        schema = schema.model_json_schema()  # a pydantic model class
    elif isinstance(schema, str | bytes):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise Error(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise Error(f"json_schema must be a JSON Schema object (a dict, its JSON text or a pydantic model class), "
                    f"got {type(schema).__name__}")
    return schema


def compile(schema: Any) -> JsonSchema:
    """Check `schema` (a dict, a JSON string, a pydantic model class or a compiled JsonSchema) against the
    supported subset and compile it; raises Error naming the JSON path and keyword of anything unsupported."""
    if isinstance(schema, JsonSchema):
        return schema
    s = _as_dict(schema)
    try:
        key = json.dumps(s, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise Error(f"json_schema is not JSON data: {e}") from e
    return JsonSchema(s, _Compiler(s).value(s, "$"), key)


def _number(s: dict[str, Any], k: str, path: str) -> float | int | None:
    v = s.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
        raise Error(f"{_at(path, k)}: must be a number, got {v!r}")
    return v


def _count(s: dict[str, Any], k: str, path: str) -> int | None:
    v = s.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise Error(f"{_at(path, k)}: must be an integer >= 0, got {v!r}")
    return v


class _Compiler:
    """Schema dicts to nodes; `$ref`s resolve against the root document (never recursively)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.expanding: list[str] = ["$"]  # the definitions being expanded, outermost first

    def resolve(self, ref: Any, path: str) -> tuple[Any, str]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise Error(f"{_at(path, '$ref')}: only references inside the schema ('#/$defs/Name') are supported, "
                        f"got {ref!r}")
        target: Any = self.root
        where = "$"
        for raw in ref[1:].split("/")[1:] if ref != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target, part = target[int(part)], int(part)
            else:
                raise Error(f"{_at(path, '$ref')}: {ref!r} points at nothing")
            where = _at(where, part)
        return target, where

    def value(self, s: Any, path: str) -> tuple[Node, ...]:
        """The nodes of one JSON value that `s` accepts."""
        if isinstance(s, bool):
            raise Error(f"{path}: the boolean schema {str(s).lower()} is not supported (give a type)")
        if not isinstance(s, dict):
            raise Error(f"{path}: a schema must be an object, got {type(s).__name__}")
        for k in s:
            if k not in SUPPORTED:
                raise Error(f"{path}: {k!r} is not supported")
        rules = set(s) - ANNOTATIONS
        if "$ref" in s:
            if rules - {"$ref"}:
                raise Error(f"{path}: '$ref' next to {sorted(rules - {'$ref'})} is not supported")
            target, where = self.resolve(s["$ref"], path)
            if where in self.expanding:
                raise Error(f"{_at(path, '$ref')}: the recursive reference {s['$ref']!r} is not supported")
            self.expanding.append(where)
            try:
                return self.value(target, where)
            finally:
                self.expanding.pop()
        if "const" in s or "enum" in s:
            return self.choice(s, path)
        if "anyOf" in s:
            if rules - {"anyOf"}:
                raise Error(f"{path}: 'anyOf' next to {sorted(rules - {'anyOf'})} is not supported (move them "
                            "into the alternatives)")
            alts = s["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise Error(f"{_at(path, 'anyOf')}: must be a non-empty list of schemas")
            return self.alternatives([self.value(a, _at(_at(path, "anyOf"), i)) for i, a in enumerate(alts)], path)
        t = s.get("type")
        if t is None:
            raise Error(f"{path}: a schema needs 'type' (or 'enum', 'const', 'anyOf', '$ref')")
        if isinstance(t, list):
            return self.type_list(s, t, path)
        if t not in TYPES:
            raise Error(f"{_at(path, 'type')}: unknown type {t!r} (one of {', '.join(TYPES)})")
        for k in rules - {"type"} - BY_TYPE[t]:
            raise Error(f"{path}: {k!r} does not apply to type {t!r}")
        return getattr(self, "t_" + t)(s, path)

    def alternatives(self, alts: list[tuple[Node, ...]], path: str) -> tuple[Node, ...]:
        unique = list(dict.fromkeys(alts))
        if len(unique) == 1:
            return unique[0]
        return (OneOf(path, tuple(Group(path, a) for a in unique)),)

    def type_list(self, s: dict[str, Any], types: list[Any], path: str) -> tuple[Node, ...]:
        """"type": [..] is anyOf over the types, each with the keywords that apply to it."""
        if not types or any(t not in TYPES for t in types) or len(set(types)) != len(types):
            raise Error(f"{_at(path, 'type')}: must name distinct types among {', '.join(TYPES)}, got {types!r}")
        rules = set(s) - ANNOTATIONS - {"type"}
        for k in rules - frozenset().union(*(BY_TYPE[t] for t in types)):
            raise Error(f"{path}: {k!r} does not apply to the types {types}")
        alts = []
        for t in types:
            sub = {k: v for k, v in s.items() if k in BY_TYPE[t]}
            alts.append(self.value({**sub, "type": t}, path))
        return self.alternatives(alts, path)

    def choice(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        """const / enum: whole values (of the given type, if one is given)."""
        if "const" in s and "enum" in s:
            raise Error(f"{path}: 'const' next to 'enum' is not supported")
        word = "const" if "const" in s else "enum"
        for k in set(s) - ANNOTATIONS - {"const", "enum", "type"}:
            raise Error(f"{path}: {k!r} next to {word!r} is not supported")
        values = [s["const"]] if word == "const" else s["enum"]
        if not isinstance(values, list) or not values:
            raise Error(f"{_at(path, 'enum')}: must be a non-empty list")
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not types or any(t not in TYPES for t in types):
                raise Error(f"{_at(path, 'type')}: must name types among {', '.join(TYPES)}, got {s['type']!r}")
            values = [v for v in values if _type_of(v) in types or _type_of(v) == "integer" and "number" in types]
            if not values:
                raise Error(f"{_at(path, word)}: no value is of type {s['type']!r}")
        texts = tuple(dict.fromkeys(_dump(v) for v in values))
        return (Fixed(texts[0]),) if len(texts) == 1 else (Choice(path, texts),)

    def t_null(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        return (Fixed("null"),)

    def t_boolean(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        return (Choice(path, ("true", "false")),)

    def t_string(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        lo, hi = _count(s, "minLength", path) or 0, _count(s, "maxLength", path)
        if hi is not None and hi < lo:
            raise Error(f"{path}: maxLength {hi} is below minLength {lo}")
        size = max(lo, STRING_TOKENS if hi is None else min(hi, STRING_MAX_TOKENS))
        if size == 0:
            return (Fixed('""'),)
        return (Fixed('"'), Str(path, lo, hi, size), Fixed('"'))

    def bounds(self, s: dict[str, Any], path: str) -> tuple[Any, ...]:
        if isinstance(s.get("exclusiveMinimum"), bool) or isinstance(s.get("exclusiveMaximum"), bool):
            raise Error(f"{path}: boolean exclusiveMinimum/exclusiveMaximum (draft 4) are not supported: give the "
                        "bound itself")
        return tuple(_number(s, k, path) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))

    def t_integer(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        mn, mx, xmn, xmx = self.bounds(s, path)
        lows = [math.ceil(mn)] if mn is not None else []
        lows += [math.floor(xmn) + 1] if xmn is not None else []
        highs = [math.floor(mx)] if mx is not None else []
        highs += [math.ceil(xmx) - 1] if xmx is not None else []
        lo, hi = (max(lows) if lows else None), (min(highs) if highs else None)
        if lo is not None and hi is not None and lo > hi:
            raise Error(f"{path}: no integer satisfies its bounds")
        if lo is not None and hi is not None:
            size = max(len(str(lo)), len(str(hi)))
        else:
            size = max([INTEGER_TOKENS] + [len(str(b)) for b in (lo, hi) if b is not None])
        return (Int(path, lo, hi, size),)

    def t_number(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        mn, mx, xmn, xmx = self.bounds(s, path)
        n = Num(path, mn, mx, xmn, xmx, 0)
        lo, hi = n.lower(), n.upper()
        bounded = lo is not None and hi is not None
        digits = max([len(str(int(abs(b)))) for b in (lo, hi) if b is not None] + [0 if bounded else NUMBER_DIGITS])
        sign = 0 if lo is not None and lo >= 0 else 1
        n = dataclasses.replace(n, size=sign + digits + 1 + NUMBER_FRACTION_DIGITS)
        n.canonical()  # an empty range is the schema's error, found now
        return (n,)

    def t_object(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise Error(f"{_at(path, 'properties')}: must be an object of schemas")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise Error(f"{_at(path, 'required')}: must be a list of property names")
        for k in required:
            if k not in props:
                raise Error(f"{_at(path, 'required')}: {k!r} is not in properties (diffgemma writes only the "
                            "properties it knows)")
        extra = s.get("additionalProperties", True)
        if not isinstance(extra, bool):
            raise Error(f"{_at(path, 'additionalProperties')}: a schema is not supported, only true or false "
                        "(no property outside 'properties' is ever written)")
        if not props:
            return (Fixed("{}"),)
        names = list(props)
        # Commas: properties before the first present-for-sure one carry a trailing comma, the rest a leading one.
        req = set(required) or {names[0]}  # no required property: the first one is always written
        first = next(i for i, k in enumerate(names) if k in req)
        nodes: list[Node] = [Fixed("{")]
        for i, k in enumerate(names):
            key = _dump(k) + ": "
            val = self.value(props[k], _at(_at(path, "properties"), k))
            if i < first:
                nodes.append(Group(_at(_at(path, "properties"), k), (Fixed(key), *val, Fixed(", "))))
            elif k in req:
                nodes.append(Glue((Fixed(key if i == first else ", " + key), *val)))
            else:
                nodes.append(Group(_at(_at(path, "properties"), k), (Fixed(", " + key), *val)))
        nodes.append(Fixed("}"))
        return tuple(nodes)

    def t_array(self, s: dict[str, Any], path: str) -> tuple[Node, ...]:
        if "items" not in s:
            raise Error(f"{path}: an array needs 'items' (the schema of its items)")
        lo, hi = _count(s, "minItems", path) or 0, _count(s, "maxItems", path)
        if hi is not None and hi < lo:
            raise Error(f"{path}: maxItems {hi} is below minItems {lo}")
        slots = max(lo, ITEMS if hi is None else min(hi, MAX_ITEMS))
        if slots == 0:
            return (Fixed("[]"),)
        item = self.value(s["items"], _at(path, "items"))
        nodes: list[Node] = [Fixed("[")]
        nodes += [Glue(((Fixed(", "),) if i else ()) + item) for i in range(lo)]
        opt = tuple(Group(_at(_at(path, "items"), i), ((Fixed(", "),) if i else ()) + item)
                    for i in range(lo, slots))
        if opt:
            nodes.append(Items(path, opt, head=lo == 0))
        nodes.append(Fixed("]"))
        return tuple(nodes)


def _type_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or isinstance(v, float) and v.is_integer():
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(v), "unknown")


# ---- per-position token sets ----------------------------------------------------------------------------

_DIGITS = frozenset("0123456789")
# Grammar-wide token classes, decided on each token's text alone (the commit rule reads the real text).
SETS: dict[str, Callable[[str], bool]] = {
    "string": lambda p: not _has_forbidden(p),  # a JSON string's characters
    "digits": lambda p: set(p) <= _DIGITS,
    "signed": lambda p: p[0] in _DIGITS | {"-"} and set(p[1:]) <= _DIGITS,  # a leading minus allowed
    "point": lambda p: p == ".",
}
_texts: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
_sets: weakref.WeakKeyDictionary[Any, dict[str, np.ndarray]] = weakref.WeakKeyDictionary()


def token_set(tokenizer: Any, name: str) -> np.ndarray:
    """Bool [n_vocab]: the tokens of a grammar class (computed once per tokenizer; control tokens never)."""
    sets = _sets.setdefault(tokenizer, {})
    if name not in sets:
        if tokenizer not in _texts:  # as printed; a special-looking piece ("<unk>") as detokenize writes it
            _texts[tokenizer] = [tokenizer.detokenize([t]) if p[:1] == "<" and p[-1:] == ">" else p
                                 for t, p in enumerate(token_texts(tokenizer))]
        pred, ctl = SETS[name], tokenizer.control_ids
        sets[name] = np.array([bool(p) and t not in ctl and pred(p) for t, p in enumerate(_texts[tokenizer])])
    return sets[name]


# ---- the layout: nodes placed on canvas positions ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Text:
    """Mandatory fixed text (clamped positions)."""

    text: str


@dataclasses.dataclass(frozen=True)
class _Run:
    """A group's fixed text: hole positions that hold exactly its tokens (present) or the filler (absent)."""

    start: int
    ids: tuple[int, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class _Value:
    start: int
    n: int
    leaf: Leaf
    canonical: tuple[int, ...]  # the tokens of a valid value, the last resort of a repair

    @property
    def end(self) -> int:
        return self.start + self.n


@dataclasses.dataclass(frozen=True)
class _Group:
    start: int
    end: int
    parts: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _OneOf:
    start: int
    end: int
    options: tuple[_Group, ...]


@dataclasses.dataclass(frozen=True)
class _Items:
    slots: tuple[_Group, ...]
    head: bool  # the first slot absent means every slot absent

    @property
    def start(self) -> int:
        return self.slots[0].start


ABSENT, PRESENT, BROKEN = "absent", "present", "broken"


@dataclasses.dataclass(frozen=True, eq=False)
class SchemaLayout(Layout):
    """A JSON Schema laid out for one model: a template Layout with the rules checked at commit."""

    parts: tuple[Any, ...]  # the placed nodes, in order
    tokenizer_ref: weakref.ref  # the model's tokenizer (weak: the layout cache must not keep models alive)
    schema: JsonSchema

    @property
    def tokenizer(self) -> Any:
        tok = self.tokenizer_ref()
        if tok is None:
            raise Error("this json_schema layout's model is gone")
        return tok

    # -- reading tokens --

    def _text(self, toks: np.ndarray) -> str:
        ids = [int(t) for t in toks if t != self.filler]
        return self.tokenizer.detokenize(ids) if ids else ""

    def _state(self, g: _Group, toks: np.ndarray) -> str:
        seg = toks[g.start:g.end]
        if (seg == self.filler).all():
            return ABSENT
        runs = [r for r in g.parts if isinstance(r, _Run)]
        if not runs:  # a bare value (an anyOf alternative, an array slot without comma): there when not empty
            return PRESENT
        return PRESENT if all(tuple(toks[r.start:r.start + len(r.ids)]) == r.ids for r in runs) else BROKEN

    def _value_ok(self, v: _Value, toks: np.ndarray, end: int) -> bool:
        """The value (or, for a string cut by a canvas edge at `end`, its part so far) follows its rule."""
        text = self._text(toks[v.start:min(v.end, end)])
        return v.leaf.valid(text, max(0, v.end - end))

    # -- checking: positions to re-noise --

    def _bad(self, node: Any, toks: np.ndarray, a: int, b: int) -> list[tuple[int, int]]:
        """Position ranges of broken values in `node` (those committing in canvas [a, b))."""
        if isinstance(node, _Value):
            if node.end <= a or node.start >= b or self._value_ok(node, toks, b):
                return []
            s, e = max(a, node.start), min(b, node.end)
            return self._string_tail(node, toks, s, e) if isinstance(node.leaf, Str) else [(s, e)]
        if isinstance(node, _Group):
            if not a <= node.start < b:
                return []
            state = self._state(node, toks)
            if state == BROKEN:
                return [(node.start, node.end)]
            return [] if state == ABSENT else [r for p in node.parts for r in self._bad(p, toks, a, b)]
        if isinstance(node, _OneOf):
            if not a <= node.start < b:
                return []
            states = [self._state(o, toks) for o in node.options]
            if states.count(PRESENT) != 1 or BROKEN in states:
                return [(node.start, node.end)]
            return self._bad(node.options[states.index(PRESENT)], toks, a, b)
        if isinstance(node, _Items):
            out: list[tuple[int, int]] = []
            head_absent = node.head and self._state(node.slots[0], toks) == ABSENT
            for i, g in enumerate(node.slots):
                if not a <= g.start < b:
                    continue
                if i and head_absent and self._state(g, toks) != ABSENT:
                    out += [(g.start, g.end)] + ([(node.start, node.slots[0].end)] if node.start >= a else [])
                else:
                    out += self._bad(g, toks, a, b)
            return out
        return []

    def _string_tail(self, v: _Value, toks: np.ndarray, s: int, e: int) -> list[tuple[int, int]]:
        """The offending positions of a broken string in [s, e): too long, those from the token that passes
        maxLength; too short, its fillers; a bad character, all."""
        leaf = v.leaf
        assert isinstance(leaf, Str)
        text = self._text(toks[v.start:e])
        if _has_forbidden(text):
            return [(s, e)]
        if leaf.max_len is not None and len(text) > leaf.max_len:
            cut = next(p for p in range(s, e + 1) if len(self._text(toks[v.start:p + 1])) > leaf.max_len)
            return [(cut, e)]
        return [(p, p + 1) for p in range(s, e) if toks[p] == self.filler] or [(s, e)]

    def check(self, tokens: np.ndarray, c: int) -> np.ndarray | None:
        """Bool [canvas]: positions of canvas c to re-noise because a value there breaks its rule, or None.
        `tokens`: the template's positions up to the end of canvas c, as they would commit."""
        toks = np.asarray(tokens)
        a, b = c * self.canvas_length, (c + 1) * self.canvas_length
        ranges = [r for p in self.parts for r in self._bad(p, toks, a, b)]
        if not ranges:
            return None
        bad = np.zeros(self.canvas_length, dtype=bool)
        for s, e in ranges:
            bad[s - a:e - a] = True
        return bad & ~self.fixed[a:b]

    # -- repairing: the nearest valid value when no step is left --

    def _write(self, toks: np.ndarray, start: int, n: int, ids: Any) -> None:
        toks[start:start + n] = self.filler
        toks[start:start + len(ids)] = ids

    def _fits(self, text: str, n: int) -> list[int] | None:
        ids = self.tokenizer.tokenize(text, add_special=False) if text else []
        return ids if len(ids) <= n and self.tokenizer.detokenize(ids) == text else None

    def _fix_value(self, v: _Value, toks: np.ndarray, a: int, b: int) -> int:
        if v.end <= a or v.start >= b or self._value_ok(v, toks, b):
            return 0
        s, e = max(a, v.start), min(b, v.end)
        leaf = v.leaf
        if isinstance(leaf, Str):  # rewrite only this canvas's part; the part before it is committed
            before = self._text(toks[v.start:s])
            remaining = max(0, v.end - b)
            need = leaf.min_len - remaining - len(before)
            cur = "".join(ch for ch in self._text(toks[s:e]) if not _has_forbidden(ch))
            if leaf.max_len is not None and len(before) + len(cur) > leaf.max_len:
                cur = _cut(cur, max(0, leaf.max_len - len(before)), max(0, need))
            for text in (cur + PAD_CHAR * max(0, need - len(cur)), PAD_CHAR * max(0, need)):
                ids = self._fits(text, e - s)
                if ids is not None:
                    trial = toks.copy()
                    self._write(trial, s, e - s, ids)
                    if self._value_ok(v, trial, b):
                        self._write(toks, s, e - s, ids)
                        return 1
            raise Error(f"{leaf.path}: internal error: no valid repair of the string")  # pragma: no cover
        text = self._text(toks[s:e])
        if isinstance(leaf, Choice):  # the choice agreeing with the most positions
            options = [self.tokenizer.tokenize(t, add_special=False) for t in leaf.texts]
            cur = toks[s:e].tolist()
            ids = max(options, key=lambda o: sum(x == y for x, y in zip(o, cur, strict=False)))
        else:
            ids = next((i for t in leaf.candidates(text) if (i := self._fits(t, v.n)) is not None), v.canonical)
        self._write(toks, s, v.n, ids)
        return 1

    def _blank(self, toks: np.ndarray, g: _Group) -> int:
        if (toks[g.start:g.end] == self.filler).all():
            return 0
        toks[g.start:g.end] = self.filler
        return 1

    def _canonical(self, toks: np.ndarray, g: _Group) -> None:
        """Write the group present with canonical values (nested groups absent, first alternatives)."""
        toks[g.start:g.end] = self.filler
        for p in g.parts:
            if isinstance(p, _Run):
                toks[p.start:p.start + len(p.ids)] = p.ids
            elif isinstance(p, _Value):
                self._write(toks, p.start, p.n, p.canonical)
            elif isinstance(p, _OneOf):
                self._canonical(toks, p.options[0])

    def _fix(self, node: Any, toks: np.ndarray, a: int, b: int) -> int:
        """Make `node` valid in place (only positions in [a, b) change); returns the values replaced."""
        if isinstance(node, _Value):
            return self._fix_value(node, toks, a, b)
        if isinstance(node, _Group):
            if not a <= node.start < b:
                return 0
            state = self._state(node, toks)
            if state == BROKEN:
                return self._blank(toks, node)
            return 0 if state == ABSENT else sum(self._fix(p, toks, a, b) for p in node.parts)
        if isinstance(node, _OneOf):
            if not a <= node.start < b:
                return 0
            states = [self._state(o, toks) for o in node.options]
            n = 0
            if PRESENT not in states:
                self._canonical(toks, node.options[0])
                states[0], n = PRESENT, 1
            keep = states.index(PRESENT)
            n += sum(self._blank(toks, o) for i, o in enumerate(node.options) if i != keep)
            return n + self._fix(node.options[keep], toks, a, b)
        if isinstance(node, _Items):
            n = self._fix(node.slots[0], toks, a, b)  # first: a broken head becomes absent
            head_absent = node.head and self._state(node.slots[0], toks) == ABSENT
            for g in node.slots[1:]:
                if a <= g.start < b:
                    n += self._blank(toks, g) if head_absent else self._fix(g, toks, a, b)
            return n
        return 0

    def repair(self, tokens: np.ndarray, c: int) -> tuple[np.ndarray, int]:
        """Canvas c's tokens with every broken value replaced by the nearest valid one (a broken optional
        group, anyOf alternative or array slot becomes absent; a value its nearest valid text, else its
        canonical one), and how many were replaced."""
        toks = np.array(tokens)
        a, b = c * self.canvas_length, (c + 1) * self.canvas_length
        n = sum(self._fix(p, toks, a, b) for p in self.parts)
        return toks[a:b], n

    # -- the text --

    def _fill(self, node: Any, toks: np.ndarray, holes: list[str]) -> str:
        if isinstance(node, _Text | _Run):
            return node.text
        if isinstance(node, _Value):
            holes.append(self._text(toks[node.start:node.end]))
            return holes[-1]
        if isinstance(node, _Group):
            if self._state(node, toks) == ABSENT:
                return ""
            return "".join(self._fill(p, toks, holes) for p in node.parts)
        parts = node.options if isinstance(node, _OneOf) else node.slots
        return "".join(self._fill(p, toks, holes) for p in parts)

    def fill(self, tokens: np.ndarray, detokenize: Callable[[list[int]], str]
             ) -> tuple[str, list[str], list[int]]:
        """(JSON text, each value's text, tokens without fillers) of the filled layout."""
        toks = np.asarray(tokens)[: self.n_template]
        holes: list[str] = []
        text = "".join(self._fill(p, toks, holes) for p in self.parts)
        return text, holes, [int(t) for t in toks if t != self.filler]

    def value(self, text: str) -> Any:
        """The parsed JSON value of a filled layout's text."""
        try:
            return json.loads(text)
        except ValueError as e:  # pragma: no cover - the layout's rules make this impossible
            raise Error(f"internal error: the structured output is not JSON ({e}): {text!r}") from e


class _Builder:
    """Places compiled nodes on canvas positions for one model."""

    def __init__(self, model: Any) -> None:
        self.tok = model.tokenizer
        self.L = model.hparams.canvas_length
        self.V = model.hparams.n_vocab
        self.filler = filler_id(model)
        self.tokens: list[int] = []
        self.fixed: list[bool] = []
        self.hole: list[int] = []
        self.rows: list[int] = []
        self.n_holes = 0
        self.table: list[np.ndarray] = [np.ones(self.V, dtype=bool)]
        self.row_of: dict[tuple, int] = {}
        self._ids: dict[str, tuple[int, ...]] = {}

    def ids(self, text: str) -> tuple[int, ...]:
        if text not in self._ids:
            self._ids[text] = tuple(self.tok.tokenize(text, add_special=False))
        return self._ids[text]

    def row(self, allowed: str | tuple[int, ...], filler: bool) -> int:
        """The table row of a token class (or token ids), with or without the filler."""
        key = (allowed, filler)
        if key not in self.row_of:
            if isinstance(allowed, str):
                mask = token_set(self.tok, allowed).copy()
            else:
                mask = np.zeros(self.V, dtype=bool)
                mask[list(allowed)] = True
            mask[self.filler] |= filler
            if not mask.any():
                raise Error(f"this vocabulary has no token for {allowed!r}")
            self.row_of[key] = len(self.table)
            self.table.append(mask)
        return self.row_of[key]

    def put_fixed(self, ids: Any) -> None:
        for t in ids:
            self.tokens.append(int(t))
            self.fixed.append(True)
            self.hole.append(-1)
            self.rows.append(0)

    def put_hole(self, rows: list[int]) -> int:
        start = len(self.tokens)
        for r in rows:
            self.tokens.append(0)
            self.fixed.append(False)
            self.hole.append(self.n_holes)
            self.rows.append(r)
        self.n_holes += 1
        return start

    def keep_together(self, size: int) -> None:
        """Start the next `size` positions on a fresh canvas when they fit in one but not in this one's rest."""
        off = len(self.tokens) % self.L
        if off and size <= self.L and off + size > self.L:
            self.put_fixed([self.filler] * (self.L - off))

    def size(self, node: Node) -> int:
        if isinstance(node, Fixed):
            return len(self.ids(node.text))
        if isinstance(node, Choice):
            return max(len(self.ids(t)) for t in node.texts)
        if isinstance(node, Str | Int | Num):
            return node.size
        parts = node.options if isinstance(node, OneOf) else node.slots if isinstance(node, Items) else node.nodes
        return sum(self.size(p) for p in parts)

    def value(self, leaf: Leaf, grouped: bool) -> _Value:
        """A value's hole, each position's row following the value's grammar."""
        n = self.size(leaf)
        if isinstance(leaf, Choice):
            options = [self.ids(t) for t in leaf.texts]
            for t, o in zip(leaf.texts, options, strict=True):
                if self.tok.detokenize(list(o)) != t:
                    raise Error(f"{leaf.path}: the value {t} does not survive tokenization in this vocabulary")
            rows = [self.row(tuple(sorted({o[i] for o in options if len(o) > i})),
                             grouped or any(len(o) <= i for o in options)) for i in range(n)]
            canonical = options[0]
        else:
            if isinstance(leaf, Str):
                rows = [self.row("string", grouped or i >= leaf.min_len) for i in range(n)]
                text = PAD_CHAR * leaf.min_len
            else:  # [sign or digit] digits ... (a number: then one position for the point, then digits)
                lo = leaf.lo if isinstance(leaf, Int) else leaf.lower()
                int_part = n if isinstance(leaf, Int) else n - 1 - NUMBER_FRACTION_DIGITS
                rows = [self.row("signed" if lo is None or lo < 0 else "digits", grouped)]
                rows += [self.row("digits", True)] * (int_part - 1)
                if isinstance(leaf, Num):
                    rows += [self.row("point", True)] + [self.row("digits", True)] * NUMBER_FRACTION_DIGITS
                text = leaf.canonical()
            canonical = self.ids(text)
            if len(canonical) > n or self.tok.detokenize(list(canonical)) != text or not leaf.valid(text):
                raise Error(f"{leaf.path}: the value {text!r} does not fit in {n} tokens of this vocabulary")
        return _Value(self.put_hole(rows), n, leaf, tuple(canonical))

    def group(self, g: Group) -> _Group:
        start = len(self.tokens)
        parts = tuple(p for node in g.nodes for p in self.emit(node, True))
        return _Group(start, len(self.tokens), parts)

    def emit(self, node: Node, grouped: bool) -> list[Any]:
        """Place `node` (inside a group when `grouped`: nothing there is clamped and nothing is padded)."""
        if isinstance(node, Fixed):
            ids = self.ids(node.text)
            if not grouped:
                self.put_fixed(ids)
                return [_Text(node.text)]
            return [_Run(self.put_hole([self.row((t,), True) for t in ids]), ids, node.text)]
        if isinstance(node, Glue):
            if not grouped:
                self.keep_together(self.size(node))
            return [p for n in node.nodes for p in self.emit(n, grouped)]
        if isinstance(node, Str | Int | Num | Choice):
            if not grouped and not isinstance(node, Str):  # only a string's rule holds across a canvas edge
                if self.size(node) > self.L:
                    raise Error(f"{node.path}: this value takes {self.size(node)} tokens, more than a canvas holds "
                                f"({self.L}); only strings may cross a canvas edge")
                self.keep_together(self.size(node))
            return [self.value(node, grouped)]
        if isinstance(node, Group):
            if not grouped:
                if self.size(node) > self.L:  # too long to be atomic: always written (still valid)
                    return self.emit(Glue(node.nodes), False)
                self.keep_together(self.size(node))
            return [self.group(node)]
        if isinstance(node, OneOf):
            if not grouped:
                if self.size(node) > self.L:  # too long to be atomic: its first non-null alternative, always
                    first = next((o for o in node.options if o.nodes != (Fixed("null"),)), node.options[0])
                    return self.emit(Glue(first.nodes), False)
                self.keep_together(self.size(node))
            start = len(self.tokens)
            options = tuple(self.group(o) for o in node.options)
            return [_OneOf(start, len(self.tokens), options)]
        if isinstance(node, Items):
            if not grouped and max(self.size(g) for g in node.slots) > self.L:  # every slot written
                return [p for g in node.slots for p in self.emit(Glue(g.nodes), False)]
            slots = []
            for g in node.slots:
                if not grouped:
                    self.keep_together(self.size(g))
                slots.append(self.group(g))
            return [_Items(tuple(slots), node.head)]
        raise TypeError(node)  # pragma: no cover

    def build(self, js: JsonSchema) -> SchemaLayout:
        parts = tuple(p for node in js.nodes for p in self.emit(node, False))
        n_template = len(self.tokens)
        self.put_fixed([self.filler] * (-n_template % self.L))
        return SchemaLayout(self.L, np.array(self.tokens, dtype=np.int64), np.array(self.fixed, dtype=bool),
                            np.array(self.hole), np.array(self.rows, dtype=np.int32),
                            np.stack(self.table) if len(self.table) > 1 else None, [], self.filler, n_template,
                            parts, weakref.ref(self.tok), js)


_layouts: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[str, int], SchemaLayout]] = weakref.WeakKeyDictionary()
_CACHED_LAYOUTS = 16  # per tokenizer: a server answering with a few schemas lays each out once


def lay_out(model: Any, schema: Any) -> SchemaLayout:
    """`schema` (a dict, a JSON string, a pydantic model class or a compiled JsonSchema) laid out for `model`;
    the same layout object for the same schema and model (its vocabulary table stays on the device)."""
    if isinstance(schema, SchemaLayout):
        if schema.tokenizer_ref() is not model.tokenizer or schema.canvas_length != model.hparams.canvas_length:
            raise Error("this json_schema layout was made for another model")
        return schema
    js = compile(schema)
    cache = _layouts.setdefault(model.tokenizer, OrderedDict())
    key = (js.key, model.hparams.canvas_length)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    lay = _Builder(model).build(js)
    cache[key] = lay
    if len(cache) > _CACHED_LAYOUTS:
        cache.popitem(last=False)
    return lay
