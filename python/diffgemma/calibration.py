"""Importance matrix collected through the diffusion graph (llama.cpp-compatible files).

For every matrix multiplied in `blk.*` (attention q/k/v/output, dense ffn, the router, the experts) and the
self-conditioning MLP when it runs, we accumulate the per-column sum of squared inputs and the number of rows,
experts attributed per token through the routing ids, by observing the product nodes (found by name: graph.py
names each after its weight, "attn_q-3") through Model.observe.

Modes:
- "unified": what llama-imatrix does on this architecture: each chunk is a causal prompt part followed by a
  *clean* canvas. The denoiser then only ever sees clean text.
- "denoise" (default): what the denoiser really sees in generation. Prompt = chunk head; canvas = the
  continuation corrupted with uniform random tokens at a level t ~ U(eps, 1); then a second pass
  self-conditioned on the first pass's temperature-scaled logits, which also calibrates the self-conditioning
  MLP (unified never runs it, so those weights would be quantized blind).
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import os
import pathlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from . import binding as B
from . import imatrix_file, outputs, sampler
from .errors import Error
from .generation import resolve_seed
from .graph import Graphs, sc_shape
from .kv import PromptKV
from .weights import ModelWeights, weight_of_product

if TYPE_CHECKING:
    from .model import Model

_lib, _ffi = B.lib, B.ffi
EPS = 1e-3  # lowest corruption level in denoise mode


def _observed(t: Any) -> tuple[str, bool] | None:
    """(weight name, is_mul_mat_id) if node t is the product of a matrix an imatrix covers, else None."""
    name = weight_of_product(_ffi.string(t.name).decode())
    if name is None:
        return None
    return name, _ffi.string(_lib.ggml_op_name(t.op)) == b"MUL_MAT_ID"


def _read(t: Any, dtype: Any = np.float32) -> np.ndarray:
    """A contiguous tensor's data as a numpy array of its ggml shape (reversed), copied from any backend."""
    ne = [int(t.ne[i]) for i in range(4)]
    out = np.empty(ne[::-1], dtype=dtype)
    isz = out.itemsize
    if t.type != {np.float32: B.F32, np.int32: B.I32}[dtype] or not (
            t.nb[0] == isz and t.nb[1] == isz * ne[0] and t.nb[2] == t.nb[1] * ne[1] and t.nb[3] == t.nb[2] * ne[2]):
        raise Error(f"imatrix: cannot read {_ffi.string(t.name).decode()} (type {t.type}, not contiguous?)")
    _lib.ggml_backend_tensor_get(t, _ffi.from_buffer(out), 0, out.nbytes)
    return out


class Collector:
    """Accumulates raw sums of squared inputs per weight (per expert for *_exps) from graph evaluations: the
    callback of Model.observe."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.record_self_cond = False

    def __call__(self, t: Any, ask: bool) -> bool:
        hit = _observed(t)
        if hit is not None and hit[0].startswith("self_cond_") and not self.record_self_cond:
            hit = None
        if ask:
            return hit is not None
        if hit is not None:
            self._accumulate(t, *hit)
        return True

    def _accumulate(self, t: Any, name: str, is_id: bool) -> None:
        x = _read(t.src[1])  # mul_mat: [.., tokens, ne0]; mul_mat_id: [tokens, n_b, ne0]
        ne0 = x.shape[-1]
        if not is_id:
            rows = x.reshape(-1, ne0).astype(np.float64)
            s = self.sums.setdefault(name, np.zeros((1, ne0)))
            c = self.counts.setdefault(name, np.zeros(1, np.int64))
            s[0] += (rows * rows).sum(0)
            c[0] += rows.shape[0]
            return
        ids = _read(t.src[2], np.int32).reshape(int(t.src[2].ne[1]), int(t.src[2].ne[0]))  # [tokens, n_used]
        n_expert = int(t.src[0].ne[2])
        s = self.sums.setdefault(name, np.zeros((n_expert, ne0)))
        c = self.counts.setdefault(name, np.zeros(n_expert, np.int64))
        n_tok, n_used = ids.shape
        x = x.reshape(n_tok, -1, ne0)  # [tokens, n_b, ne0]
        slot = np.arange(n_used) % x.shape[1]  # shared input (gate/up) or one row per slot (down)
        rows = x[:, slot, :].reshape(n_tok * n_used, ne0).astype(np.float64)
        e = ids.reshape(-1)
        np.add.at(s, e, rows * rows)
        np.add.at(c, e, 1)

    def entries(self) -> dict[str, imatrix_file.Entry]:
        return {k: imatrix_file.Entry(self.sums[k].copy(), self.counts[k].copy()) for k in sorted(self.sums)}


@dataclasses.dataclass
class ImatrixReport:
    """What imatrix() collected: entry and chunk counts, per-expert-tensor coverage, weights without data.
    repr() is one line; summary() the readable account; the dicts hold every tensor."""

    entries: int
    chunks: int
    coverage: dict[str, float]  # expert tensors: fraction of experts that received data
    least_used: dict[str, list[tuple[int, int]]]  # expert tensors: (expert, tokens) of the least used experts
    missing: list[str]  # weights that got no data at all
    tokens: int
    seconds: float
    path: pathlib.Path | None
    mode: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __repr__(self) -> str:
        cov = f", expert coverage min {min(self.coverage.values()):.1%}" if self.coverage else ""
        return (f"ImatrixReport({self.mode}, {self.entries} entries, {self.chunks} chunks, {self.tokens} tokens"
                f"{cov}, {len(self.missing)} missing" + (f", {self.path})" if self.path else ")"))

    def summary(self) -> str:
        lines = [f"imatrix ({self.mode}): {self.entries} entries from {self.chunks} chunks, {self.tokens} tokens in "
                 f"{self.seconds:.1f} s ({self.tokens_per_s:.0f} tokens/s)" + (f" -> {self.path}" if self.path else "")]
        if self.coverage:
            cov = np.array(list(self.coverage.values()))
            lines.append(f"  expert coverage: min {cov.min():.1%}, mean {cov.mean():.1%} over {len(cov)} tensors")
            worst = min(self.coverage, key=self.coverage.get)
            lines.append(f"  least covered: {worst} ({self.coverage[worst]:.1%}); least used experts there: "
                         + ", ".join(f"#{e} ({n} tokens)" for e, n in self.least_used[worst]))
        for name in self.missing:
            lines.append(f"  warning: no data for {name}")
        return "\n".join(lines)


def expected_weights(node_names: list[str]) -> list[str]:
    """The weights whose products are among `node_names` (Model.node_names, Graphs.node_names): what an
    encoder + decoder evaluation would observe."""
    return sorted({w for n in node_names if (w := weight_of_product(n)) is not None})


def dry_run_entries(path: str | os.PathLike) -> list[str]:
    """Entries an imatrix of the file at `path` would hold, from its graphs alone (works on huge files: only
    the metadata is read, no weight is touched and no buffer is allocated)."""
    from . import gguf_file

    gf = gguf_file.read(path)
    hp = gguf_file.validate(gf)
    ctx = B.ggml_context(_lib.ggml_tensor_overhead() * (len(gf.tensors) + 8))
    kv = PromptKV(hp, n_ctx=2 * hp.canvas_length + 8, room=hp.canvas_length, ttype=B.F16, buffer_type=None)
    try:
        w = {}
        for info in gf.tensors.values():
            ne = list(info.shape) + [1] * (4 - len(info.shape))
            t = _lib.ggml_new_tensor_4d(ctx, info.type, *ne)
            _lib.ggml_set_name(t, info.name.encode())
            w[info.name] = t
        kv.n = 4
        embd_t = _lib.ggml_new_tensor_3d(ctx, B.F16, *sc_shape(hp.n_vocab, hp.n_embd))
        sc_state = _lib.ggml_new_tensor_3d(ctx, B.F16, *sc_shape(hp.n_vocab, hp.canvas_length))
        _lib.ggml_set_name(embd_t, b"token_embd_t")
        graphs = Graphs(ModelWeights.build(hp, w, lambda name: 1.0), hp, False, 1.0)
        return expected_weights(graphs.node_names(kv, hp.canvas_length, embd_t, sc_state))
    finally:
        kv.free()
        _lib.ggml_free(ctx)


BLOCK = 1 << 16  # characters (bytes, for a file) read and tokenized at a time: a few chunks' worth
LONG_LINE = 1 << 20  # a line longer than this is cut at a space (a file without newlines must not be read whole)


def _file_text(p: pathlib.Path) -> Iterator[str]:
    """The text of the file at `p`, block by block; an Error if its first block is not UTF-8 text (a binary file
    given by mistake would otherwise be tokenized whole, in gigabytes). Later undecodable bytes become U+FFFD."""
    if not p.is_file():
        raise Error(f"{p}: no such calibration file", cli=f"{p}: no such calibration file (-f)")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    with open(p, "rb") as f:
        first = f.read(BLOCK)
        bad = first.find(b"\0")  # valid UTF-8, but no text holds it
        try:
            text = decoder.decode(first)
        except UnicodeDecodeError as e:
            bad = e.start if bad < 0 else min(bad, e.start)
        if bad >= 0:
            raise Error(f"{p}: not a text file (byte {first[bad]:#04x} at offset {bad}); the calibration must be "
                        "UTF-8 text")
        decoder.errors = "replace"
        yield text
        while block := f.read(BLOCK):
            yield decoder.decode(block)
        yield decoder.decode(b"", final=True)


def _blocks(text: str) -> Iterator[str]:
    return (text[i:i + BLOCK] for i in range(0, len(text), BLOCK))


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """The text cut after runs of newlines, where gemma4's tokenizer splits it anyway: the pieces' tokens, one
    after the other, are the tokens of the whole text (only a line longer than LONG_LINE is cut elsewhere)."""
    rest = ""
    for block in blocks:
        text = rest + block
        cut = text.rstrip("\n").rfind("\n") + 1  # after the last newline run that text follows in this block
        if cut == 0 and len(text) > LONG_LINE:
            cut = text.rfind(" ") if text.rfind(" ") > 0 else len(text)
        if cut > 0:
            yield text[:cut]
        rest = text[cut:]
    if rest:
        yield rest


def _calibration_tokens(model: Model, calibration: Any, need: int | None) -> tuple[np.ndarray, list[str]]:
    """Token ids of the calibration, tokenized piece by piece until there are `need` (None: all): a file as
    os.PathLike (e.g. pathlib.Path), text as a str, or texts as a list of str. A str is always text, never
    opened: a mistyped path must not silently become the text."""
    if isinstance(calibration, os.PathLike):
        p = pathlib.Path(calibration)
        texts, datasets = [_pieces(_file_text(p))], [p.name]
    elif isinstance(calibration, str):
        if "\n" not in calibration and len(calibration) < 4096 and os.path.exists(calibration):
            raise Error(f"calibration {calibration!r} is a str naming a file; a str is calibration text: pass "
                        f"pathlib.Path({calibration!r}) to read the file")
        texts, datasets = [_pieces(_blocks(calibration))], ["<text>"]
    elif isinstance(calibration, list | tuple) and calibration and all(isinstance(s, str) for s in calibration):
        texts, datasets = [_pieces(_blocks(s)) for s in calibration], [f"<{len(calibration)} texts>"]
    else:
        raise Error("calibration must be a file path as os.PathLike (pathlib.Path), a str of text or a list of "
                    f"str, not {type(calibration).__name__}")
    parts, n = [], 0
    for piece in itertools.chain.from_iterable(texts):
        parts.append(np.asarray(model.tokenize(piece, add_special=False), dtype=np.int32))
        n += len(parts[-1])
        if need is not None and n >= need:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.int32), datasets


def imatrix(model: str | os.PathLike | Model, calibration: Any, out: str | os.PathLike, *, chunks: int | None = None,
            mode: str = "denoise", n_gpu_layers: int = -1, threads: int | None = None, format: str | None = None,
            progress: bool = True, chunk_size: int | None = None, seed: int = 0, save_every: int = 10,
            overwrite: bool = False) -> ImatrixReport:
    """Collect an importance matrix for `model` (a path, "tiny" or a loaded Model) and write it to `out`
    (llama.cpp's GGUF layout, or legacy .dat by suffix / format="dat").

    calibration: a text file as os.PathLike (`pathlib.Path("calib.txt")`), the text itself as a str, or a list
    of str. A str is never opened as a file (a str naming an existing file is an Error), so a mistyped path
    cannot silently become calibration text. A file is read only as far as the chunks need and must be UTF-8
    text (a binary file is an Error). chunk_size tokens per chunk (default 2 x canvas): the head is the
    causal prompt, the last canvas_length tokens the canvas. mode: "denoise" (what generation sees, default)
    or "unified" (llama-imatrix's clean canvas). The file is saved every `save_every` chunks, so an
    interrupted run keeps what it had. An existing `out` is an Error unless overwrite=True. A path is loaded with
    `n_gpu_layers` and `threads` (CPU threads, default one per physical core)."""
    from .model import Model, load

    if mode not in ("denoise", "unified"):
        raise Error(f"mode must be 'denoise' or 'unified', got {mode!r}")
    outputs.check_new(out, overwrite)
    # repack=False: a repacked product pads its rows with zeros, which the counts would include
    m = model if isinstance(model, Model) else load(model, n_gpu_layers=n_gpu_layers, threads=threads,
                                                    repack=False)
    hp, cfg = m.hparams, m.sampler_defaults
    L = hp.canvas_length
    size = chunk_size or 2 * L
    if size <= L:
        raise Error(f"chunk_size must exceed the canvas length {L}")
    if size > m.n_ctx:
        raise Error(f"chunk_size {size} exceeds n_ctx {m.n_ctx}")
    if chunks is not None and int(chunks) <= 0:
        raise Error(f"chunks must be > 0, got {chunks}")
    toks, datasets = _calibration_tokens(m, calibration, None if chunks is None else int(chunks) * (size - 1))
    bos = m.tokenizer.bos
    n_avail = len(toks) // (size - 1)
    if n_avail == 0:
        hint = " (a str is the text itself; pass a file as pathlib.Path)" if isinstance(calibration, str) else ""
        raise Error(f"calibration text has {len(toks)} tokens, a chunk needs {size - 1} (plus BOS){hint}",
                    cli=f"calibration text has {len(toks)} tokens, a chunk needs {size - 1} (plus BOS)")
    n_chunks = n_avail if chunks is None else min(int(chunks), n_avail)
    out = pathlib.Path(out)
    imatrix_file._format_for(out, format)
    rng = np.random.default_rng(resolve_seed(seed))  # -1/None: a random one, as in generate
    col = Collector()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_chunks * size, unit="tok", unit_scale=True, desc=f"imatrix ({mode})")
    t0 = time.perf_counter()
    done = 0

    def save() -> None:
        imatrix_file.save(out, col.entries(), datasets=datasets, chunk_count=done, chunk_size=size, format=format)

    with m.observe(col):
        try:
            for c in range(n_chunks):
                chunk = toks[c * (size - 1):(c + 1) * (size - 1)]
                prompt = np.concatenate([np.full(int(bos >= 0), bos, np.int32), chunk[: size - 1 - L]])
                target = chunk[size - 1 - L:].astype(np.int64)
                m.reset()
                col.record_self_cond = False
                m.prefill(prompt)
                u = rng.random(L, dtype=np.float32)
                if mode == "unified":
                    m.denoise_step(target, cfg.t_max, False, u)
                else:
                    level = rng.uniform(EPS, 1.0)
                    noisy = np.where(rng.random(L) < level, rng.integers(0, hp.n_vocab, L), target)
                    temp = sampler.temperature_at(level, cfg.t_min, cfg.t_max)
                    m.denoise_step(noisy, temp, False, u)
                    col.record_self_cond = True
                    m.denoise_step(noisy, temp, True, u)
                done += 1
                if bar is not None:
                    bar.update(size)
                if save_every and done % save_every == 0:
                    save()
        finally:
            m.reset()
            if bar is not None:
                bar.close()
    save()
    ents = col.entries()
    coverage, least = {}, {}
    for name, e in ents.items():
        if e.n_mat > 1:
            coverage[name] = e.coverage
            order = np.argsort(e.counts, kind="stable")[:3]
            least[name] = [(int(i), int(e.counts[i])) for i in order]
    graph_weights = expected_weights(m.node_names())
    missing = sorted(n for n in graph_weights if n not in ents or not (ents[n].counts > 0).any())
    return ImatrixReport(entries=len(ents), chunks=done, coverage=coverage, least_used=least, missing=missing,
                         tokens=done * size, seconds=time.perf_counter() - t0, path=out, mode=mode)
