"""A loaded DiffusionGemma model: memory-mapped weights on ggml backends, prompt-KV store, graphs, logits."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import mmap
import os
import pathlib
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from . import binding as B
from . import devices, gguf_file, kv, layout, multimodal
from .batching import Denoise
from .errors import Error, GGUFError
from .generation import FROM_FILE, BatchStream, Generation, Stream
from .generation import generate as _generate
from .generation import generate_batch as _generate_batch
from .generation import infill as _infill
from .generation import stream as _stream
from .generation import stream_batch as _stream_batch
from .graph import F16, F32, MASKED_LOGIT, Ctx, Graphs
from .sampler import SamplerSettings
from .tokenizer import Tokenizer
from .weights import ModelWeights

_lib, _ffi = B.lib, B.ffi
GRAPH_NODES = 32768
N_BATCH = 512  # default committed tokens encoded per graph (bounds the compute buffer)


@dataclasses.dataclass
class _Graph:
    key: tuple
    ctx: Ctx
    io: dict[str, Any]


_serials = itertools.count()  # graph keys name sequences and tables by serial: an id() can be reused


class Sequence:
    """One generation's place on the device: a prompt-KV store, the tokens (and images) committed into it, its
    canvas's self-conditioning state and its template's vocabulary table. The model's own serves the
    one-at-a-time API (m.prompt_kv); a batch takes one per request (Model.new_sequence)."""

    def __init__(self, store: kv.PromptKV, buffer_type: Any) -> None:
        self.store = store
        self.committed: list[int] = []  # token ids whose K/V are in the store
        self.images: list[Any] = []  # multimodal.ImageSpan of the committed tokens
        self.serial = next(_serials)
        self._buffer_type = buffer_type
        self._sc_state: dict[int, B.DeviceTensors] = {}  # by canvas length
        self._vocab: tuple[B.DeviceTensors, np.ndarray, int] | None = None  # (table tensor, table written, serial)

    def common_prefix(self, tokens: np.ndarray) -> int:
        """How many of `tokens` the store already holds, from the start."""
        n = min(len(self.committed), len(tokens))
        same = np.asarray(self.committed[:n]) == np.asarray(tokens[:n])
        return n if same.all() else int(np.argmin(same))

    def self_cond_state(self, n_vocab: int, L: int, ttype: int) -> Any:
        """The persistent [V, L] tensor holding the previous step's softmax(logits / T) (zeros until written)."""
        if L not in self._sc_state:
            # zeroed: finite, and the first step multiplies it by a zero gate
            self._sc_state[L] = B.DeviceTensors(self._buffer_type, [(f"self_cond_state.{L}", ttype, (n_vocab, L))],
                                                what="the self-conditioning state", clear=True)
        return self._sc_state[L].tensors[0]

    def vocab_bias(self, table: np.ndarray) -> tuple[Any, int]:
        """(the persistent [V, K] bias tensor of a bool vocabulary table [K, V], its serial), written only when the
        table changes (once per template)."""
        if self._vocab is not None and self._vocab[1] is table:
            return self._vocab[0].tensors[0], self._vocab[2]
        K, V = table.shape
        if self._vocab is None or self._vocab[0].tensors[0].ne[1] != K:
            if self._vocab is not None:
                self._vocab[0].free()
                self._vocab = None
            self._vocab = (B.DeviceTensors(self._buffer_type, [("vocab_bias", F32, (V, K))],
                                           what="the template's vocabulary table"), table, next(_serials))
        t = self._vocab[0].tensors[0]
        bias = np.where(table, np.float32(0.0), np.float32(MASKED_LOGIT)).astype(np.float32)
        _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(bias), 0, bias.nbytes)
        self._vocab = (self._vocab[0], table, self._vocab[2])
        return t, self._vocab[2]

    def _free(self) -> None:  # Model.free_sequence: the model forgets it too
        self.store.free()
        for d in self._sc_state.values():
            d.free()
        self._sc_state = {}
        if self._vocab is not None:
            self._vocab[0].free()
            self._vocab = None


class Model:
    """A DiffusionGemma model loaded from a `diffusion-gemma` GGUF file (see `diffgemma.load`)."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = -1, threads: int | None = None,
                 flash_attn: str | bool = "auto", verbose: bool = False, n_ctx: int | None = None,
                 mmproj: str | os.PathLike | None = None, n_batch: int = N_BATCH, kv_type: str = "f16",
                 device: Any = None, tensor_split: Any = None, rpc: Any = None):
        B.set_verbose(verbose)
        if flash_attn not in ("auto", "on", "off", True, False):
            raise Error(f"flash_attn must be 'auto', 'on' or 'off', got {flash_attn!r}")
        self.path = pathlib.Path(path)
        self._file = gguf_file.read(self.path)
        self.hparams: layout.HParams = gguf_file.validate(self._file)
        self.metadata: dict[str, Any] = self._file.metadata
        self.tokenizer = Tokenizer(self.metadata)
        hp = self.hparams
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise Error(f"threads must be an int >= 1 or None, got {threads!r}")
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise Error(f"n_batch must be an int >= 1, got {n_batch!r}")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
            raise Error(f"n_ctx must be a positive int or None, got {n_ctx!r}")
        self.kv_type = kv_type.lower() if isinstance(kv_type, str) else kv_type
        self._kv_ttype = kv.kv_type_of(self.kv_type)
        self.n_batch = min(n_batch, n_ctx or hp.context_length)  # as llama.cpp: no chunk beyond the context
        self.threads = threads or len(os.sched_getaffinity(0))
        self._lock = threading.RLock()
        self._closed = False
        self._observer: Any = None  # the eval callback installed by observe(), kept alive while installed
        self._observer_error: BaseException | None = None
        self._bufs: list[Any] = []
        self._ctxs: list[Any] = []
        self._owned: list[B.DeviceTensors] = []
        self._setup_backends(n_gpu_layers, device, tensor_split, rpc)
        self._load_weights()
        self.flash = self._want_flash(flash_attn)
        scale = math.sqrt(hp.n_embd)
        # The reference multiplies by sqrt(H) cast to the weight dtype (53.0 in a bf16 model).
        if self._file.tensors["token_embd.weight"].type == int(QT.BF16):
            scale = float(gguf_file.bf16_bits_to_f32(gguf_file.f32_to_bf16_bits([scale]))[0])
        self._graphs = Graphs(self.weights, hp, self.flash, scale)
        self.vision = self._load_vision(mmproj) if mmproj is not None else None
        self._size_prompt_kv(n_ctx)
        self._sequences: list[Sequence] = []  # those new_sequence made (freed with the model)
        self._image_cache: dict[tuple, np.ndarray] = {}
        self._embd_t = None
        self._graph: _Graph | None = None
        self._main = Sequence(self._new_store(), self._buffer_type(self.placement.output))

    # ---- setup -------------------------------------------------------------------------------------

    def _setup_backends(self, n_gpu_layers: int, device: Any, tensor_split: Any, rpc: Any) -> None:
        """Place each layer on a device (devices.plan: device=, n_gpu_layers, tensor_split, rpc=) and start a
        backend per device in use; the scheduler gets them all, CPU last."""
        hp = self.hparams
        embd = self._file.tensors["token_embd.weight"]
        embd_t = hp.n_vocab * hp.n_embd * (4 if embd.type == int(QT.F32) else 2)  # E^T, made on the output device
        self.placement = devices.plan(devices.layer_bytes(hp, self._file.tensors, embd_t),
                                      devices.local() + devices.remote(rpc), device=device,
                                      n_gpu_layers=n_gpu_layers, tensor_split=tensor_split)
        self.cpu_backend = _lib.ggml_backend_dev_init(self.placement.cpu.handle, _ffi.NULL)
        B.set_n_threads(self.cpu_backend, self.threads)
        self._dev_backends: dict[str, Any] = {}
        for d in self.placement.devices:
            self._dev_backends[d.name] = _lib.ggml_backend_dev_init(d.handle, _ffi.NULL)
            if self._dev_backends[d.name] == _ffi.NULL:
                raise Error(f"ggml could not start a backend on {d.name} ({d.description})")
        # the output layer's device, where sampling runs (None: the CPU)
        self.gpu_backend = self._dev_backends.get(self.placement.output.name)
        backends = [*self._dev_backends.values(), self.cpu_backend]
        self._backends_arr = _ffi.new("ggml_backend_t[]", backends)
        self.sched = _lib.ggml_backend_sched_new(self._backends_arr, _ffi.NULL, len(backends), GRAPH_NODES,
                                                 False, True)
        self.devices = self.placement.names

    def _new_ctx(self, n: int) -> Any:
        ctx = B.ggml_context(_lib.ggml_tensor_overhead() * (n + 8))
        self._ctxs.append(ctx)
        return ctx

    def _load_weights(self) -> None:
        """Memory-map the file; CPU weights point into the mapping (no copy), GPU weights are uploaded; then the
        typed records (weights.ModelWeights) over those tensors."""
        infos = list(self._file.tensors.values())
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = _ffi.from_buffer(self._mmap)
        tensors: dict[str, Any] = {}
        groups: dict[str, tuple[devices.Device, list]] = {}
        for info in infos:
            dev = self.placement.of_tensor(info.name)
            groups.setdefault(dev.name, (dev, []))[1].append(info)
        for dev, group in groups.values():
            ctx = self._new_ctx(len(group))
            weights, buf = B.map_weights(ctx, group, self._base, len(self._mmap), None if dev.is_cpu else dev.handle,
                                         oom=f"not enough memory on {dev.name} for its layers' weights "
                                             f"({sum(i.nbytes for i in group):,} bytes); lower n_gpu_layers or "
                                             "change tensor_split")
            tensors.update(weights)
            self._bufs.append(buf)
        # Layer scalars go into the graphs as constants: multiplying by a one-element tensor costs per element
        # on the CPU backend, ggml_scale is vectorized.
        self.weights = ModelWeights.build(self.hparams, tensors, lambda name: float(self._host_array(name)[0]))

    def _load_vision(self, path: str | os.PathLike) -> Any:
        """The image tower of an mmproj file, on the same devices as the text weights."""
        from .mmproj import Tower

        backends = [b for b in (self.gpu_backend, self.cpu_backend) if b is not None]
        out = self.placement.output  # the tower runs where the output layer is
        tower = Tower(path, backends=backends, gpu_dev=None if out.is_cpu else out.handle)
        if tower.hparams.n_proj != self.hparams.n_embd:
            tower.close()
            raise GGUFError(f"{path}: the vision tower projects to width {tower.hparams.n_proj}, but this text model "
                            f"has n_embd {self.hparams.n_embd} (an mmproj for another model?)")
        return tower

    def image_embeddings(self, image: Any, *, image_budget: int = 280) -> np.ndarray:
        """The projected embeddings [n_tokens, n_embd] of one image (a path, bytes, a PIL image or a uint8
        array), as they replace the image's placeholder tokens in a prompt."""
        from . import images

        with self._lock:
            self._check_open()
            if self.vision is None:
                raise Error("this model was loaded without a vision tower: dg.load(model, mmproj=...)")
            hp = self.vision.hparams
            p = images.preprocess(image, image_budget, hp.patch_size, hp.pool)
            key = (hashlib.blake2b(p.pixels.tobytes(), digest_size=16).digest(), p.cols, p.rows)
            if key not in self._image_cache:  # a chat re-sends its pictures every turn: run the tower once
                if len(self._image_cache) >= 8:
                    self._image_cache.pop(next(iter(self._image_cache)))
                self._image_cache[key] = self.vision.encode(p.pixels, p.cols, p.rows)
                self.placement.check()
            return self._image_cache[key].copy()

    def _want_flash(self, flash_attn: str | bool) -> bool:
        if flash_attn in (True, "on"):
            return True
        if flash_attn in (False, "off"):
            return False
        # The CPU backend runs flash attention at any head size (exact at F32, ~10% faster per step here).
        return not self._dev_backends or self._flash_supported()

    def _flash_supported(self) -> bool:
        """Ask every non-CPU backend in use whether it runs flash attention at both head sizes of this model."""
        g = Ctx(64)
        try:
            ok = True
            for d, n_kv in {(self.hparams.head_dim, 1), (self.hparams.head_dim_swa, 1)}:
                q = _lib.ggml_new_tensor_3d(g.ctx, F32, d, 4, self.hparams.n_head)
                k = _lib.ggml_new_tensor_3d(g.ctx, F16, d, 16, n_kv)
                m = _lib.ggml_new_tensor_2d(g.ctx, F16, 16, 4)
                fa = g.flash_attn_ext(q, k, k, m, 1.0, 0.0, 0.0)
                ok = ok and all(_lib.ggml_backend_supports_op(b, fa) for b in self._dev_backends.values())
            return ok
        finally:
            g.free()

    def _size_prompt_kv(self, n_ctx: int | None) -> None:
        """Size the compact prompt-KV stores (kv.py): self.n_ctx and the room of each. n_ctx=None: the file's
        context length, or less where a store would not fit next to the weights in the memory free now; an
        n_ctx whose store does not fit is an Error naming the bytes."""
        hp = self.hparams
        room = max(self.n_batch, hp.canvas_length)  # a prefill chunk or a canvas after the last W-1 keys
        if self.vision is not None:  # an image is encoded in one pass, however many soft tokens it has
            room = max(room, multimodal.MAX_IMAGE_TOKENS)
        self._kv_room = room
        groups: dict[str, tuple[devices.Device, list[int]]] = {}
        for il in range(hp.n_layer):
            dev = self.placement.of_layer(il)
            groups.setdefault(dev.name, (dev, []))[1].append(il)
        if n_ctx is None:
            self.n_ctx = min(kv.max_context(hp, self._kv_ttype, room, self._kv_budget(dev), layers)
                             for dev, layers in groups.values())
            if self.n_ctx < hp.canvas_length + 1:
                raise Error(f"not enough free memory for a prompt-KV store next to the weights "
                            f"({kv.store_bytes(hp, self._kv_ttype, hp.canvas_length + 1, room):,} bytes for one "
                            "canvas); close other programs or offload fewer layers")
        else:
            if n_ctx > hp.context_length:
                raise Error(f"n_ctx={n_ctx} is above the file's context length {hp.context_length} "
                            "(positions past it were never trained); use n_ctx <= that, or leave it out")
            self.n_ctx = n_ctx
            for dev, layers in groups.values():
                need = kv.store_bytes(hp, self._kv_ttype, self.n_ctx, room, layers)
                free = self._free_bytes(dev) - kv.RESERVE_BYTES
                if need > free:
                    raise Error(f"n_ctx={self.n_ctx}: the prompt-KV store would need {need:,} bytes of "
                                f"{dev.name} memory ({kv.bytes_per_token(hp, self._kv_ttype):,} "
                                f"per token in {self.kv_type}) but only {max(free, 0):,} are free; use a smaller n_ctx")
        if self.n_ctx < hp.canvas_length + 1:
            raise Error(f"n_ctx={self.n_ctx} cannot hold a prompt and a canvas of {hp.canvas_length}")

    def _buffer_type(self, dev: devices.Device) -> Any:
        return _lib.ggml_backend_cpu_buffer_type() if dev.is_cpu else _lib.ggml_backend_dev_buffer_type(dev.handle)

    def _new_store(self) -> kv.PromptKV:
        """An empty prompt-KV store of n_ctx tokens, each layer's part on that layer's device."""
        return kv.PromptKV(self.hparams, n_ctx=self.n_ctx, room=self._kv_room, ttype=self._kv_ttype,
                           buffer_type=lambda il: self._buffer_type(self.placement.of_layer(il)),
                           device_free=lambda il: self._free_bytes(self.placement.of_layer(il)))

    def new_sequence(self) -> Sequence:
        """A fresh sequence (its own prompt-KV store) for one request of a batch; free it with free_sequence."""
        with self._lock:
            self._check_open()
            seq = Sequence(self._new_store(), self._buffer_type(self.placement.output))
            self._sequences.append(seq)
            return seq

    def free_sequence(self, sequence: Sequence) -> None:
        """Free a sequence made by new_sequence (its store and state)."""
        with self._lock:
            if sequence in self._sequences:  # a Sequence compares by identity
                self._sequences.remove(sequence)
                sequence._free()

    def _own(self, sequence: Sequence | None) -> Sequence:
        """The sequence to work on (the model's own for None), checked to be live and this model's."""
        if sequence is None or sequence is self._main:
            return self._main
        if sequence not in self._sequences:
            raise Error("this sequence is not one of this model's live sequences (freed with free_sequence, or "
                        "made by another model)")
        return sequence

    @property
    def prompt_kv(self) -> kv.PromptKV:
        """The model's own prompt-KV store (generate, stream, logits, encode)."""
        return self._main.store

    @property
    def committed(self) -> list[int]:
        """Token ids whose K/V are in the model's own store."""
        return self._main.committed

    @property
    def images(self) -> list[Any]:
        """multimodal.ImageSpan of the model's own committed tokens."""
        return self._main.images

    def _free_bytes(self, dev: devices.Device) -> int:
        """Memory free now on a device, or on the host (MemAvailable) for the CPU."""
        return kv.host_available() if dev.is_cpu else dev.free_now()

    def _kv_budget(self, dev: devices.Device) -> int:
        """Bytes the store may take on a device by default: its free memory less a reserve and, on the host,
        less the CPU weights (their mapped pages must stay resident to run at speed)."""
        weights = sum(i.nbytes for i in self._file.tensors.values()
                      if self.placement.of_tensor(i.name).is_cpu) if dev.is_cpu else 0
        return self._free_bytes(dev) - weights - kv.RESERVE_BYTES

    @property
    def sampler_defaults(self) -> SamplerSettings:
        """The sampler settings generation uses where none are given: the file's diffusion.eb_* keys, the
        reference defaults for absent ones (checked when the file was loaded)."""
        return SamplerSettings.from_metadata(self.metadata)

    @property
    def kv_bytes_per_token(self) -> int:
        """Prompt-KV store bytes each committed token adds (K and V of the global layers, in kv_type)."""
        return kv.bytes_per_token(self.hparams, self._kv_ttype)

    @property
    def kv_bytes(self) -> int:
        """Prompt-KV store bytes allocated now (the sliding layers' rings and the global layers' stores) in the
        model's own store."""
        return self.prompt_kv.nbytes

    def _host_array(self, name: str) -> np.ndarray:
        """A weight read from the mapped file as float32 (dequantized if need be), rows of ne0."""
        info = self._file.tensors[name]
        raw = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.type == int(QT.F32):
            return raw.view(np.float32)
        rows = math.prod(info.shape[1:])
        return gq.dequantize(raw.reshape(rows, -1), QT(info.type)).reshape(-1)

    def _embedding_t(self) -> Any:
        """E^T [V, H] for the self-conditioning product, built once on the embedding's device."""
        if self._embd_t is None:
            info = self._file.tensors["token_embd.weight"]
            hp = self.hparams
            e = self._host_array("token_embd.weight").reshape(hp.n_vocab, hp.n_embd)
            ttype = F32 if info.type == int(QT.F32) else F16
            et = np.ascontiguousarray(e.T, dtype=np.float32 if ttype == F32 else np.float16)
            self._owned.append(B.DeviceTensors(self._buffer_type(self.placement.output),
                                               [("token_embd_t", ttype, (hp.n_vocab, hp.n_embd))], weights=True,
                                               what="the transposed embedding for self-conditioning"))
            t = self._owned[-1].tensors[0]
            _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(et), 0, et.nbytes)
            self._embd_t = t
        return self._embd_t

    # ---- graphs --------------------------------------------------------------------------------------

    def _use_graph(self, key: tuple, build: Any) -> _Graph:
        """The allocated graph for `key`, building and allocating it only when the shape changed."""
        if self._graph is not None and self._graph.key == key:
            return self._graph
        if self._graph is not None:
            self._graph.ctx.free()
            self._graph = None
        _lib.ggml_backend_sched_reset(self.sched)
        g = Ctx(GRAPH_NODES)
        io = build(g)
        if not _lib.ggml_backend_sched_alloc_graph(self.sched, g.graph):
            g.free()
            self.placement.check()  # a lost RPC server refuses allocations: say so rather than "out of memory"
            raise Error("ggml could not allocate the compute graph (out of memory?)")
        self._graph = _Graph(key, g, io)
        return self._graph

    def _compute(self, gr: _Graph) -> None:
        status = _lib.ggml_backend_sched_graph_compute(self.sched, gr.ctx.graph)
        self.placement.check()  # a lost RPC server: its relay answered in its place, the results are void
        if self._observer_error is not None:  # observe()'s callback raised: the graph stopped there
            err, self._observer_error = self._observer_error, None
            raise err
        if status != 0:
            raise Error("ggml graph computation failed")

    def _drop_graph(self) -> None:
        """Free the allocated graph; the next call builds and allocates one again."""
        if self._graph is not None:
            self._graph.ctx.free()
            self._graph = None

    @staticmethod
    def _set(t: Any, arr: np.ndarray) -> None:
        if t.buffer == _ffi.NULL:  # an input this graph does not use (e.g. no global layer to mask)
            return
        arr = np.ascontiguousarray(arr)
        _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(arr), 0, arr.nbytes)

    def _check_ids(self, ids: Any, what: str) -> np.ndarray:
        try:
            arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise Error(f"{what} must be a sequence of token ids") from e
        if arr.size and (arr.min() < 0 or arr.max() >= self.hparams.n_vocab):
            raise Error(f"{what}: token ids must be in [0, {self.hparams.n_vocab})")
        return arr.astype(np.int32)

    def encode(self, ids: Any, images: Iterable[Any] = (), *, on_progress: Any = None,
               sequence: Sequence | None = None) -> None:
        """Append committed tokens (prompt or a finished canvas) to the prompt-KV store (of `sequence`, else the
        model's own), causally, in chunks of n_batch tokens (a chunk never cuts an image). images:
        multimodal.ImageSpan at absolute positions inside these tokens, whose rows take the image embeddings
        (and whose soft tokens see each other when the tower says so). on_progress(done, total) is called after
        each chunk."""
        with self._lock:
            seq = self._own(sequence)
            arr = self._check_ids(ids, "committed tokens")
            store = seq.store
            if store.n + len(arr) > self.n_ctx:
                raise Error(f"context full: {store.n} + {len(arr)} tokens > n_ctx={self.n_ctx} (load with a larger "
                            "n_ctx)")
            hp = self.hparams
            spans = multimodal.check_spans(images, store.n + len(arr), hp.n_embd) if images else []
            if any(s.start < store.n for s in spans):
                raise Error("an image lies before the tokens being encoded")
            bidirectional = self.vision is None or self.vision.hparams.bidirectional
            dtype = np.float16 if self.flash else np.float32
            for s, e in multimodal.chunk_bounds(store.n, len(arr), self.n_batch, spans):
                chunk = arr[s:e]
                n, start = len(chunk), store.n
                if n > store.room:
                    raise Error(f"an image of {n} soft tokens does not fit one prefill pass of {store.room} tokens "
                                "(load with a larger n_batch)")
                here = [sp for sp in spans if start <= sp.start < start + n]
                store.reserve(store.n + n)
                gr = self._use_graph(("enc", seq.serial, store.n, n, store.capacity, bool(here)),
                                     lambda g, n=n, im=bool(here): self._graphs.encode(g, store, n, im))
                store.mark(n)
                self._set(gr.io["ids"], chunk)
                self._set(gr.io["pos"], np.arange(store.n, store.n + n, dtype=np.int32))
                masks = store.masks(n, causal=True, dtype=dtype)
                if here:
                    keep, embd = np.ones((n, 1), np.float32), np.zeros((n, hp.n_embd), np.float32)
                    for sp in here:
                        keep[sp.start - start:sp.end - start] = 0
                        embd[sp.start - start:sp.end - start] = sp.embeddings
                    self._set(gr.io["text_keep"], keep)
                    self._set(gr.io["image_embd"], embd)
                    if bidirectional:  # same-image keys on both layer kinds, whatever the window says
                        qpos = np.arange(start, start + n)
                        for kind, mask in masks.items():
                            multimodal.allow_image_blocks(mask, qpos, store.key_positions(kind == "swa", n), here)
                for kind, mask in masks.items():
                    self._set(gr.io[f"mask_{kind}"], mask)
                self._compute(gr)
                store.n += n
                seq.committed.extend(int(t) for t in chunk)
                seq.images.extend(here)
                if on_progress is not None:
                    on_progress(s + n, len(arr))

    def reset(self) -> None:
        """Forget every committed token; the store's allocation is kept for the next prompt."""
        with self._lock:
            self.prompt_kv.reset()
            self._main.committed = []
            self._main.images = []

    def prefill(self, tokens: Any, images: Iterable[Any] = (), *, on_progress: Any = None,
                sequence: Sequence | None = None) -> None:
        """Make the prompt-KV store (of `sequence`, else the model's own) hold exactly the committed tokens
        `tokens` (with `images`: multimodal.ImageSpan at absolute positions), encoding only what is new: the
        longest prefix it shares with what the store holds is kept (the same pictures included), the rest is
        dropped and encoded. on_progress(done, total) is called after each encoded chunk of n_batch tokens."""
        with self._lock:
            self._check_open()
            seq = self._own(sequence)
            prefix = self._check_ids(tokens, "prefill ids")
            images = list(images)
            n = seq.common_prefix(prefix)
            have = seq.committed
            if images or seq.images:  # the same placeholder ids stand for every image: compare the pictures too
                n = multimodal.reusable(n, seq.images, images)
            if n < len(have):  # diverged: drop the tail (K/V of earlier positions do not depend on later ones)
                if not seq.store.truncate(n):  # the ring lost the window before n: encode from the start
                    seq.store.reset()
                    n = 0
                seq.committed = have[:n]
                seq.images = [s for s in seq.images if s.end <= n]
            if n < len(prefix):
                new_images = [s for s in images if s.start >= n]
                self.encode(prefix[n:], new_images, on_progress=on_progress, sequence=seq)

    def logits(self, prompt_ids: Any, canvas_ids: Any, *, self_cond: Any = None, images: Any = None) -> np.ndarray:
        """Denoiser logits (soft-capped, no temperature) for a canvas placed right after the committed prefix
        `prompt_ids`; float32 [len(canvas_ids), n_vocab]. self_cond: previous step's temperature-scaled logits
        of the same shape, or None for the first step. images: (position of the first soft token, embeddings
        [n_tokens, n_embd]) pairs whose rows replace those prompt positions (see image_embeddings)."""
        with self._lock:
            self._check_open()
            prefix = self._check_ids(prompt_ids, "prompt_ids")
            canvas = self._check_ids(canvas_ids, "canvas_ids")
            L, V = len(canvas), self.hparams.n_vocab
            if L == 0:
                raise Error("canvas_ids is empty")
            if len(prefix) + L > self.n_ctx:
                raise Error(f"prompt ({len(prefix)}) + canvas ({L}) exceeds n_ctx={self.n_ctx}")
            if self_cond is not None:
                sc = np.asarray(self_cond, dtype=np.float32)
                if sc.shape != (L, V):
                    raise Error(f"self_cond must have shape {(L, V)}, got {sc.shape}")
                if not np.isfinite(sc).all():
                    raise Error("self_cond contains non-finite values")
            spans = multimodal.check_spans([multimodal.span(p, e) for p, e in images or ()], len(prefix),
                                           self.hparams.n_embd)
            self.prefill(prefix, spans)
            if self_cond is not None:  # the device state holds softmax(self_cond), in E^T's type
                e = np.exp(sc - sc.max(axis=1, keepdims=True), dtype=np.float64)
                probs = e / e.sum(axis=1, keepdims=True)
                state = self._self_cond_state(L)
                self._set(state, probs.astype(np.float32 if state.type == F32 else np.float16))
            ask = Denoise(canvas, 1.0, self_cond is not None, np.full(L, 0.5, np.float32))
            gr = self._run_decoder([(self._main, ask)])
            out = np.empty((L, V), dtype=np.float32)
            _lib.ggml_backend_tensor_get(gr.io["logits"], _ffi.from_buffer(out), 0, out.nbytes)
            self.placement.check()
            return out

    def _self_cond_state(self, L: int, sequence: Sequence | None = None) -> Any:
        """The persistent [V, L] self-conditioning state of a sequence (the model's own by default)."""
        return (sequence or self._main).self_cond_state(self.hparams.n_vocab, L, self._embedding_t().type)

    def _run_decoder(self, batch: list[tuple[Sequence, Denoise]]) -> _Graph:
        """One denoising forward pass over each sequence's canvas, after its committed prefix, all in one graph;
        returns the computed graph."""
        V = self.hparams.n_vocab
        L = len(batch[0][1].canvas)
        key: list[tuple] = []
        biases: list[Any] = []
        for seq, ask in batch:
            store = seq.store
            if len(ask.canvas) != L:
                raise Error(f"the canvases of one batch must have one length, got {len(ask.canvas)} and {L}")
            if store.n + L > self.n_ctx:  # the canvas K/V go into the store's slots after the committed tokens
                raise Error(f"{store.n} committed + canvas {L} tokens exceed n_ctx={self.n_ctx}")
            if L > store.room:
                raise Error(f"a canvas of {L} tokens exceeds the store's room of {store.room} (raise n_batch)")
            bias = serial = None
            if ask.vocab is not None:
                table, rows = ask.vocab
                rows = np.asarray(rows, dtype=np.int32)
                if table.ndim != 2 or table.shape[1] != V or rows.shape != (L,) or (
                        rows.size and (rows.min() < 0 or rows.max() >= table.shape[0])):
                    raise Error(f"vocab must be (table [K, {V}], rows [{L}] in 0..K-1)")
                bias, serial = seq.vocab_bias(table)
            biases.append(bias)
            store.reserve(store.n + L)
            key.append((seq.serial, store.n, store.capacity, serial))
        embd_t = self._embedding_t()
        stores = [seq.store for seq, _ in batch]
        states = [self._self_cond_state(L, seq) for seq, _ in batch]
        gr = self._use_graph(("dec", L, *key),
                             lambda g: self._graphs.decode(g, stores, L, embd_t, states, biases))
        dtype = np.float16 if self.flash else np.float32
        for b, (seq, ask) in enumerate(batch):
            seq.store.mark(L)
            self._set(gr.io["mask_swa"][b], seq.store.masks(L, causal=False, kinds=("swa",), dtype=dtype)["swa"])
            self._set(gr.io["sc_gate"][b], np.full(1, 1.0 if ask.self_cond else 0.0, np.float32))
            self._set(gr.io["inv_temp"][b], np.full(1, 1.0 / ask.temperature, np.float32))
            self._set(gr.io["uniform"][b], np.asarray(ask.uniform, dtype=np.float32))
            if ask.vocab is not None:
                self._set(gr.io["vocab_rows"][b], np.asarray(ask.vocab[1], dtype=np.int32))
        self._set(gr.io["ids"], np.concatenate([ask.canvas for _, ask in batch]).astype(np.int32))
        self._set(gr.io["pos"], np.concatenate([np.arange(seq.store.n, seq.store.n + L, dtype=np.int32)
                                                for seq, _ in batch]))
        self._compute(gr)
        return gr

    def denoise_batch(self, batch: list[tuple[Sequence, Denoise]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One denoising step of several sequences' canvases in one decoder pass (see denoise_step); each
        sequence is answered as it would be alone. Returns (argmax, entropy, sample) per sequence."""
        with self._lock:
            self._check_open()
            if not batch:
                return []
            for seq, _ in batch:
                self._own(seq)
            if len({id(seq) for seq, _ in batch}) < len(batch):
                raise Error("a sequence appears twice in one batch (each canvas needs its own sequence)")
            gr = self._run_decoder(batch)
            L, top = len(batch[0][1].canvas), self.hparams.n_vocab - 1
            out = []
            for b in range(len(batch)):
                argmax, entropy, sample = np.empty(L, np.int32), np.empty(L, np.float32), np.empty(L, np.float32)
                for name, arr in (("argmax", argmax), ("entropy", entropy), ("sample", sample)):
                    _lib.ggml_backend_tensor_get(gr.io[name][b], _ffi.from_buffer(arr), 0, arr.nbytes)
                out.append((argmax.astype(np.int64), entropy, np.minimum(sample, top).astype(np.int64)))
            self.placement.check()
            return out

    def denoise_step(self, canvas: np.ndarray, temperature: float, self_cond: bool, uniform: np.ndarray,
                     vocab: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step of the sampler on the device: (argmax, entropy, sample) of softmax(logits / temperature) per
        canvas position. Self-conditioning reads the previous step's scaled logits from the device when
        `self_cond`; only O(canvas) numbers cross to the host. vocab=(table, rows): position j may only take
        the tokens where the bool table [K, n_vocab] is True in row rows[j], masked on the device before
        softmax (the statistics are those of the renormalised distribution)."""
        ask = Denoise(np.asarray(canvas), temperature, self_cond, uniform, vocab)
        return self.denoise_batch([(self._main, ask)])[0]

    def generate(self, prompt: Any, *, max_new_tokens: int = 256, steps: int | None = None, seed: int | None = None,
                 t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
                 stability: Any = FROM_FILE, confidence: Any = FROM_FILE, chat: bool | None = None,
                 on_step: Any = None, on_prefill: Any = None, image_budget: int = 280,
                 template: Any = None, sampler: SamplerSettings | None = None) -> Generation:
        """Generate text after `prompt` by block diffusion.

        prompt: a str, a list of chat messages [{"role", "content"}] or a list of token ids; a message's content
        may be a list of parts {"type": "text", "text"} / {"type": "image", "image": path | bytes | PIL image |
        uint8 array} (needs mmproj=; image_budget: soft tokens per image, 70..1120). chat=None applies
        the file's chat template to str/messages when the file has one. Sampler settings left as None take the
        file's diffusion.eb_* values (else the reference defaults); stability/confidence=None disable the
        adaptive stop. max_new_tokens is rounded up to whole canvases. on_step(event) is called after every
        denoising step, on_prefill(done, total) after every chunk of n_batch tokens encoded (the prompt, then
        each finished canvas). Returns a Generation (.text, .tokens, .canvases, .timings, .seed); see stream
        for the same generation as events.

        template: fixed text with holes to fill (docs/templates.md): text with {{hole N ...}} tags or a list of
        str and dg.Hole parts. It is laid over as many canvases as it needs (max_new_tokens is then ignored, as
        are EOS tokens); .text is the filled template, .holes each hole's text. The prompt may be "" or None.

        sampler: a dg.SamplerSettings to start from instead of m.sampler_defaults; the six sampler keywords,
        where given, override it."""
        self._check_open()
        return _generate(self, prompt, max_new_tokens=max_new_tokens, steps=steps, seed=seed, t_min=t_min,
                         t_max=t_max, entropy_bound=entropy_bound, stability=stability, confidence=confidence,
                         chat=chat, on_step=on_step, on_prefill=on_prefill, image_budget=image_budget,
                         template=template, sampler=sampler)

    def stream(self, prompt: Any, *, max_new_tokens: int = 256, steps: int | None = None, seed: int | None = None,
               t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
               stability: Any = FROM_FILE, confidence: Any = FROM_FILE, chat: bool | None = None,
               on_prefill: Any = None, image_budget: int = 280, template: Any = None,
               sampler: SamplerSettings | None = None) -> Stream:
        """Generation as a stream of events (arguments as for generate, which consumes this stream).

        Iterate it: a dg.StepEvent after every denoising step (.canvas_index, .step, .steps, .temperature,
        .accepted, .mean_entropy, .argmax, .text, .fixed), then a dg.CanvasEvent when the canvas commits
        (.tokens, .text_delta, .steps, .stopped_early, .eos, .timings so far); the text deltas concatenate to
        the final text (with a template it comes whole with the last canvas). When the iteration ends,
        `.generation` holds the Generation, the same tokens as generate() for the same seed. Bad arguments
        raise here, before any work. Breaking out of the loop (or .close(), or `with m.stream(...) as s`)
        stops between steps; the model holds no half-done state and the next call works. The model is busy
        (other threads wait) until the stream ends or is dropped; a new generation on this thread ends a
        paused stream."""
        self._check_open()
        return _stream(self, prompt, max_new_tokens=max_new_tokens, steps=steps, seed=seed, t_min=t_min,
                       t_max=t_max, entropy_bound=entropy_bound, stability=stability, confidence=confidence,
                       chat=chat, on_prefill=on_prefill, image_budget=image_budget, template=template,
                       sampler=sampler)

    def generate_batch(self, prompts: list[Any], *, max_batch: int | None = None, **settings: Any
                       ) -> list[Generation]:
        """Generate after each of `prompts` with their canvases denoised together: one decoder pass per step
        over every running request's canvas (the projections, experts and LM head see all their rows at once).

        settings: the keywords of generate but on_step (max_new_tokens, steps, seed, t_min, t_max,
        entropy_bound, stability, confidence, chat, image_budget, template), each one value for all or a list
        with one per prompt; on_prefill(done, total) is shared. max_batch: most requests denoised together
        (None: all); the rest wait and join between steps as others finish. Each request is answered as it
        would be alone: the same tokens as generate() with its seed. Returns the Generations in prompt order."""
        self._check_open()
        return _generate_batch(self, prompts, max_batch=max_batch, **settings)

    def stream_batch(self, prompts: list[Any], *, max_batch: int | None = None, **settings: Any) -> BatchStream:
        """generate_batch as a stream: (request index, StepEvent | CanvasEvent) pairs as the requests produce
        them; `.generations` once the loop ends, `.cancel(i)` ends one request, breaking out ends all."""
        self._check_open()
        return _stream_batch(self, prompts, max_batch=max_batch, **settings)

    def infill(self, prefix: str, suffix: str, n_tokens: int, **kw: Any) -> str:
        """The text between `prefix` (the raw prompt) and `suffix`, in a hole of n_tokens. Keywords: allowed=,
        empty= as for dg.Hole, and the sampler settings of generate."""
        self._check_open()
        return _infill(self, prefix, suffix, n_tokens, **kw)

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None, tool_choice: Any = "auto",
             template_kwargs: dict[str, Any] | None = None, **generate_kw: Any) -> Any:
        """One assistant turn with tool calling and thinking: renders `messages` (OpenAI shapes: assistant
        `tool_calls`, `tool` results) and `tools` (OpenAI function schemas; tool_choice 'auto', 'none',
        'required' or {"type": "function", "function": {"name": ...}}) through the file's chat template (else
        the built-in Gemma 4 format), generates (keywords as for generate) and returns a ChatReply (.content,
        .reasoning, .tool_calls, .finish_reason, .generation; .to_message() for the next turn).
        template_kwargs reach the template, e.g. {"enable_thinking": True}."""
        from .chat import chat as _chat

        self._check_open()
        return _chat(self, messages, tools=tools, tool_choice=tool_choice, template_kwargs=template_kwargs,
                     **generate_kw)

    # ---- text ------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of `text` (BOS added when add_special; control tokens in the text are recognised)."""
        return self.tokenizer.tokenize(text, add_special=add_special)

    def detokenize(self, ids: Any, *, special: bool = False) -> str:
        """Text of token ids; control tokens are left out unless special=True."""
        return self.tokenizer.detokenize(ids, special=special)

    # ---- hooks: what generation, calibration, benchmarks and the profiler drive the model with ------------

    @contextmanager
    def exclusive(self) -> Iterator[Model]:
        """Hold the model for a sequence of calls (prefill, denoise_step, ...): other threads wait until the
        block ends. Reentrant: the model's own methods run inside it."""
        with self._lock:
            self._check_open()
            yield self

    @contextmanager
    def observe(self, callback: Callable[[Any, bool], bool]) -> Iterator[Model]:
        """Within the block, every graph the model computes calls callback(node, ask) for its nodes (ggml's
        scheduler eval callback; node is a `struct ggml_tensor *`): with ask=True it returns whether it wants
        the node once computed, then it is called again with ask=False and may read the node's data (return
        False to skip the rest of the graph). Nodes are named as llama.cpp names them (graph.py: "attn_out-3",
        products after their weight: "attn_q-3"). An exception in the callback stops the graph and is raised
        by the call that ran it. Holds the model for the block (see exclusive)."""
        with self._lock:
            self._check_open()
            if self._observer is not None:
                raise Error("this model is already observed (observe() blocks do not nest)")

            def on_node(t: Any, ask: bool, _ud: Any) -> bool:
                try:
                    return bool(callback(t, ask))
                except BaseException as e:  # never let an exception cross into C
                    self._observer_error = e
                    return False

            self._observer = _ffi.callback("bool(struct ggml_tensor *, bool, void *)", on_node)
            _lib.ggml_backend_sched_set_eval_callback(self.sched, self._observer, _ffi.NULL)
            self._drop_graph()  # the callback takes effect from the next graph allocation
            try:
                yield self
            finally:
                _lib.ggml_backend_sched_set_eval_callback(self.sched, _ffi.NULL, _ffi.NULL)
                self._drop_graph()
                self._observer = None
                self._observer_error = None

    def node_names(self) -> list[str]:
        """Names of the nodes of an encoder and a decoder graph of this model, built but neither allocated nor
        run (what observe() will see; e.g. the weights an imatrix should collect)."""
        with self._lock:
            self._check_open()
            L = self.hparams.canvas_length
            return self._graphs.node_names(self.prompt_kv, L, self._embedding_t(), self._self_cond_state(L))

    # ---- lifetime --------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Error("this model was closed")
        self.placement.check()  # a lost RPC server fails every later call, not only the one that met it

    def close(self) -> None:
        """Free backends, buffers and the mapping (the object is unusable afterwards)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_graph()
            if getattr(self, "vision", None) is not None:
                self.vision.close()
            _lib.ggml_backend_sched_free(self.sched)
            for seq in [*getattr(self, "_sequences", []), *([self._main] if hasattr(self, "_main") else [])]:
                seq._free()
            for owned in self._owned:
                owned.free()
            for buf in self._bufs:
                _lib.ggml_backend_buffer_free(buf)
            for ctx in self._ctxs:
                _lib.ggml_free(ctx)
            for backend in getattr(self, "_dev_backends", {}).values():
                _lib.ggml_backend_free(backend)
            _lib.ggml_backend_free(self.cpu_backend)
            del self._base
            self._mmap.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        hp = self.hparams
        return (f"<diffgemma.Model {self.path.name}: {hp.n_layer} layers, n_embd {hp.n_embd}, "
                f"{hp.n_expert} experts (top {hp.n_expert_used}), canvas {hp.canvas_length}, on {self.devices}>")


def load(path: str | os.PathLike, *, n_gpu_layers: int = -1, threads: int | None = None,
         flash_attn: str | bool = "auto", verbose: bool = False, n_ctx: int | None = None,
         mmproj: str | os.PathLike | None = None, n_batch: int = N_BATCH, kv_type: str = "f16",
         device: Any = None, tensor_split: Any = None, rpc: Any = None) -> Model:
    """Open a `diffusion-gemma` GGUF file. `path` may also be "tiny" for the embedded default model.

    device: a device name ("Vulkan0", "CUDA0", "RPC0"), a list of them, or "cpu"; default: every GPU (see
    dg.devices()). n_gpu_layers: -1 = every layer (and the output layer) on those devices, 0 = CPU only, k = the
    last k layers (the output layer counts as one). tensor_split: one weight per device for the layer split
    (default: in proportion to free memory). rpc: "host:port" of ggml RPC servers (a list, or comma-separated),
    whose devices join the others (docs/devices.md). n_ctx: most committed + canvas tokens (default: the file's
    context length, or less where its prompt-KV store would not fit next to the weights in the memory free now;
    the store grows as the context fills). mmproj: a `gemma4v` mmproj GGUF with the vision tower, for images in prompts.
    n_batch: prompt tokens encoded per graph (bounds the compute buffers). kv_type: the prompt-KV store's type,
    "f16" (default) or "f32".
    """
    return Model(resolve(path), n_gpu_layers=n_gpu_layers, threads=threads, flash_attn=flash_attn,
                 verbose=verbose, n_ctx=n_ctx, mmproj=mmproj, n_batch=n_batch, kv_type=kv_type, device=device,
                 tensor_split=tensor_split, rpc=rpc)


# "tiny": the small DiffusionGemma trained on Shakespeare by tools/make_default_model.py (docs/quality.md).
EMBEDDED = {"tiny": pathlib.Path(__file__).parent / "data" / "shakespeare.gguf"}


def resolve(path: str | os.PathLike) -> pathlib.Path:
    """A file path, or the name of a model embedded in the package ("tiny")."""
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise Error(f"model must be a GGUF file path or {', '.join(repr(k) for k in EMBEDDED)}, got {path!r}")
    if isinstance(path, str) and path in EMBEDDED and not pathlib.Path(path).exists():
        return EMBEDDED[path]
    return pathlib.Path(path)
