"""The engine of a loaded DiffusionGemma model: memory-mapped weights on ggml backends, prompt-KV stores
(sequences), the encoder and decoder graphs, logits and denoising steps. It knows nothing of generation:
model.Model adds the user-level calls (generate, stream, chat, ...) on top."""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import binding as B
from . import cpu_layout, devices, gguf_file, kv, layout, memory, multimodal
from .errors import Error, GGUFError
from .graph import F16, F32, Allocated, Graphs, Runner, flash_supported, sc_layout, sc_shape, set_input
from .sampler import SamplerSettings
from .sequence import Denoise, Sequence, StepLogprobs
from .tokenizer import Tokenizer
from .vision import Tower
from .weights import ModelWeights

_lib, _ffi = B.lib, B.ffi
N_BATCH = 512  # default committed tokens encoded per graph (bounds the compute buffer)


class Engine:
    """A DiffusionGemma model loaded from a `diffusion-gemma` GGUF file: the device side (weights, sequences,
    graphs) that generation drives. Users get a model.Model (see `diffgemma.load`)."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = -1, threads: int | None = None,
                 flash_attn: str | bool = "auto", verbose: bool = False, n_ctx: int | None = None,
                 mmproj: str | os.PathLike | None = None, n_batch: int = N_BATCH, kv_type: str = "f16",
                 repack: bool = True, device: Any = None, tensor_split: Any = None, rpc: Any = None):
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
        self.threads = threads or B.default_threads()
        self._lock = threading.RLock()
        self._closed = False
        self._bufs: list[Any] = []
        self._ctxs: list[Any] = []
        self._owned: list[B.DeviceTensors] = []
        if not isinstance(repack, bool):
            raise Error(f"repack must be True or False, got {repack!r}")
        self._setup_backends(n_gpu_layers, device, tensor_split, rpc)
        self._load_weights(repack)
        self.flash = self._want_flash(flash_attn)
        scale = math.sqrt(hp.n_embd)
        # The reference multiplies by sqrt(H) cast to the weight dtype (53.0 in a bf16 model).
        if self._file.tensors["token_embd.weight"].type == int(QT.BF16):
            scale = float(gguf_file.bf16_bits_to_f32(gguf_file.f32_to_bf16_bits([scale]))[0])
        self._graphs = Graphs(self.weights, hp, self.flash, scale)
        self.vision = self._load_vision(mmproj) if mmproj is not None else None
        self._kv_room = memory.store_room(hp, self.n_batch, self.vision is not None)
        self.n_ctx = memory.context_length(hp, n_ctx, kv_type=self.kv_type, room=self._kv_room,
                                           placement=self.placement, tensors=self._file.tensors.values())
        self._sequences: list[Sequence] = []  # those new_sequence made (freed with the model)
        self._embd_t = None
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
        self._cpu_dev = self.placement.cpu.handle
        self.cpu_backend = _lib.ggml_backend_dev_init(self._cpu_dev, _ffi.NULL)
        B.set_n_threads(self.cpu_backend, self.threads)
        self._dev_backends: dict[str, Any] = {}
        for d in self.placement.devices:
            self._dev_backends[d.name] = _lib.ggml_backend_dev_init(d.handle, _ffi.NULL)
            if self._dev_backends[d.name] == _ffi.NULL:
                raise Error(f"ggml could not start a backend on {d.name} ({d.description})")
        # the output layer's device, where sampling runs (None: the CPU)
        self.gpu_backend = self._dev_backends.get(self.placement.output.name)
        self._runner = Runner([*self._dev_backends.values(), self.cpu_backend], health=self.placement.check)
        self.devices = self.placement.names

    def _new_ctx(self, n: int) -> Any:
        ctx = B.ggml_context(_lib.ggml_tensor_overhead() * (n + 8))
        self._ctxs.append(ctx)
        return ctx

    def _load_weights(self, repack: bool) -> None:
        """Memory-map the file; CPU weights point into the mapping (no copy), except, with `repack`, the matrices
        cpu_layout.choose rearranges (ggml's CPU extra buffer types) or copies as F32; GPU weights are uploaded.
        Then the typed records (weights.ModelWeights) over them."""
        infos = list(self._file.tensors.values())
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = _ffi.from_buffer(self._mmap)
        tensors: dict[str, Any] = {}
        specs = layout.tensor_specs(self.hparams, fused_gate_up=layout.fused_gate_up(self._file.tensors))
        products = {s.name for s in specs if s.role == layout.MATRIX} if repack else set()
        # placement -> infos: a non-CPU device, a CPU extra buffer type (repacked), or None (mapped)
        groups: dict[Any, list] = {}
        for info in infos:
            dev = self.placement.of_tensor(info.name)
            if not dev.is_cpu:
                place = dev
            elif info.name in products:
                place = cpu_layout.choose(self._cpu_dev, info, f32_copies=not self.placement.devices)
            else:
                place = None  # mapped
            groups.setdefault(place, []).append(info)
        self.repacked: list[str] = []
        if cpu_layout.DEQUANTIZE in groups:
            group = groups.pop(cpu_layout.DEQUANTIZE)
            self._owned.append(cpu_layout.dequantized(group, self._host_array))
            tensors.update((i.name, t) for i, t in zip(group, self._owned[-1].tensors, strict=True))
            self.repacked += [i.name for i in group]
            cpu_layout.drop_mapped(self._mmap, group)
        for place, group in groups.items():
            ctx = self._new_ctx(len(group))
            on_dev, mapped = isinstance(place, devices.Device), place is None
            need = f"{sum(i.nbytes for i in group):,} bytes"
            weights, buf = B.map_weights(ctx, group, self._base, len(self._mmap), place.handle if on_dev else None,
                                         buft=None if on_dev or mapped else place,
                                         oom=f"not enough memory on {place.name} for its layers' weights ({need}); "
                                         "lower n_gpu_layers or change tensor_split" if on_dev
                                         else f"not enough memory for the repacked weights ({need})")
            tensors.update(weights)
            self._bufs.append(buf)
            if not (on_dev or mapped):
                self.repacked += [i.name for i in group]
                cpu_layout.drop_mapped(self._mmap, group)
        # Layer scalars go into the graphs as constants: multiplying by a one-element tensor costs per element
        # on the CPU backend, ggml_scale is vectorized.
        self.weights = ModelWeights.build(self.hparams, tensors, lambda name: float(self._host_array(name)[0]))

    def _load_vision(self, path: str | os.PathLike) -> Any:
        """The image tower of an mmproj file, on the same devices as the text weights."""
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
        with self._lock:
            self._check_open()
            if self.vision is None:
                raise Error("this model was loaded without a vision tower: dg.load(model, mmproj=...)")
            out = self.vision.embeddings(image, image_budget)
            self.placement.check()
            return out

    def _want_flash(self, flash_attn: str | bool) -> bool:
        if flash_attn in (True, "on"):
            return True
        if flash_attn in (False, "off"):
            return False
        # The CPU backend runs flash attention at any head size (exact at F32, ~10% faster per step here).
        return all(flash_supported(b, self.hparams) for b in self._dev_backends.values())

    def _buffer_type(self, dev: devices.Device) -> Any:
        return _lib.ggml_backend_cpu_buffer_type() if dev.is_cpu else _lib.ggml_backend_dev_buffer_type(dev.handle)

    def _new_store(self) -> kv.PromptKV:
        """An empty prompt-KV store of n_ctx tokens, each layer's part on that layer's device."""
        return kv.PromptKV(self.hparams, n_ctx=self.n_ctx, room=self._kv_room, ttype=self._kv_ttype,
                           buffer_type=lambda il: self._buffer_type(self.placement.of_layer(il)),
                           device_free=lambda il: memory.free_bytes(self.placement.of_layer(il)))

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
        return gguf_file.decode(self._mmap, self._file.tensors[name])

    def _embedding_t(self) -> Any:
        """E^T for the self-conditioning product, built once on the embedding's device. Block by block
        (graph.sc_shape: block c is E's rows c V/C .. (c+1) V/C, transposed), so only one block of E is ever
        decoded at a time (46 MB on the 26B-A4B, whose whole E decodes to 3 GB)."""
        if self._embd_t is None:
            info = self._file.tensors["token_embd.weight"]
            hp = self.hparams
            ttype, dtype = (F32, np.float32) if info.type == int(QT.F32) else (F16, np.float16)
            shape = sc_shape(hp.n_vocab, hp.n_embd)
            self._owned.append(B.DeviceTensors(self._buffer_type(self.placement.output),
                                               [("token_embd_t", ttype, shape)], weights=True,
                                               what="the transposed embedding for self-conditioning"))
            t = self._owned[-1].tensors[0]
            rows, row_bytes = shape[0], info.nbytes // hp.n_vocab
            for c in range(shape[2]):
                part = dataclasses.replace(info, shape=(hp.n_embd, rows), offset=info.offset + c * rows * row_bytes,
                                           nbytes=rows * row_bytes)
                block = np.ascontiguousarray(gguf_file.decode(self._mmap, part).reshape(rows, hp.n_embd).T, dtype)
                _lib.ggml_backend_tensor_set(t, _ffi.from_buffer(block), c * block.nbytes, block.nbytes)
            self._embd_t = t
        return self._embd_t

    # ---- graphs --------------------------------------------------------------------------------------

    @property
    def _graph(self) -> Allocated | None:
        """The graph allocated now (tests check which one ran last)."""
        return self._runner.graph

    @property
    def sched(self) -> Any:
        """ggml's backend scheduler of the text graphs (its splits say what left the device: docs/devices.md)."""
        return self._runner.sched

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
                gr = self._runner.use(("enc", seq.serial, store.n, n, store.capacity, bool(here)),
                                      lambda g, n=n, im=bool(here): self._graphs.encode(g, store, n, im))
                store.mark(n)
                set_input(gr.io["ids"], chunk)
                set_input(gr.io["pos"], np.arange(store.n, store.n + n, dtype=np.int32))
                masks = store.masks(n, causal=True, dtype=dtype)
                if here:
                    keep, embd = np.ones((n, 1), np.float32), np.zeros((n, hp.n_embd), np.float32)
                    for sp in here:
                        keep[sp.start - start:sp.end - start] = 0
                        embd[sp.start - start:sp.end - start] = sp.embeddings
                    set_input(gr.io["text_keep"], keep)
                    set_input(gr.io["image_embd"], embd)
                    if bidirectional:  # same-image keys on both layer kinds, whatever the window says
                        qpos = np.arange(start, start + n)
                        for kind, mask in masks.items():
                            keys = store.key_positions(kind == "swa", n, tiles=True)
                            multimodal.allow_image_blocks(mask[:n], qpos, keys, here)
                for kind, mask in masks.items():
                    set_input(gr.io[f"mask_{kind}"], mask)
                self._runner.compute(gr)
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
                set_input(state, sc_layout(probs.astype(np.float32 if state.type == F32 else np.float16)))
            ask = Denoise(canvas, 1.0, self_cond is not None, np.full(L, 0.5, np.float32))
            gr = self._run_decoder([(self._main, ask)])
            out = np.empty((L, V), dtype=np.float32)
            _lib.ggml_backend_tensor_get(gr.io["logits"], _ffi.from_buffer(out), 0, out.nbytes)
            self.placement.check()
            return out

    def _self_cond_state(self, L: int, sequence: Sequence | None = None) -> Any:
        """The persistent self-conditioning state of a sequence (the model's own by default) for canvases of L."""
        return (sequence or self._main).self_cond_state(sc_shape(self.hparams.n_vocab, L),
                                                        self._embedding_t().type)

    def _run_decoder(self, batch: list[tuple[Sequence, Denoise]]) -> Allocated:
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
            key.append((seq.serial, store.n, store.capacity, serial, ask.logprobs))
        embd_t = self._embedding_t()
        stores = [seq.store for seq, _ in batch]
        states = [self._self_cond_state(L, seq) for seq, _ in batch]
        gr = self._runner.use(("dec", L, *key),
                              lambda g: self._graphs.decode(g, stores, L, embd_t, states, biases,
                                                            [ask.logprobs for _, ask in batch]))
        dtype = np.float16 if self.flash else np.float32
        for b, (seq, ask) in enumerate(batch):
            seq.store.mark(L)
            set_input(gr.io["mask_swa"][b], seq.store.masks(L, causal=False, kinds=("swa",), dtype=dtype)["swa"])
            set_input(gr.io["sc_gate"][b], np.full(1, 1.0 if ask.self_cond else 0.0, np.float32))
            set_input(gr.io["inv_temp"][b], np.full(1, 1.0 / ask.temperature, np.float32))
            set_input(gr.io["uniform"][b], np.asarray(ask.uniform, dtype=np.float32))
            if ask.vocab is not None:
                set_input(gr.io["vocab_rows"][b], np.asarray(ask.vocab[1], dtype=np.int32))
        set_input(gr.io["ids"], np.concatenate([ask.canvas for _, ask in batch]).astype(np.int32))
        set_input(gr.io["pos"], np.concatenate([np.arange(seq.store.n, seq.store.n + L, dtype=np.int32)
                                                 for seq, _ in batch]))
        self._runner.compute(gr)
        return gr

    def denoise_batch(self, batch: list[tuple[Sequence, Denoise]]) -> list[tuple[Any, ...]]:
        """One denoising step of several sequences' canvases in one decoder pass (see denoise_step); each
        sequence is answered as it would be alone. Returns (argmax, entropy, sample) per sequence, and a
        fourth item, its StepLogprobs, where its Denoise asked for logprobs."""
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
                answer = (argmax.astype(np.int64), entropy, np.minimum(sample, top).astype(np.int64))
                k = batch[b][1].logprobs
                out.append(answer if k is None else (*answer, self._step_logprobs(gr, b, L, k)))
            self.placement.check()  # a lost RPC server: its relay answered in its place, the results are void
            return out

    @staticmethod
    def _step_logprobs(gr: Allocated, b: int, L: int, k: int) -> StepLogprobs:
        """Canvas b's log-probabilities from a computed decoder graph, its top k sorted most likely first."""
        chosen = np.empty(L, np.float32)
        _lib.ggml_backend_tensor_get(gr.io["logprob"][b], _ffi.from_buffer(chosen), 0, chosen.nbytes)
        ids, top = np.empty((L, k), np.int32), np.empty((L, k), np.float32)
        if k:
            for name, arr in (("top_ids", ids), ("top_logprobs", top)):
                _lib.ggml_backend_tensor_get(gr.io[name][b], _ffi.from_buffer(arr), 0, arr.nbytes)
            order = np.argsort(-top, axis=1, kind="stable")  # ggml's top_k leaves them in no particular order
            ids, top = np.take_along_axis(ids, order, 1), np.take_along_axis(top, order, 1)
        return StepLogprobs(chosen, ids.astype(np.int64), top)

    def denoise_step(self, canvas: np.ndarray, temperature: float, self_cond: bool, uniform: np.ndarray,
                     vocab: tuple[np.ndarray, np.ndarray] | None = None, logprobs: int | None = None
                     ) -> tuple[Any, ...]:
        """One step of the sampler on the device: (argmax, entropy, sample) of softmax(logits / temperature) per
        canvas position. Self-conditioning reads the previous step's scaled logits from the device when
        `self_cond`; only O(canvas) numbers cross to the host. vocab=(table, rows): position j may only take
        the tokens where the bool table [K, n_vocab] is True in row rows[j], masked on the device before
        softmax (the statistics are those of the renormalised distribution). logprobs=k (k >= 0): a fourth item,
        the step's StepLogprobs (log p of each argmax token and the top k), gathered on the device."""
        ask = Denoise(np.asarray(canvas), temperature, self_cond, uniform, vocab, logprobs)
        return self.denoise_batch([(self._main, ask)])[0]

    # ---- text ------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of `text` (BOS added when add_special; control tokens in the text are recognised)."""
        return self.tokenizer.tokenize(text, add_special=add_special)

    def detokenize(self, ids: Any, *, special: bool = False) -> str:
        """Text of token ids; control tokens are left out unless special=True."""
        return self.tokenizer.detokenize(ids, special=special)

    # ---- hooks: what generation, calibration, benchmarks and the profiler drive the model with ------------

    @contextmanager
    def exclusive(self) -> Iterator[Self]:
        """Hold the model for a sequence of calls (prefill, denoise_step, ...): other threads wait until the
        block ends. Reentrant: the model's own methods run inside it."""
        with self._lock:
            self._check_open()
            yield self

    @contextmanager
    def observe(self, callback: Callable[[Any, bool], bool]) -> Iterator[Self]:
        """Within the block, every graph the model computes calls callback(node, ask) for its nodes (ggml's
        scheduler eval callback; node is a `struct ggml_tensor *`): with ask=True it returns whether it wants
        the node once computed, then it is called again with ask=False and may read the node's data (return
        False to skip the rest of the graph). Nodes are named as llama.cpp names them (graph.py: "attn_out-3",
        products after their weight: "attn_q-3"). An exception in the callback (Ctrl-C and SIGTERM's included)
        ends the observation: the graph finishes unobserved and the call that ran it raises the exception.
        Holds the model for the block (see exclusive)."""
        with self._lock:
            self._check_open()
            if self._runner.observed:
                raise Error("this model is already observed (observe() blocks do not nest)")
            self._runner.set_observer(callback)
            try:
                yield self
            finally:
                self._runner.set_observer(None)

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
            if getattr(self, "vision", None) is not None:
                self.vision.close()
            self._runner.free()
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

    def __enter__(self) -> Self:
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
        return (f"<diffgemma.{type(self).__name__} {self.path.name}: {hp.n_layer} layers, n_embd {hp.n_embd}, "
                f"{hp.n_expert} experts (top {hp.n_expert_used}), canvas {hp.canvas_length}, on {self.devices}>")
