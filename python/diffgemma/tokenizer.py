"""The file's `gemma4` BPE vocabulary, tokenized by libllama's own tokenizer.

libllama does not know the `diffusion-gemma` architecture, but it loads a `gemma4` vocabulary with
`vocab_only`: we hand it a metadata-only copy of the file's key/values under the `gemma4` architecture name.
"""

from __future__ import annotations

import pathlib
import tempfile
import threading
from typing import Any

import numpy as np
from gguf import TokenType

from . import binding as B
from . import layout
from .errors import Error, GGUFError
from .gguf_file import Writer

_ffi, _lib = B.ffi, B.lib
VOCAB_MODEL = "gemma4"  # tokenizer.ggml.model: libllama's vocabulary type of this architecture
_init_lock = threading.Lock()
_initialised = False


def _vocab_only_copy(metadata: dict[str, Any], path: pathlib.Path) -> None:
    """Write the key/values libllama needs to load the vocabulary of a gemma4 model."""
    prefix = layout.ARCH + "."
    md = {("gemma4." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in metadata.items()
          if k.startswith((prefix, "tokenizer.", "general."))}
    md["general.architecture"] = "gemma4"
    w = Writer(path)
    w.set_all(md)
    w.write()


class Tokenizer:
    """Tokenize/detokenize with libllama's gemma4 BPE (special tokens, byte fallback)."""

    def __init__(self, metadata: dict[str, Any]):
        global _initialised
        if metadata.get("tokenizer.ggml.model") != VOCAB_MODEL:
            raise GGUFError(f"tokenizer model is {metadata.get('tokenizer.ggml.model')!r}, expected {VOCAB_MODEL!r}")
        with _init_lock:
            if not _initialised:
                _lib.llama_backend_init()
                _initialised = True
        with tempfile.TemporaryDirectory(prefix="diffgemma-vocab-") as d:
            p = pathlib.Path(d) / "vocab.gguf"
            _vocab_only_copy(metadata, p)
            params = _lib.llama_model_default_params()
            params.vocab_only = True
            params.n_gpu_layers = 0
            B.take_errors()
            self._model = _lib.llama_model_load_from_file(str(p).encode(), params)
        if self._model == _ffi.NULL:
            raise GGUFError(f"libllama could not load the vocabulary: {B.take_errors() or 'unknown error'}")
        self._vocab = _lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(_lib.llama_vocab_n_tokens(self._vocab))
        self.bos = int(_lib.llama_vocab_bos(self._vocab))
        self.eos = int(_lib.llama_vocab_eos(self._vocab))
        self.pad = int(_lib.llama_vocab_pad(self._vocab))
        types = metadata.get("tokenizer.ggml.token_type") or []
        self.control_ids = frozenset(i for i, t in enumerate(types) if t == TokenType.CONTROL)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "_model", _ffi.NULL) not in (None, _ffi.NULL):
            _lib.llama_model_free(self._model)
            self._model = None

    def is_eog(self, token: int) -> bool:
        return bool(_lib.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise Error(f"tokenize expects a str, got {type(text).__name__}")
        data = text.encode("utf-8")
        cap = len(data) + 8
        with self._lock:
            buf = _ffi.new("llama_token[]", cap)
            n = _lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:
                cap = -n
                buf = _ffi.new("llama_token[]", cap)
                n = _lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise Error("tokenization failed")
        return list(buf[0:n])

    def detokenize(self, ids: Any, *, special: bool = False) -> str:
        """Text of `ids`; control tokens are dropped unless `special`."""
        arr = np.asarray(list(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            raise Error(f"token ids must be in [0, {self.n_vocab}), got {int(arr.min())}..{int(arr.max())}")
        if not special:
            arr = arr[[int(t) not in self.control_ids for t in arr]] if arr.size else arr
        toks = np.ascontiguousarray(arr, dtype=np.int32)
        cap = 16 * len(toks) + 16
        with self._lock:
            out = _ffi.new("char[]", cap)
            n = _lib.llama_detokenize(self._vocab, _ffi.from_buffer("llama_token[]", toks), len(toks), out, cap,
                                      False, special)
            if n < 0:
                cap = -n + 1
                out = _ffi.new("char[]", cap)
                n = _lib.llama_detokenize(self._vocab, _ffi.from_buffer("llama_token[]", toks), len(toks), out,
                                          cap, False, special)
        return bytes(_ffi.buffer(out, n)).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        """One token's text as it would print (for live canvas displays)."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        """One token's piece as bytes (a byte-fallback token: its one byte, part of a UTF-8 character; control
        tokens as text): /tokenize's pieces and logprobs' `bytes`."""
        buf = _ffi.new("char[]", 256)
        n = _lib.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
        return bytes(_ffi.buffer(buf, max(n, 0)))
