"""Structured output, part one: a JSON Schema checked against the supported subset and compiled into nodes, with no
model involved (docs/structured.md). `structured` lays the nodes over a model's canvases.

`compile(schema)` turns a schema (a dict, its JSON text or a pydantic model class) into a tree of nodes: fixed
text (braces, keys, quotes, commas), values (string characters, integers, numbers, whole choices) and groups
that are present or absent as a whole (optional properties, array slots, anyOf alternatives). Anything outside
the supported subset is an Error naming the keyword and its JSON path.

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
from collections.abc import Callable
from typing import Any

from . import chat_format
from .errors import Error

STRING_TOKENS = 16  # a string without maxLength
STRING_MAX_TOKENS = 64  # most positions a string takes, whatever its maxLength (unless minLength needs more)
INTEGER_TOKENS = 10  # an integer without both bounds: a sign and nine digits
NUMBER_DIGITS = 6  # integer digits of a number without both bounds
NUMBER_FRACTION_DIGITS = 4  # room after the decimal point
ITEMS = 3  # array slots without maxItems (or minItems, if more)
MAX_ITEMS = 16  # most array slots, whatever maxItems (unless minItems needs more)

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
    forbidden: tuple[str, ...] = ()  # texts the string may not hold (Gemma 4's markers, in a tool call)

    def valid(self, text: str, remaining: int = 0) -> bool:
        """Legal characters and a length that fits (`remaining` positions still to come may add characters)."""
        return (not has_forbidden(text) and not any(f in text for f in self.forbidden)
                and (self.max_len is None or len(text) <= self.max_len) and len(text) + remaining >= self.min_len)

    def clean(self, text: str) -> str:
        """`text` without the characters and texts it may not hold."""
        text = "".join(ch for ch in text if not has_forbidden(ch))
        while any(f in text for f in self.forbidden):
            for f in self.forbidden:
                text = text.replace(f, "")
        return text


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
    """anyOf: exactly one of its groups is present. Wider than a canvas, the first non-null one is always
    written, unless `choose` (the model must choose: an Error then)."""

    path: str
    options: tuple[Group, ...]
    choose: bool = False


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
    key: str  # the schema as canonical JSON and the syntax (what layouts are cached by)
    syntax: str = "json"  # the text is JSON ("json"), or Gemma 4's tool-call syntax ("gemma"; see tool_layout)


@dataclasses.dataclass(frozen=True)
class Syntax:
    """How the text writes a value's punctuation: JSON, or the arguments of Gemma 4's tool calls (chat_format:
    `{key:VALUE,...}`, strings between <|"|> without escapes, keys unquoted)."""

    name: str
    quote: str  # around a string
    colon: str  # after a key
    comma: str  # between members and items
    literal: Callable[[Any], str]  # an enum or const value's whole text
    key: Callable[[str], str]  # a property name's text
    forbidden: tuple[str, ...] = ()  # texts no string value may hold


# ---- compiling ------------------------------------------------------------------------------------------


def has_forbidden(text: str) -> bool:
    """Characters a JSON string cannot hold unescaped: the quote, the backslash, control characters (and
    U+FFFD, what an incomplete UTF-8 sequence decodes to)."""
    return any(ch in '"\\\ufffd' or ord(ch) < 0x20 for ch in text)


def _in_range(v: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _clamp(v: int, lo: int | None, hi: int | None) -> int:
    return max(lo, v) if lo is not None and v < lo else (min(hi, v) if hi is not None and v > hi else v)


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


def _gemma_literal(value: Any) -> str:
    """An enum or const value as a tool call writes it; an Error when the call parser would not read it back."""
    text = chat_format.format_value(value)
    try:
        back = chat_format.parse_value(text)
    except ValueError:
        back = None
    if back != value or any(m in text for m in chat_format.MARKERS if m != chat_format.QUOTE):
        raise Error(f"the value {_dump(value)} cannot be written in Gemma 4's tool-call syntax")
    return text


def _gemma_key(name: str) -> str:
    """A property name as Gemma 4 writes it: bare when the call parser reads it back bare, else quoted."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        return name
    return _gemma_literal(name)


JSON = Syntax("json", '"', ": ", ", ", _dump, _dump)
GEMMA = Syntax("gemma", chat_format.QUOTE, ":", ",", _gemma_literal, _gemma_key, tuple(chat_format.MARKERS))


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


def compile(schema: Any, syntax: Syntax = JSON) -> JsonSchema:
    """Check `schema` (a dict, a JSON string, a pydantic model class or a compiled JsonSchema) against the
    supported subset and compile it; raises Error naming the JSON path and keyword of anything unsupported.
    syntax: JSON (the default), or GEMMA for the arguments of a tool call."""
    if isinstance(schema, JsonSchema):
        return schema
    s = _as_dict(schema)
    try:
        key = json.dumps(s, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise Error(f"json_schema is not JSON data: {e}") from e
    return JsonSchema(s, _Compiler(s, syntax).value(s, "$"), f"{syntax.name}:{key}", syntax.name)


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

    def __init__(self, root: dict[str, Any], syntax: Syntax = JSON) -> None:
        self.root = root
        self.syntax = syntax
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
        texts = tuple(dict.fromkeys(self.syntax.literal(v) for v in values))
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
            return (Fixed(self.syntax.quote * 2),)
        q = Fixed(self.syntax.quote)
        return (q, Str(path, lo, hi, size, self.syntax.forbidden), q)

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
            key = self.syntax.key(k) + self.syntax.colon
            comma = self.syntax.comma
            val = self.value(props[k], _at(_at(path, "properties"), k))
            if i < first:
                nodes.append(Group(_at(_at(path, "properties"), k), (Fixed(key), *val, Fixed(comma))))
            elif k in req:
                nodes.append(Glue((Fixed(key if i == first else comma + key), *val)))
            else:
                nodes.append(Group(_at(_at(path, "properties"), k), (Fixed(comma + key), *val)))
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
        comma = (Fixed(self.syntax.comma),)
        nodes += [Glue((comma if i else ()) + item) for i in range(lo)]
        opt = tuple(Group(_at(_at(path, "items"), i), (comma if i else ()) + item)
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
