"""Structured output: a JSON Schema laid over the canvas as a template whose every completion validates
(docs/structured.md). `schema_compile` checks a schema against the supported subset and compiles it into nodes;
this module places them for one model.

`lay_out(model, schema)` tokenizes the compiled tree into a `SchemaLayout` (a template Layout): mandatory fixed
text is clamped like a template's; values are holes whose per-position vocabularies follow their grammar (a
string takes no `"`, backslash or control character; an integer digits and a leading `-`); a group's own text
becomes hole positions that allow exactly its token or the filler. What a per-position set cannot say (no
leading zeros, a bound, one enum choice, a whole group present or absent) is checked when a canvas would
commit: `check` names the positions to re-noise, and `repair` replaces a broken value by the nearest valid one
when no step is left, so every answer parses and validates.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import Error
from .schema_compile import (
    NUMBER_FRACTION_DIGITS,
    Choice,
    Fixed,
    Glue,
    Group,
    Int,
    Items,
    JsonSchema,
    Leaf,
    Node,
    Num,
    OneOf,
    Str,
    compile,
    has_forbidden,
)
from .template import Layout, filler_id, token_texts

PAD_CHAR = "."  # what lengthens a string cut below its minLength by a repair


def _cut(text: str, n: int, least: int) -> str:
    """`text` cut to at most n characters, at a word boundary when that keeps at least `least` of them."""
    if len(text) <= n:
        return text
    space = text.rfind(" ", 0, n + 1)
    return text[:space] if space >= max(least, 1) else text[:n]


# ---- per-position token sets ----------------------------------------------------------------------------

_DIGITS = frozenset("0123456789")
# Grammar-wide token classes, decided on each token's text alone (the commit rule reads the real text).
SETS: dict[str, Callable[[str], bool]] = {
    "string": lambda p: not has_forbidden(p),  # a JSON string's characters
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
    end: int


@dataclasses.dataclass(frozen=True)
class _Run:
    """A group's fixed text: hole positions that hold exactly its tokens (present) or the filler (absent)."""

    start: int
    ids: tuple[int, ...]
    text: str

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


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

    @property
    def end(self) -> int:
        return self.slots[-1].end


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
        ids = [int(t) for t in toks if t != self.filler]  # markers kept: a tool call's choices hold <|"|>
        return self.tokenizer.detokenize(ids, special=True) if ids else ""

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
        if has_forbidden(text) or any(f in text for f in leaf.forbidden):
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
        return ids if len(ids) <= n and self.tokenizer.detokenize(ids, special=True) == text else None

    def _fix_value(self, v: _Value, toks: np.ndarray, a: int, b: int) -> int:
        if v.end <= a or v.start >= b or self._value_ok(v, toks, b):
            return 0
        s, e = max(a, v.start), min(b, v.end)
        leaf = v.leaf
        if isinstance(leaf, Str):  # rewrite only this canvas's part; the part before it is committed
            before = self._text(toks[v.start:s])
            remaining = max(0, v.end - b)
            need = leaf.min_len - remaining - len(before)
            cur = leaf.clean(self._text(toks[s:e]))
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

    def partial(self, tokens: np.ndarray, end: int) -> str:
        """The text of the parts wholly before position `end` (the canvases committed so far), up to the first
        that is not: a start of the final text, since committed positions never change and the text follows the
        positions' order. A string still open at `end` waits for its end."""
        out: list[str] = []
        self._before(self.parts, np.asarray(tokens), end, out)
        return "".join(out)

    def _before(self, parts: tuple[Any, ...], toks: np.ndarray, end: int, out: list[str]) -> bool:
        for p in parts:
            if p.end <= end:
                out.append(self._fill(p, toks, []))
                continue
            if isinstance(p, _Items):  # its slots commit one canvas at a time
                self._before(p.slots, toks, end, out)
            return False
        return True

    def value(self, text: str) -> Any:
        """The parsed JSON value of a filled layout's text (None for a tool call: chat parses it)."""
        if self.schema.syntax != "json":
            return None
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
                if self.tok.detokenize(list(o), special=True) != t:
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
            if len(canonical) > n or self.tok.detokenize(list(canonical), special=True) != text or \
                    not leaf.valid(text):
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
                return [_Text(node.text, len(self.tokens))]
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
                if self.size(node) > self.L and node.choose:
                    raise Error(f"{node.path}: the alternatives take {self.size(node)} tokens, more than a canvas "
                                f"holds ({self.L}), so they cannot be laid out for the model to choose among")
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
