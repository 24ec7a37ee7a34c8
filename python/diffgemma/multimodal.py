"""Images in prompts (../shared/spec/vision.md §2): chat messages with image parts -> token ids with
`<|image>` N x `<|image|>` `<image|>` per image, the image embeddings that replace the N placeholder rows, and
the encoder's rule that one image's soft tokens see each other (on sliding and full layers alike).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import mmproj
from .errors import Error

MAX_IMAGE_TOKENS = 1120  # soft tokens of one image at the largest budget
_MARK = "\ue000image{}\ue001"  # stands for the i-th image while the chat template renders (private-use chars)


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """One image in a prompt: its soft tokens occupy positions start .. start + len(embeddings) - 1."""

    start: int
    embeddings: np.ndarray  # [n_tokens, n_embd] float32
    digest: bytes  # identifies the image for prompt-KV reuse (placeholder ids are the same for every image)

    @property
    def end(self) -> int:
        return self.start + len(self.embeddings)


def span(start: int, embeddings: Any) -> ImageSpan:
    """An ImageSpan from embeddings [n_tokens, n_embd] whose first soft token is at `start`."""
    e = np.ascontiguousarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or not len(e):
        raise Error(f"image embeddings must be a non-empty [n_tokens, n_embd] array, got shape {e.shape}")
    return ImageSpan(int(start), e, hashlib.blake2b(e.tobytes(), digest_size=16).digest())


def check_spans(spans: Sequence[ImageSpan], n_tokens: int, n_embd: int) -> list[ImageSpan]:
    out = sorted(spans, key=lambda s: s.start)
    for a, b in zip(out, out[1:], strict=False):
        if b.start < a.end:
            raise Error(f"images at positions {a.start} and {b.start} overlap")
    for s in out:
        if s.start < 0 or s.end > n_tokens:
            raise Error(f"an image at positions {s.start}..{s.end - 1} lies outside the prompt of {n_tokens}")
        if s.embeddings.shape[1] != n_embd:
            raise Error(f"image embeddings have width {s.embeddings.shape[1]}, the model has n_embd {n_embd}")
    return out


def token_ids(model: Any) -> tuple[int, int, int]:
    """(begin-of-image, placeholder, end-of-image) ids: the mmproj's, else the vocabulary's tokens of those
    names, else the released model's ids."""
    hp = model.vision.hparams
    tok = model.tokenizer
    ids = []
    for given, text, default in ((hp.boi_id, mmproj.BOI_TEXT, mmproj.BOI_ID),
                                 (hp.image_id, mmproj.IMAGE_TEXT, mmproj.IMAGE_ID),
                                 (hp.eoi_id, mmproj.EOI_TEXT, mmproj.EOI_ID)):
        if given is None:
            found = model.tokenize(text, add_special=False)
            given = found[0] if len(found) == 1 else default
        if not 0 <= given < tok.n_vocab:
            raise Error(f"the image token id {given} ({text}) is outside this model's vocabulary")
        ids.append(int(given))
    return ids[0], ids[1], ids[2]


def flatten(messages: list[Any]) -> tuple[list[dict[str, str]], list[Any]]:
    """Messages whose content may be a list of parts -> messages with str content (each image replaced by a
    marker) and the images in order."""
    out, found = [], []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        text = []
        for part in m["content"]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind == "image" and part.get("image") is not None:
                text.append(_MARK.format(len(found)))
                found.append(part["image"])
            else:
                raise Error(f"bad content part {part!r}: expected {{'type': 'text', 'text': str}} or "
                            "{'type': 'image', 'image': path | bytes | PIL image | array}")
        out.append({**m, "content": "".join(text)})
    return out, found


def _has_parts(prompt: Any) -> bool:
    return isinstance(prompt, list | tuple) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in prompt)


def has_images(prompt: Any) -> bool:
    """Whether a prompt is messages with at least one image part (text-only part lists are plain text)."""
    return _has_parts(prompt) and any(
        isinstance(p, dict) and p.get("type") == "image"
        for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), list) for p in m["content"])


def text_messages(messages: Any) -> Any:
    """Messages whose content may be a list of text parts -> the same messages with str content; an Error
    for image parts (the caller takes the image path for those)."""
    if not _has_parts(messages):
        return messages
    out, pictures = flatten(list(messages))
    if pictures:
        raise Error("image parts need the image path (a model loaded with mmproj=)")
    return out


def splice(model: Any, marked: str, embeddings: list[np.ndarray]) -> tuple[list[int], list[ImageSpan]]:
    """Token ids and image spans of a rendered prompt whose i-th image stands as a marker (see flatten): the
    text between markers is tokenized on its own, as it would be around the (special) image tokens, and each
    marker becomes `<|image>` N x `<|image|>` `<image|>`; BOS is put first if the text lacks it."""
    boi, img, eoi = token_ids(model)
    ids: list[int] = []
    spans: list[ImageSpan] = []
    rest = marked
    for i, e in enumerate(embeddings):
        mark = _MARK.format(i)
        if mark not in rest:
            raise Error("the chat template dropped an image part")
        before, rest = rest.split(mark, 1)
        ids += model.tokenize(before, add_special=False) if before else []
        ids.append(boi)
        spans.append(span(len(ids), e))
        ids += [img] * len(e) + [eoi]
    ids += model.tokenize(rest, add_special=False) if rest else []
    tok = model.tokenizer
    if tok.bos >= 0 and (not ids or ids[0] != tok.bos):
        ids = [tok.bos] + ids
        spans = [dataclasses.replace(s, start=s.start + 1) for s in spans]
    return ids, spans


def allow_image_blocks(mask: np.ndarray, qpos: np.ndarray, kpos: np.ndarray, spans: Sequence[ImageSpan]
                       ) -> np.ndarray:
    """Open the same-image block in an additive mask [n_q, n_k] whose queries sit at positions qpos and keys at
    kpos: a soft token sees every soft token of its own image (the block overrides causality and the window)."""
    for s in spans:
        q = (qpos >= s.start) & (qpos < s.end)
        k = (kpos >= s.start) & (kpos < s.end)
        if q.any() and k.any():
            mask[np.ix_(q, k)] = 0
    return mask


def reusable(committed: int, old: Sequence[ImageSpan], new: Sequence[ImageSpan]) -> int:
    """How many of `committed` matching leading tokens stay valid when the images may differ: the store is
    kept only up to the first image that is not the same picture at the same place."""
    keep = committed
    new_at = {s.start: s for s in new}
    for s in old:
        if s.start < keep and (s.start not in new_at or new_at[s.start].digest != s.digest):
            keep = min(keep, s.start)
    old_at = {s.start for s in old}
    for s in new:
        if s.start < keep and s.start not in old_at:
            keep = min(keep, s.start)
    return keep


def chunk_bounds(start: int, n: int, size: int, spans: Sequence[ImageSpan]) -> list[tuple[int, int]]:
    """Split n tokens at positions start.. into pieces of about `size` that never cut an image: its soft tokens
    must see each other, so one image is always encoded in one pass."""
    out, a = [], start
    while a < start + n:
        b = min(a + size, start + n)
        for s in spans:
            if s.start < b < s.end:  # the cut falls inside an image: stop before it, or take it whole
                b = s.start if s.start > a else s.end
        out.append((a - start, b - start))
        a = b
    return out
