"""Templates: fixed text with holes, laid over canvases, each hole with its own vocabulary (docs/templates.md).

A canvas model sees the whole canvas at once, so it can fill holes *between* fixed text. A template is text
with `{{hole N ...}}` tags, or a list of parts (`str` for fixed text, `Hole` for a hole). `lay_out` tokenizes it
for one model: per canvas position either a fixed token (clamped at every step) or a hole position with a row
of the vocabulary table (applied on the device before sampling).

Syntax: `{{hole N}}` is a hole of N tokens. After N come, in any order: token class names (`digits`,
`letters`, ...; several make a union), or quoted JSON strings whose tokens are allowed (`"yes" "no"`), and the
flag `empty` (the hole may use the filler token, so its value can be shorter than N; fillers are dropped from
the text). A backslash before `{{` makes it literal text; `\\\\{{` is a literal backslash followed by a tag.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .errors import Error


def _is_word(p: str) -> bool:
    return any(c.isalpha() for c in p) and all(c.isalpha() or c in " '-" for c in p) or p == " "


# Named token classes: predicates on a token's text (control tokens and empty pieces never match).
CLASSES: dict[str, Callable[[str], bool]] = {
    "digits": lambda p: p.isascii() and p.isdigit(),  # 0-9 only
    "letters": str.isalpha,  # letters only, no spaces
    "upper": lambda p: p.isalpha() and p.isupper(),  # capital letters (speaker headings, acronyms)
    "alnum": str.isalnum,  # letters and digits
    "words": _is_word,  # letters with spaces, apostrophes and hyphens (names, phrases)
    "no-newline": lambda p: "\n" not in p and "\r" not in p,  # anything on one line
    "text": lambda p: True,  # any non-control token
}


@dataclasses.dataclass(frozen=True)
class Hole:
    """A hole of `n_tokens` canvas positions.

    allowed: None (any token), a str of class names (`"digits"`, `"letters alnum"`: a union), or an iterable of
    token ids (int) and texts (str, each adds its tokens). empty: the hole may also use the filler token, so its
    value can be shorter; fillers are dropped from the returned text."""

    n_tokens: int
    allowed: Any = None
    empty: bool = False
    where: str = dataclasses.field(default="", compare=False, repr=False)  # for error messages


Part = str | Hole


# ---- parsing --------------------------------------------------------------------------------------------


def _line_col(text: str, i: int) -> str:
    line = text.count("\n", 0, i) + 1
    return f"line {line}, column {i - (text.rfind(chr(10), 0, i) + 1) + 1}"


_TAG_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|[^\s"}]+(?:}(?!})[^\s"}]*)*|}})', re.S)


def parse(text: str) -> list[Part]:
    """Parse template text into parts; raises Error naming the line and column of a bad tag."""
    if not isinstance(text, str):
        raise Error(f"a template must be a str or a list of parts, not {type(text).__name__}")
    parts: list[Part] = []
    buf: list[str] = []
    i = 0
    while True:
        j = text.find("{{", i)
        if j < 0:
            buf.append(text[i:])
            break
        r = j  # a run of braces: the tag opens at its last two ("{{{hole 2}}}" is "{" + a hole + "}")
        while r < len(text) and text[r] == "{":
            r += 1
        k = j  # backslashes right before the run: pairs are literal backslashes, an odd one escapes the run
        while k > i and text[k - 1] == "\\":
            k -= 1
        n_bs = j - k
        buf.append(text[i:k] + "\\" * (n_bs // 2))
        if n_bs % 2:
            buf.append(text[j:r])
            i = r
            continue
        buf.append(text[j:r - 2])
        hole, i = _parse_tag(text, r - 2)
        if "".join(buf):
            parts.append("".join(buf))
        buf = []
        parts.append(hole)
    if "".join(buf):
        parts.append("".join(buf))
    return parts


def _parse_tag(text: str, start: int) -> tuple[Hole, int]:
    """The tag opening at text[start] ('{{'); returns the hole and the index after its '}}'."""
    where = f"hole at {_line_col(text, start)}"
    words: list[str] = []
    i = start + 2
    while True:
        m = _TAG_TOKEN.match(text, i)
        if m is None or m.end() == i:
            raise Error(f"template: unclosed {where} (no matching '}}}}')")
        i = m.end()
        if m.group(1) == "}}":
            break
        words.append(m.group(1))
    if not words or words[0] != "hole":
        raise Error(f"template: unknown tag {{{{{' '.join(words)}}}}} at {_line_col(text, start)} (write "
                    "{{hole N}}, or \\{{ for literal braces)")
    if len(words) < 2 or not re.fullmatch(r"[0-9]+", words[1]):
        raise Error(f"template: {where} needs a size, e.g. {{{{hole 8}}}}")
    n = int(words[1])
    if n == 0:
        raise Error(f"template: {where} has zero size")
    classes: list[str] = []
    texts: list[str] = []
    empty = False
    for w in words[2:]:
        if w.startswith('"'):
            try:
                texts.append(json.loads(w))
            except ValueError as e:
                raise Error(f"template: {where}: bad quoted string {w}: {e}") from e
        elif w == "empty":
            empty = True
        elif w in CLASSES:
            classes.append(w)
        else:
            raise Error(f"template: {where}: unknown token class {w!r} (known: {', '.join(CLASSES)}; quote "
                        "texts)")
    if classes and texts:
        raise Error(f"template: {where} takes either class names or quoted strings, not both")
    allowed: Any = " ".join(classes) if classes else (tuple(texts) if texts else None)
    return Hole(n, allowed, empty, where), i


def _parts(template: Any) -> list[Part]:
    if isinstance(template, str):
        return parse(template)
    if not isinstance(template, list | tuple):
        raise Error(f"a template must be a str or a list of parts, not {type(template).__name__}")
    parts: list[Part] = []
    for i, p in enumerate(template):
        if isinstance(p, Hole):
            parts.append(p if p.where else dataclasses.replace(p, where=f"hole (template part {i})"))
        elif isinstance(p, str):
            parts.append(p)
        else:
            raise Error(f"template part {i} must be a str or a dg.Hole, not {type(p).__name__}")
    return parts


# ---- vocabularies ---------------------------------------------------------------------------------------

_pieces: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
_class_masks: weakref.WeakKeyDictionary[Any, dict[str, np.ndarray]] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any) -> list[str]:
    """Each token's text as it prints (computed once per tokenizer; what token classes are decided on)."""
    if tokenizer not in _pieces:
        _pieces[tokenizer] = [tokenizer.token_text(t) for t in range(tokenizer.n_vocab)]
    return _pieces[tokenizer]


def class_mask(tokenizer: Any, name: str) -> np.ndarray:
    """Bool [n_vocab]: the tokens of a named class (computed once per tokenizer)."""
    masks = _class_masks.setdefault(tokenizer, {})
    if name not in masks:
        pred = CLASSES[name]
        ctl = tokenizer.control_ids
        masks[name] = np.array([bool(p) and t not in ctl and pred(p) for t, p in enumerate(token_texts(tokenizer))])
    return masks[name]


def filler_id(model: Any) -> int:
    """The filler token of `empty` holes and of a canvas's tail after the template: the vocabulary's padding."""
    tok = model.tokenizer
    return tok.pad if tok.pad >= 0 else tok.eos


def allowed_mask(model: Any, hole: Hole) -> np.ndarray | None:
    """Bool [n_vocab] of the tokens `hole` may take, or None when any token may."""
    V, where, a = model.hparams.n_vocab, hole.where or "hole", hole.allowed
    if a is None:
        return None
    mask = np.zeros(V, dtype=bool)
    if isinstance(a, str):
        names = a.replace("|", " ").split()
        if not names:
            raise Error(f"template: {where}: allowed is an empty class name")
        for name in names:
            if name not in CLASSES:
                raise Error(f"template: {where}: unknown token class {name!r} (known: {', '.join(CLASSES)})")
            mask |= class_mask(model.tokenizer, name)
    elif isinstance(a, Iterable):
        for x in a:
            if isinstance(x, str):
                mask[model.tokenize(x, add_special=False)] = True
            elif isinstance(x, int | np.integer) and not isinstance(x, bool):
                if not 0 <= x < V:
                    raise Error(f"template: {where}: token id {x} is not in [0, {V})")
                mask[x] = True
            else:
                raise Error(f"template: {where}: allowed items must be token ids or texts, got {x!r}")
    else:
        raise Error(f"template: {where}: allowed must be a class name, token ids or texts, got {a!r}")
    if not mask.any():
        raise Error(f"template: {where}: the allowed set {a!r} is empty in this vocabulary")
    if hole.empty:
        mask[filler_id(model)] = True
    return mask


# ---- laying a template over canvases --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """A template tokenized for one model, over whole canvases (the tail after it is fixed to the filler)."""

    canvas_length: int
    tokens: np.ndarray  # int64 per position: the fixed token (0 at hole positions)
    fixed: np.ndarray  # bool per position
    hole: np.ndarray  # int per position: the hole's index, -1 where fixed
    rows: np.ndarray  # int32 per position: its row of `table` (0: any token)
    table: np.ndarray | None  # bool [rows, n_vocab], row 0 all True; None when no hole is restricted
    pieces: list[str | int]  # assembly order: fixed text verbatim, or a hole's index
    filler: int
    n_template: int  # positions the template itself takes (the rest is tail)

    @property
    def n_canvas(self) -> int:
        return len(self.tokens) // self.canvas_length

    def canvas(self, c: int) -> slice:
        return slice(c * self.canvas_length, (c + 1) * self.canvas_length)

    def vocab(self, c: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(table, rows) of canvas c for Model.denoise_step, or None when nothing there is restricted."""
        rows = self.rows[self.canvas(c)]
        return None if self.table is None or not rows.any() else (self.table, rows)

    def check(self, tokens: np.ndarray, c: int) -> np.ndarray | None:
        """Before canvas c commits: bool [canvas] of the positions to re-noise because a value breaks a rule
        that per-position vocabularies cannot express, or None. `tokens` are the template's positions up to the
        end of canvas c. A plain template has no such rules (structured.SchemaLayout has)."""
        return None

    def repair(self, tokens: np.ndarray, c: int) -> tuple[np.ndarray, int]:
        """Canvas c's tokens made to follow those rules when no step is left to re-noise, and how many values
        were replaced."""
        return np.asarray(tokens)[self.canvas(c)], 0

    def partial(self, tokens: np.ndarray, end: int) -> str:
        """The text known once the positions before `end` are committed (a start of the final text). A plain
        template's comes whole once filled (its text is assembled from all its holes); a json_schema's per part."""
        return ""

    def fill(self, tokens: np.ndarray, detokenize: Callable[[list[int]], str]
             ) -> tuple[str, list[str], list[int]]:
        """(text, hole texts, tokens) of the filled template; fillers dropped from holes."""
        toks = np.asarray(tokens)[: self.n_template]
        hole = self.hole[: self.n_template]
        keep = ~((hole >= 0) & (toks == self.filler))
        n_holes = int(hole.max()) + 1 if len(hole) else 0
        texts = [detokenize(toks[(hole == h) & keep].tolist()) for h in range(n_holes)]
        text = "".join(texts[p] if isinstance(p, int) else p for p in self.pieces)
        return text, texts, [int(t) for t in toks[keep]]


def lay_out(model: Any, template: Any) -> Layout:
    """Tokenize a template (text or parts) for `model` and lay it over as many canvases as it needs."""
    if isinstance(template, Layout):
        if template.canvas_length != model.hparams.canvas_length:
            raise Error("this template was laid out for another canvas length")
        return template
    parts = _parts(template)
    L, V = model.hparams.canvas_length, model.hparams.n_vocab
    filler = filler_id(model)
    tokens: list[int] = []
    fixed: list[bool] = []
    hole_of: list[int] = []
    rows: list[int] = []
    table = [np.ones(V, dtype=bool)]
    pieces: list[str | int] = []
    for p in parts:
        if isinstance(p, str):
            ids = model.tokenize(p, add_special=False)
            tokens += ids
            fixed += [True] * len(ids)
            hole_of += [-1] * len(ids)
            rows += [0] * len(ids)
            pieces.append(p)
            continue
        where = p.where or "hole"
        if isinstance(p.n_tokens, bool) or not isinstance(p.n_tokens, int | np.integer) or p.n_tokens <= 0:
            raise Error(f"template: {where} must have a positive number of tokens, got {p.n_tokens!r}")
        mask = allowed_mask(model, p)
        row = 0
        if mask is not None:
            row = next((r for r, m in enumerate(table) if np.array_equal(m, mask)), len(table))
            if row == len(table):
                table.append(mask)
        h = sum(isinstance(x, int) for x in pieces)
        n = int(p.n_tokens)
        tokens += [0] * n
        fixed += [False] * n
        hole_of += [h] * n
        rows += [row] * n
        pieces.append(h)
    if not tokens:
        raise Error("the template is empty")
    n_template = len(tokens)
    tail = -n_template % L
    tokens += [filler] * tail
    fixed += [True] * tail
    hole_of += [-1] * tail
    rows += [0] * tail
    return Layout(L, np.array(tokens, dtype=np.int64), np.array(fixed, dtype=bool), np.array(hole_of),
                  np.array(rows, dtype=np.int32), np.stack(table) if len(table) > 1 else None, pieces, filler,
                  n_template)

