"""Tiny-model factory: random-weight `diffusion-gemma` files with the exact published layout.

Used by the tests, the benchmarks and users who want a model to play with. `write_model(path, tiny_hparams())`
writes a small file in seconds; `write_model(path, layout.full_26b_a4b(), sparse=True)` writes the full 26B-A4B
layout as a sparse file (metadata only on disk) with the published size.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections import Counter
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import TokenType

from . import chat_format as cf
from . import gguf_file, layout
from .checkpoint import OUTTYPES
from .converter import stored_type
from .gguf_file import Writer
from .hf_tokenizer import TokenizerData
from .sampler import SamplerSettings

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", cf.TURN, cf.TURN_END, cf.CHANNEL, cf.CHANNEL_END,
                  cf.RESPONSE, cf.RESPONSE_END, cf.CALL, cf.CALL_END, cf.TOOL, cf.TOOL_END, cf.QUOTE, cf.THINK]
PAD, EOS, BOS, UNK, MASK, TURN_START, TURN_END = range(7)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A diffusion model does not write from left to right: it starts
from noise and denoises a whole canvas at once, step after step, until the text is stable and confident.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of
outrageous fortune, or to take arms against a sea of troubles. Numbers like 0 1 2 3 4 5 6 7 8 9 and 2026 appear
in code: def main(): return print("hello, world") # comments explain why, not what.
"""


@dataclasses.dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]

    def metadata(self) -> dict[str, Any]:
        """The tokenizer keys, stored as the converter stores a checkpoint's."""
        return TokenizerData(self.tokens, self.scores, self.types, self.merges, bos_id=BOS, eos_id=EOS,
                             eos_ids=[EOS, TURN_END], pad_id=PAD, unk_id=UNK, mask_id=MASK, add_bos=True,
                             add_eos=False, chat_template=cf.PLAIN_TEMPLATE).metadata()


def tiny_vocab(n_vocab: int = 512, corpus: str = _CORPUS) -> Vocab:
    """A gemma4-style BPE vocabulary: Gemma special/control tokens, 256 byte-fallback tokens `<0xNN>`,
    metaspace `▁` words, and merges learned on `corpus` until `n_vocab` tokens."""
    tokens = list(SPECIAL_TOKENS)
    types = [TokenType.CONTROL] * len(tokens)
    types[UNK] = TokenType.UNKNOWN
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    text = corpus.strip().replace(" ", "▁").replace("\n", "▁")
    chars = sorted(set(text) | {"\n"})
    tokens += chars
    types += [TokenType.NORMAL] * len(chars)
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab={n_vocab} is too small for the base vocabulary ({len(tokens)} tokens)")
    # Byte-pair merges learned on the corpus (words split at the metaspace, kept with it as a prefix).
    words = Counter(tuple(w) for w in re.findall(r"▁?[^▁]+|▁", text))
    merges: list[str] = []
    have = set(tokens)
    while len(tokens) < n_vocab:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:], strict=False):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        new = a + b
        if new not in have:
            tokens.append(new)
            types.append(TokenType.NORMAL)
            have.add(new)
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    while len(tokens) < n_vocab:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(TokenType.USER_DEFINED)
    return Vocab(tokens, [float(-i) for i in range(len(tokens))], types, merges)


def tiny_hparams(**overrides: Any) -> layout.HParams:
    """Small shapes that keep the real structure: 5 sliding : 1 global layers, GQA on both kinds, several
    experts, sliding window smaller than prompt + canvas."""
    n_layer = overrides.pop("n_layer", 6)
    swa = overrides.pop("swa_layers", tuple((i + 1) % 6 != 0 and i != n_layer - 1 for i in range(n_layer)))
    kv_swa, kv_global = overrides.pop("n_head_kv_swa", 2), overrides.pop("n_head_kv_global", 1)
    base = dict(
        n_layer=n_layer, n_embd=64, n_vocab=512, n_head=4, n_head_kv=tuple(kv_swa if s else kv_global for s in swa),
        head_dim=32, head_dim_swa=16, n_ff=96, n_ff_exp=32, n_expert=4, n_expert_used=2, sliding_window=8,
        swa_layers=swa, rope_dim=32, rope_dim_swa=16, canvas_length=16, context_length=4096,
    )
    base.update(overrides)
    return layout.check_hparams_or_raise(layout.HParams(**base))


def random_weights(hp: layout.HParams, seed: int = 0, calm: bool = False) -> dict[str, np.ndarray]:
    """F32 random weights for every tensor (numpy order, i.e. reversed ggml shape). Norm weights, router scale,
    per-expert scales and both layer scalars get non-trivial values so that tests notice a swapped one.

    calm=True makes the model well-conditioned (soft attention, decisive routing): random models are otherwise
    chaotic (attention scale is 1.0 and top-k routing is discontinuous), so tiny weight rounding flips experts
    and moves logits by O(1), which hides real quantization error bounds."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in layout.tensor_specs(hp):
        shape = tuple(reversed(spec.shape))
        if spec.name == "rope_freqs.weight":
            w = np.asarray(layout.rope_freq_factors(hp), dtype=np.float32)
        elif spec.role == layout.VECTOR:
            w = rng.uniform(0.5, 1.5, size=shape)
        else:
            fan_in = spec.shape[0]
            w = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape)
            if spec.name == "token_embd.weight":
                w *= 0.05 * np.sqrt(fan_in)  # embeddings are scaled by sqrt(n_embd) at the input
        if calm and spec.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
            w = w * 0.3
        if calm and spec.name.endswith("ffn_gate_inp.weight"):
            w = w * 20
        out[spec.name] = np.asarray(w, dtype=np.float32)
    return out


def write_model(path: str | os.PathLike, hp: layout.HParams | None = None, *, wtype: str = "f32", seed: int = 0,
                weights: dict[str, np.ndarray] | None = None, sparse: bool = False, vocab: Vocab | None = None,
                extra_metadata: dict[str, Any] | None = None, types: dict[str, int] | None = None
                ) -> pathlib.Path:
    """Write a `diffusion-gemma` GGUF with random weights (or `weights`, F32 numpy arrays in numpy order).

    wtype: f32, f16, bf16 or q8_0 for the matrices; `types` overrides the GGML type of single tensors.
    sparse=True writes metadata only and extends the file to its full size without storing data (for layout and
    size checks of the full 26B-A4B model).
    """
    hp = hp or tiny_hparams()
    if wtype not in OUTTYPES:
        raise ValueError(f"wtype must be one of {sorted(OUTTYPES)}")
    if vocab is None:
        vocab = tiny_vocab(hp.n_vocab) if hp.n_vocab <= 4096 else _placeholder_vocab(hp.n_vocab)
    if len(vocab.tokens) != hp.n_vocab:
        raise ValueError(f"vocab has {len(vocab.tokens)} tokens, hparams say {hp.n_vocab}")
    w = Writer(path)
    w.set("general.architecture", layout.ARCH)
    w.set("general.name", "diffgemma-testing")
    w.set("general.file_type", OUTTYPES[wtype][1])
    w.set("general.quantization_version", gguf.GGML_QUANT_VERSION)
    w.set_all(layout.hparams_to_metadata(hp))
    w.set_all(SamplerSettings().to_metadata())  # as the published files: the reference settings
    w.set_all(vocab.metadata())
    w.set_all(extra_metadata or {})
    specs = layout.tensor_specs(hp)
    types = {s.name: stored_type(s, wtype) for s in specs} | (types or {})
    for s in specs:
        w.add_tensor(s.name, s.shape, types[s.name])
    if sparse:
        w.write(sparse=True)
        return pathlib.Path(path)
    weights = weights if weights is not None else random_weights(hp, seed)
    w.write(lambda name: np.ascontiguousarray(gguf_file.encode(weights[name], types[name])))
    return pathlib.Path(path)


def _tile_rows(ggml_type: int, ne0: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Bytes of n_rows valid rows of `ggml_type`: a few rows really quantized by ggml, repeated (fast)."""
    from . import binding as B

    k = min(n_rows, 8)
    src = rng.standard_normal((k, ne0), dtype=np.float32) * 0.02
    row = B.lib.ggml_row_size(ggml_type, ne0)
    base = np.empty(k * row, np.uint8)
    imat = np.ones(ne0, np.float32)  # IQ types: uniform importance
    got = B.lib.ggml_quantize_chunk(ggml_type, B.ffi.from_buffer("float[]", src), B.ffi.from_buffer(base), 0, k,
                                    ne0, B.ffi.from_buffer("float[]", imat))
    assert got == base.nbytes
    return np.tile(base.reshape(k, row), (-(-n_rows // k), 1))[:n_rows].reshape(-1)


def write_synthetic(path: str | os.PathLike, hp: layout.HParams, types: dict[str, int], *, seed: int = 0,
                    progress: Any = None) -> pathlib.Path:
    """A full-layout file with the given per-tensor GGML types and random but valid data, written without slow
    quantization (a few rows per tensor are quantized by ggml and repeated): for speed work on the real shapes.
    Tensors missing from `types` are F32 (vectors, router)."""
    from . import binding as B

    rng = np.random.default_rng(seed)
    w = Writer(path)
    w.set("general.architecture", layout.ARCH)
    w.set("general.name", "diffgemma-synthetic")
    w.set("general.quantization_version", gguf.GGML_QUANT_VERSION)
    w.set_all(layout.hparams_to_metadata(hp))
    w.set_all(SamplerSettings().to_metadata())  # as the published files: the reference settings
    w.set_all((tiny_vocab(hp.n_vocab) if hp.n_vocab <= 4096 else _placeholder_vocab(hp.n_vocab)).metadata())
    specs = {s.name: s for s in layout.tensor_specs(hp)}
    for s in specs.values():
        w.add_tensor(s.name, s.shape, types.get(s.name, QT.F32))
    freqs = np.asarray(layout.rope_freq_factors(hp), np.float32)

    def data(name: str) -> np.ndarray:
        s, t = specs[name], types.get(name, QT.F32)
        if name == "rope_freqs.weight":
            return freqs
        if t == QT.F32 and s.role == layout.VECTOR:
            return rng.uniform(0.5, 1.5, s.shape[::-1]).astype(np.float32)
        n_rows = int(np.prod(s.shape[1:]))
        if t == QT.F32:
            return (rng.standard_normal((min(n_rows, 64), s.shape[0]), dtype=np.float32) * 0.02)[
                np.arange(n_rows) % min(n_rows, 64)]
        if t in (QT.F16, QT.BF16):
            f = rng.standard_normal((min(n_rows, 64), s.shape[0]), dtype=np.float32) * 0.02
            return np.tile(gguf_file.encode(f, t), (-(-n_rows // len(f)), 1))[:n_rows]
        return _tile_rows(t, s.shape[0], n_rows, rng)

    w.write(data, progress=progress)
    del B
    return pathlib.Path(path)


def _placeholder_vocab(n_vocab: int) -> Vocab:
    """A vocabulary of the right size for layout work (not meant for tokenizing)."""
    base = tiny_vocab(512)
    extra = n_vocab - len(base.tokens)
    tokens = base.tokens + [f"<unused{i}>" for i in range(len(base.tokens), n_vocab)]
    types = base.types + [TokenType.USER_DEFINED] * extra
    return Vocab(tokens, [float(-i) for i in range(n_vocab)], types, base.merges)


def write_random_mmproj(path: str | os.PathLike, n_proj: int, *, seed: int = 0,
                        image_token_ids: tuple[int, int, int] = (509, 510, 511)) -> pathlib.Path:
    """A small random gemma4v vision tower (2 layers, width 32, the real 16-px patches and 3x3 pooling, clamps
    and standardize) projecting to a text width of n_proj; (boi, placeholder, eoi) ids stored in the file."""
    from . import mmproj

    boi, image, eoi = image_token_ids
    hp = mmproj.VisionHParams(n_embd=32, n_ff=64, n_layer=2, n_head=2, head_dim=16, n_proj=n_proj, n_pos=512,
                              clipped=True, standardize=True, boi_id=boi, image_id=image, eoi_id=eoi)
    rng = np.random.default_rng(seed)
    weights = {}
    for s in mmproj.tensor_specs(hp):
        shape = tuple(reversed(s.shape))
        if s.name.endswith(("input_min", "output_min")):
            w = np.full(shape, -3.0)
        elif s.name.endswith(("input_max", "output_max")):
            w = np.full(shape, 3.0)
        elif s.role == mmproj.MATRIX:
            w = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), size=shape)
        else:
            w = rng.uniform(0.5, 1.5, size=shape)
        weights[s.name] = np.asarray(w, dtype=np.float32)
    return mmproj.write(path, hp, weights)


def write_random_tiny(path: str | os.PathLike) -> pathlib.Path:
    """A well-conditioned random-weight model with the tiny shapes (deterministic: seed 0, F32)."""
    return write_model(path, tiny_hparams(), wtype="f32", seed=0, weights=random_weights(tiny_hparams(), 0, calm=True))


if __name__ == "__main__":
    import sys

    print(write_random_tiny(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
