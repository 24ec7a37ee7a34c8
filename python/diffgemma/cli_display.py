"""What the command line shows: `diffgemma info`'s description of a file, the live canvas (--visual), the
progress bars over denoising and prefill, and the timing line after a generation."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
import sys
import textwrap
from typing import Any

from . import gguf_file, imatrix_file, kv, mmproj
from .generation import CanvasEvent, Generation, StepEvent
from .gguf_file import GGUFFile
from .layout import HParams
from .model import N_BATCH, resolve
from .sampler import SamplerSettings


def fmt_bytes(n: float) -> str:
    """A byte count in decimal units: 512 B, 1.50 KB, 2.00 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


# ---- diffgemma info -----------------------------------------------------------------------------------------


def _legacy_imatrix(p: pathlib.Path) -> bool:
    """Whether `p` is llama.cpp's legacy .dat importance matrix (not a GGUF)."""
    if p.suffix.lower() != ".dat" or not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) != b"GGUF"


def _is_imatrix(gf: GGUFFile) -> bool:
    return gf.metadata.get(imatrix_file.KEY_TYPE) == "imatrix"


def imatrix_info(path: pathlib.Path) -> dict[str, Any]:
    """What `diffgemma info` says about an importance matrix: format, entries, chunks, datasets, coverage."""
    im = imatrix_file.load(path)
    experts = [e.coverage for e in im.entries.values() if e.n_mat > 1]
    return {"type": "imatrix", "format": im.format, "entries": len(im), "chunk_count": im.chunk_count,
            "chunk_size": im.chunk_size, "datasets": im.datasets, "expert_entries": len(experts),
            "expert_coverage_min": min(experts, default=None),
            "expert_coverage_mean": sum(experts) / len(experts) if experts else None,
            "size_bytes": path.stat().st_size}


def imatrix_text(path: pathlib.Path) -> str:
    """What `diffgemma info` prints for an importance matrix (diffgemma imatrix's, llama-imatrix's)."""
    d = imatrix_info(path)
    layout = "GGUF, llama.cpp's current layout" if d["format"] == "gguf" else "legacy .dat layout"
    coverage = (f"; {d['expert_entries']} with experts, coverage min {d['expert_coverage_min']:.1%}, mean "
                f"{d['expert_coverage_mean']:.1%}" if d["expert_entries"] else "")
    return "\n".join([
        f"file          {path}",
        f"type          importance matrix ({layout})",
        f"entries       {d['entries']} weights{coverage}",
        f"chunks        {d['chunk_count']} of {d['chunk_size']} tokens",
        f"datasets      {', '.join(d['datasets']) or '-'}",
        f"size          {fmt_bytes(d['size_bytes'])} ({d['size_bytes']:,} bytes)",
    ])


def _kind(path: str) -> tuple[str, pathlib.Path, Any]:
    """("imatrix" | "mmproj" | "model", the file, its GGUFFile or None for a legacy .dat imatrix)."""
    p = resolve(path)
    if _legacy_imatrix(p):
        return "imatrix", p, None
    gf = gguf_file.read(p)
    if _is_imatrix(gf):
        return "imatrix", p, gf
    return ("mmproj" if gf.metadata.get("general.architecture") == "clip" else "model"), p, gf


def info_text(path: str) -> str:
    """What `diffgemma info FILE` prints: architecture, hyper-parameters, sampler defaults, census, size (or,
    for an mmproj file, mmproj_text; for an importance matrix, imatrix_text)."""
    kind, p, gf = _kind(path)
    if kind != "model":
        return imatrix_text(p) if kind == "imatrix" else mmproj_text(gf)
    hp = gguf_file.validate(gf)
    md = gf.metadata
    sp = SamplerSettings.from_metadata(md)
    n_params = sum(math.prod(t.shape) for t in gf.tensors.values())
    data = sum(t.nbytes for t in gf.tensors.values())
    bpw = gguf_file.bits_per_weight((t.shape, t.type) for t in gf.tensors.values())
    lines = [
        f"file          {gf.path}",
        f"architecture  {md.get('general.architecture')}   name: {md.get('general.name', '-')}",
        f"tensors       {len(gf.tensors)}   parameters: "
        f"{f'{n_params / 1e9:.2f} B' if n_params >= 1e9 else f'{n_params / 1e6:.2f} M'}   "
        f"bits/weight: {bpw:.3f}",
        f"census        {gguf_file.census(t.type_name for t in gf.tensors.values())}",
        f"size          {fmt_bytes(gf.file_size)} ({gf.file_size:,} bytes; tensor data {data:,})",
        "hyper-parameters",
        f"  layers {hp.n_layer} ({hp.n_global} global, {hp.n_layer - hp.n_global} sliding, window "
        f"{hp.sliding_window})   n_embd {hp.n_embd}   vocab {hp.n_vocab}",
        f"  heads {hp.n_head}   kv heads sliding/global {hp.n_head_kv[0]}/{min(hp.n_head_kv)}   head dim "
        f"sliding/global {hp.head_dim_swa}/{hp.head_dim}",
        f"  experts {hp.n_expert} (top {hp.n_expert_used}, width {hp.n_ff_exp})   dense/self-cond MLP {hp.n_ff}",
        f"  rope base sliding/global {hp.rope_base_swa:g}/{hp.rope_base:g}   softcap {hp.softcap:g}   "
        f"rms eps {hp.rms_eps:g}   context {hp.context_length}",
        *_kv_lines(hp, data),
        "sampler defaults (diffusion.*)",
        f"  canvas {hp.canvas_length}   steps {sp.steps}   t {sp.t_max:g} -> {sp.t_min:g}   entropy bound "
        f"{sp.entropy_bound:g}   stability {sp.stability}   confidence {sp.confidence:g}",
    ]
    return "\n".join(lines)


def _kv_lines(hp: HParams, weight_bytes: int) -> list[str]:
    """The prompt-KV store (F16, CPU) of this file and the longest context that fits next to its weights in the
    memory free now."""
    room = max(N_BATCH, hp.canvas_length)
    budget = kv.host_available() - weight_bytes - kv.RESERVE_BYTES
    n = kv.max_context(hp, kv.F16, room, budget)
    return [f"prompt-KV     {kv.bytes_per_token(hp, kv.F16):,} bytes per committed token (f16) + "
            f"{fmt_bytes(kv.ring_bytes(hp, kv.F16, room))} sliding-window ring; max context on this machine "
            f"{n:,} tokens ({fmt_bytes(kv.store_bytes(hp, kv.F16, n, room))} store, CPU)"]


def mmproj_text(gf: GGUFFile) -> str:
    """What `diffgemma info` prints for a gemma4v mmproj file."""
    hp = mmproj.validate(gf)
    d = mmproj.describe(gf, hp)
    return "\n".join([
        f"file          {gf.path}",
        f"architecture  clip (mmproj, projector {d['projector']})   name: {gf.metadata.get('general.name', '-')}",
        f"tensors       {len(gf.tensors)}   parameters: {d['parameters'] / 1e6:.2f} M",
        f"census        {d['tensors']}",
        f"size          {fmt_bytes(gf.file_size)} ({gf.file_size:,} bytes)",
        "vision tower",
        f"  width {d['width']}   layers {d['layers']}   heads {d['heads']} x {d['head_dim']}   MLP {d['ffn']}",
        f"  patch {d['patch_size']} px   pooling {d['pooling']}x{d['pooling']}   projects to text width "
        f"{d['text_width']}",
        f"  clipped linears {'yes' if d['clipped_linears'] else 'no'}   standardize "
        f"{'yes' if d['standardize'] else 'no'}   image block bidirectional {'yes' if hp.bidirectional else 'no'}",
    ])


def info_json(path: str) -> dict[str, Any]:
    """What `diffgemma info FILE --json` prints: hyper-parameters, sampler defaults, census and size (or an
    mmproj file's or an importance matrix's description)."""
    kind, p, gf = _kind(path)
    if kind != "model":
        return imatrix_info(p) if kind == "imatrix" else mmproj.describe(gf, mmproj.validate(gf))
    hp = gguf_file.validate(gf)
    return {"hparams": dataclasses.asdict(hp),
            "sampler": dataclasses.asdict(SamplerSettings.from_metadata(gf.metadata)),
            "census": gguf_file.census(t.type_name for t in gf.tensors.values()),
            "tensors": len(gf.tensors), "size_bytes": gf.file_size}


# ---- generation --------------------------------------------------------------------------------------------


def stats(g: Generation) -> str:
    """The line after a generation on a terminal: tokens, canvases, steps, prefill, speed and seed."""
    steps = ", ".join(str(c.steps) for c in g.canvases)
    t = g.timings
    return (f"[{len(g.tokens)} tokens in {len(g.canvases)} canvas(es); steps per canvas: {steps}; prefill "
            f"{t.prefill_ms:.1f} ms; {t.step_ms:.2f} ms/step; {t.tokens_per_s:.1f} tokens/s; seed {g.seed}]")


class PrefillBar:
    """A progress bar over the prompt's encoding, on a terminal and only for prompts of several chunks."""

    def __init__(self, n_batch: int):
        self.n_batch, self.bar = n_batch, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and total > self.n_batch and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="prefill", leave=False, file=sys.stderr)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            if done >= total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LiveCanvas:
    """Repaints the current argmax canvas in place (synchronized terminal update) after every step."""

    def __init__(self, out: Any = None):
        self.out = out or sys.stdout
        self.lines = 0

    def show(self, ev: StepEvent | CanvasEvent) -> None:
        if not isinstance(ev, StepEvent):
            return  # the canvas stays on screen until the next one's first step repaints it
        width = shutil.get_terminal_size((100, 20)).columns
        text = ev.text.replace("\n", "\u21b5 ")
        status = (f"canvas {ev.canvas_index + 1}  step {ev.step}/{ev.steps}  T={ev.temperature:.3f}  "
                  f"accepted {ev.accepted:3d}  mean entropy {ev.mean_entropy:.4f}")
        body = [status[:width - 1]]  # a wrapped line would scroll: the repaint moves up by lines written
        body += textwrap.wrap(text, width - 1) or [""]
        seq = "\x1b[?2026h" + (f"\x1b[{self.lines}F" if self.lines else "") + "\x1b[J" + "\n".join(body) + "\n"
        self.out.write(seq + "\x1b[?2026l")
        self.out.flush()
        self.lines = len(body)

    def clear(self) -> None:
        if self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")
            self.out.flush()
            self.lines = 0


class StepBar:
    """A tqdm bar over the canvases of one generation, its postfix updated after every step (stderr)."""

    def __init__(self, n_canvas: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=n_canvas, unit="canvas", desc="denoising", leave=False, file=sys.stderr)

    def show(self, ev: StepEvent | CanvasEvent) -> None:
        if isinstance(ev, StepEvent):
            self.bar.set_postfix_str(f"canvas {ev.canvas_index + 1} step {ev.step}/{ev.steps} "
                                     f"H={ev.mean_entropy:.3f}")
        else:  # a canvas committed
            self.bar.update(1)

    def clear(self) -> None:
        self.bar.close()


def live_display(visual: bool, n_canvas: int) -> LiveCanvas | StepBar | None:
    """--visual on a terminal: the repainted canvas; else a progress bar on a terminal; nothing in a pipe."""
    if visual and sys.stdout.isatty():
        return LiveCanvas()
    if sys.stderr.isatty():
        return StepBar(n_canvas)
    return None
