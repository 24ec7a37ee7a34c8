"""The tokenizer of a Hugging Face checkpoint (tokenizer.json, a byte-fallback BPE, with tokenizer_config.json,
generation_config.json and chat_template.jinja) as the GGUF stores it: tokens, scores, types, merges, special
ids and the chat template."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import TokenType

from .checkpoint import merged_text_config, read_optional_json
from .errors import Error
from .tokenizer import VOCAB_MODEL

_CONTROL_SCORE = -1000.0  # score stored for control tokens (the published files do the same)
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

@dataclasses.dataclass
class TokenizerData:
    """Everything the GGUF stores about the tokenizer."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: list[int] = dataclasses.field(default_factory=list)
    pad_id: int | None = None
    unk_id: int | None = None
    mask_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None

    def metadata(self) -> dict[str, Any]:
        md: dict[str, Any] = {
            "tokenizer.ggml.model": VOCAB_MODEL,
            "tokenizer.ggml.pre": "gemma4",
            "tokenizer.ggml.tokens": self.tokens,
            "tokenizer.ggml.scores": self.scores,
            "tokenizer.ggml.token_type": self.token_types,
            "tokenizer.ggml.add_space_prefix": False,
        }
        if self.merges:
            md["tokenizer.ggml.merges"] = self.merges
        for key, v in (("bos", self.bos_id), ("eos", self.eos_id), ("padding", self.pad_id),
                       ("unknown", self.unk_id), ("mask", self.mask_id)):
            if v is not None:
                md[f"tokenizer.ggml.{key}_token_id"] = v
        if self.add_bos is not None:
            md["tokenizer.ggml.add_bos_token"] = self.add_bos
        if self.add_eos is not None:
            md["tokenizer.ggml.add_eos_token"] = self.add_eos
        if self.chat_template:
            md["tokenizer.chat_template"] = self.chat_template
        if self.eos_ids:
            md["diffusion.eos_token_ids"] = self.eos_ids
        return md


class _PairsDict(dict):  # type: ignore[type-arg]
    """A JSON object that also remembers every (key, value) pair, duplicates included."""

    pairs: list[tuple[str, Any]]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _PairsDict:
    d = _PairsDict(pairs)
    d.pairs = pairs
    return d


def _token_content(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _id(v: Any) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _chat_template(hf_dir: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Error(f"cannot read {jinja}: {e}") from None
    ct = tok_cfg.get("chat_template")
    if isinstance(ct, str):
        return ct
    if isinstance(ct, list):  # [{"name": ..., "template": ...}, ...]
        named = {c.get("name"): c.get("template") for c in ct if isinstance(c, dict)}
        t = named.get("default") or next((v for v in named.values() if isinstance(v, str)), None)
        return t if isinstance(t, str) else None
    return None


def _post_processor_adds(tok: Mapping[str, Any], token_id: int | None) -> bool | None:
    pp = tok.get("post_processor")
    if not isinstance(pp, dict) or token_id is None:
        return None
    procs = pp.get("processors") if pp.get("type") == "Sequence" else [pp]
    for p in procs or []:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            for piece in p.get("single") or []:
                sp = piece.get("SpecialToken") if isinstance(piece, dict) else None
                if isinstance(sp, dict):
                    ids = (p.get("special_tokens") or {}).get(sp.get("id"), {}).get("ids") or []
                    if token_id in ids:
                        return True
            return False
    return None


def read_tokenizer(hf_dir: str | os.PathLike[str], n_vocab: int) -> TokenizerData:
    """Read tokenizer.json (a byte-fallback BPE) and friends into GGUF tokenizer data of exactly `n_vocab`
    tokens (padded with user-defined `<unusedN>` tokens when the tokenizer is smaller)."""
    d = Path(hf_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise Error(f"{d} has no tokenizer.json (needed for the GGUF vocabulary)")
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f, object_pairs_hook=_pairs_hook)
    except OSError as e:
        raise Error(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Error(f"{path} is not valid JSON: {e}") from None
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise Error(f"{path}: expected a BPE tokenizer model, found {kind!r}")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise Error(f"{path}: model.vocab must be an object")

    by_id: dict[int, str] = {}
    for content, tid in getattr(vocab, "pairs", list(vocab.items())):
        if not isinstance(tid, int) or tid < 0:
            raise Error(f"{path}: token {content!r} has an invalid id {tid!r}")
        by_id.setdefault(tid, content)
    added: dict[int, bool] = {}  # id → special
    for at in tok.get("added_tokens") or []:
        ok = isinstance(at, dict) and isinstance(at.get("id"), int) and isinstance(at.get("content"), str)
        if not ok:
            raise Error(f"{path}: malformed added_tokens entry {at!r}")
        by_id[at["id"]] = at["content"]
        added[at["id"]] = bool(at.get("special", False))
    n_tok = max(by_id) + 1 if by_id else 0
    if n_tok > n_vocab:
        raise Error(f"{path} defines {n_tok} tokens but config.json vocab_size is {n_vocab}")

    present = set(by_id.values())
    counter = 0

    def placeholder() -> str:
        nonlocal counter
        while f"<unused{counter}>" in present:
            counter += 1
        name = f"<unused{counter}>"
        present.add(name)
        return name

    unk_content = model.get("unk_token") if isinstance(model.get("unk_token"), str) else None
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(placeholder())
            types.append(TokenType.USER_DEFINED)
            continue
        tokens.append(t)
        if i in added:
            types.append(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED)
        elif _BYTE_TOKEN.match(t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    if unk_content is not None and unk_content in present:
        types[tokens.index(unk_content)] = TokenType.UNKNOWN
    scores = [_CONTROL_SCORE if ty == TokenType.CONTROL else 0.0 for ty in types]

    merges: list[str] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise Error(f"{path}: malformed merge {m!r}")

    tok_cfg = read_optional_json(d / "tokenizer_config.json", "tokenizer config")
    gen = read_optional_json(d / "generation_config.json", "generation config")
    cfg = merged_text_config(read_optional_json(d / "config.json", "model config"))
    first: dict[str, int] = {}
    for i, t in enumerate(tokens):
        first.setdefault(t, i)

    def by_name(key: str) -> int | None:
        c = _token_content(tok_cfg.get(key))
        return first.get(c) if c is not None else None

    def pick(*cands: int | None) -> int | None:
        return next((c for c in cands if c is not None), None)

    eos_list = gen.get("eos_token_id")
    eos_ids = [int(x) for x in (eos_list if isinstance(eos_list, list) else [eos_list])
               if isinstance(x, int) and not isinstance(x, bool)]
    data = TokenizerData(
        tokens=tokens,
        scores=scores,
        token_types=types,
        merges=merges,
        bos_id=pick(by_name("bos_token"), _id(gen.get("bos_token_id")), _id(cfg.get("bos_token_id"))),
        eos_id=pick(_id(eos_list), by_name("eos_token"), _id(cfg.get("eos_token_id"))),
        pad_id=pick(_id(gen.get("pad_token_id")), by_name("pad_token"), _id(cfg.get("pad_token_id"))),
        unk_id=pick(first.get(unk_content) if unk_content is not None else None, by_name("unk_token")),
        mask_id=pick(by_name("mask_token"), first.get("<mask>")),
        chat_template=_chat_template(d, tok_cfg),
    )
    data.eos_ids = eos_ids or ([data.eos_id] if data.eos_id is not None else [])
    add_bos = tok_cfg.get("add_bos_token")
    data.add_bos = add_bos if isinstance(add_bos, bool) else _post_processor_adds(tok, data.bos_id)
    add_eos = tok_cfg.get("add_eos_token")
    data.add_eos = add_eos if isinstance(add_eos, bool) else None
    for name, v in (("bos", data.bos_id), ("eos", data.eos_id), ("pad", data.pad_id), ("unk", data.unk_id),
                    ("mask", data.mask_id), *(("eos list", e) for e in data.eos_ids)):
        if v is not None and not 0 <= v < n_vocab:
            raise Error(f"{name} token id {v} is outside the vocabulary (size {n_vocab})")
    return data
