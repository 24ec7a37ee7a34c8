"""The `diffgemma` command line: generate | chat | quantize | imatrix | convert | info | bench | serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import textwrap
from typing import Any

from . import outputs
from .errors import Error
from .generation import CanvasEvent, Generation, StepEvent


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def info_text(path: str) -> str:
    """What `diffgemma info FILE` prints: architecture, hyper-parameters, sampler defaults, census, size."""
    from . import gguf_file
    from .model import resolve
    from .sampler import SamplerSettings

    gf = gguf_file.read(resolve(path))
    if gf.metadata.get("general.architecture") == "clip":
        return mmproj_text(gf)
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
        f"size          {_fmt_bytes(gf.file_size)} ({gf.file_size:,} bytes; tensor data {data:,})",
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


def _kv_lines(hp: Any, weight_bytes: int) -> list[str]:
    """The prompt-KV store (F16, CPU) of this file and the longest context that fits next to its weights in the
    memory free now."""
    from . import kv
    from .model import N_BATCH

    room = max(N_BATCH, hp.canvas_length)
    budget = kv.host_available() - weight_bytes - kv.RESERVE_BYTES
    n = kv.max_context(hp, kv.F16, room, budget)
    return [f"prompt-KV     {kv.bytes_per_token(hp, kv.F16):,} bytes per committed token (f16) + "
            f"{_fmt_bytes(kv.ring_bytes(hp, kv.F16, room))} sliding-window ring; max context on this machine "
            f"{n:,} tokens ({_fmt_bytes(kv.store_bytes(hp, kv.F16, n, room))} store, CPU)"]


def mmproj_text(gf: Any) -> str:
    """What `diffgemma info` prints for a gemma4v mmproj file."""
    from . import mmproj

    hp = mmproj.validate(gf)
    d = mmproj.describe(gf, hp)
    return "\n".join([
        f"file          {gf.path}",
        f"architecture  clip (mmproj, projector {d['projector']})   name: {gf.metadata.get('general.name', '-')}",
        f"tensors       {len(gf.tensors)}   parameters: {d['parameters'] / 1e6:.2f} M",
        f"census        {d['tensors']}",
        f"size          {_fmt_bytes(gf.file_size)} ({gf.file_size:,} bytes)",
        "vision tower",
        f"  width {d['width']}   layers {d['layers']}   heads {d['heads']} x {d['head_dim']}   MLP {d['ffn']}",
        f"  patch {d['patch_size']} px   pooling {d['pooling']}x{d['pooling']}   projects to text width "
        f"{d['text_width']}",
        f"  clipped linears {'yes' if d['clipped_linears'] else 'no'}   standardize "
        f"{'yes' if d['standardize'] else 'no'}   image block bidirectional {'yes' if hp.bidirectional else 'no'}",
    ])


def _list_devices(a: argparse.Namespace) -> None:
    from . import binding, devices

    print("\n".join(devices.backends_text(devices.local() + devices.remote(getattr(a, "rpc", None)))))
    print(f"ggml {binding.cstr(binding.lib.ggml_version())}, llama-cpp-python {binding.llama_cpp_python_version()}")


def _cmd_info(a: argparse.Namespace) -> int:
    if a.devices:
        _list_devices(a)
        if not a.file:
            return 0
    if not a.file:
        raise Error("info needs a FILE (or --devices)")
    if a.json:
        from . import gguf_file
        from .model import resolve

        gf = gguf_file.read(resolve(a.file))
        if gf.metadata.get("general.architecture") == "clip":
            from . import mmproj

            print(json.dumps(mmproj.describe(gf, mmproj.validate(gf)), indent=1))
            return 0
        hp = gguf_file.validate(gf)
        from .sampler import SamplerSettings

        print(json.dumps({"hparams": dataclasses.asdict(hp),
                          "sampler": dataclasses.asdict(SamplerSettings.from_metadata(gf.metadata)),
                          "census": gguf_file.census(t.type_name for t in gf.tensors.values()),
                          "tensors": len(gf.tensors), "size_bytes": gf.file_size}, indent=1))
    else:
        print(info_text(a.file))
    return 0


def _model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("-m", "--model", default="tiny",
                   help="GGUF file (default: \"tiny\", the embedded Shakespeare model)")
    s.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="-1 all layers on the GPU, 0 CPU only")
    s.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    s.add_argument("-c", "--n-ctx", type=int, default=None,
                   help="most prompt + generated tokens (default: the file's context length, as memory allows)")
    s.add_argument("-b", "--n-batch", type=int, default=512, help="prompt tokens encoded per graph (default 512)")
    s.add_argument("--kv-type", choices=("f16", "f32"), default="f16", help="prompt-KV store type (default f16)")
    s.add_argument("-v", "--verbose", action="store_true", help="show ggml/libllama logs")
    s.add_argument("--mmproj", default=None, help="gemma4v mmproj GGUF with the vision tower (for images)")
    _device_args(s)


def _device_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("-dev", "--device", default=None, metavar="DEV1,DEV2",
                   help="devices for the offloaded layers (Vulkan0, CUDA0,CUDA1, RPC0; 'none': CPU only; default: "
                        "every GPU)")
    s.add_argument("-ts", "--tensor-split", default=None, metavar="N0,N1",
                   help="share of the offloaded layers per device, e.g. 3,1 (default: by free memory)")
    s.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="ggml RPC servers whose devices join (see `diffgemma rpc-server`)")
    s.add_argument("--list-devices", action="store_true", help="list the devices (with --rpc, theirs too) and exit")


def _image_budget_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--image-budget", type=int, default=280, help="soft tokens per image: 70, 140, 280, 560, 1120")


def _sampler_args(s: argparse.ArgumentParser) -> None:
    from .sampler import SamplerSettings

    s.add_argument("-n", "--max-new-tokens", type=int, default=256, help="rounded up to whole canvases")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default or -1: a random one, reported)")
    for f in dataclasses.fields(SamplerSettings):  # --steps, --t-min, ...: one flag per setting
        s.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"{f.metadata['help']} (default: from the file)")


def _sampler_kw(a: argparse.Namespace) -> dict:
    from .sampler import SamplerSettings

    # A flag left out takes the file's value (so the command line cannot switch the adaptive stop off).
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(SamplerSettings)}
    return {"max_new_tokens": a.max_new_tokens, "seed": a.seed, **{k: v for k, v in given.items() if v is not None}}


def _load(a: argparse.Namespace) -> Any:
    from .model import load

    return load(a.model, n_gpu_layers=a.n_gpu_layers, threads=a.threads, verbose=a.verbose, n_ctx=a.n_ctx,
                n_batch=a.n_batch, kv_type=a.kv_type, mmproj=getattr(a, "mmproj", None), device=a.device,
                tensor_split=a.tensor_split, rpc=a.rpc)


class _PrefillBar:
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


def _image_message(text: str, images: list[str]) -> list[dict]:
    """One user message holding `images` (paths) and then `text`."""
    parts: list[dict] = [{"type": "image", "image": p} for p in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class _LiveCanvas:
    """Repaints the current argmax canvas in place (synchronized terminal update) after every step."""

    def __init__(self, out: Any = None):
        self.out = out or sys.stdout
        self.lines = 0

    def show(self, ev: StepEvent | CanvasEvent) -> None:
        if not isinstance(ev, StepEvent):
            return  # the canvas stays on screen until the next one's first step repaints it
        width = shutil.get_terminal_size((100, 20)).columns
        text = ev.text.replace("\n", "\u21b5 ")
        body = [f"canvas {ev.canvas_index + 1}  step {ev.step}/{ev.steps}  T={ev.temperature:.3f}  "
                f"accepted {ev.accepted:3d}  mean entropy {ev.mean_entropy:.4f}"]
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


class _StepBar:
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


def _live_display(a: argparse.Namespace, m: Any, n_canvas: int | None = None) -> _LiveCanvas | _StepBar | None:
    """--visual on a terminal: the repainted canvas; else a progress bar on a terminal; nothing in a pipe."""
    if a.visual and sys.stdout.isatty():
        return _LiveCanvas()
    if sys.stderr.isatty():
        return _StepBar(n_canvas or -(-a.max_new_tokens // m.hparams.canvas_length))
    return None


def _generate_live(m: Any, prompt: Any, a: argparse.Namespace, live: _LiveCanvas | _StepBar | None,
                   **kw: Any) -> Generation:
    """m.stream(prompt) with the command line's settings, every event shown on `live`, the prompt's encoding
    on a progress bar; both are cleared however it ends (Ctrl-C closes the stream)."""
    prefill = _PrefillBar(m.n_batch)
    try:
        with m.stream(prompt, on_prefill=prefill, image_budget=a.image_budget, **kw, **_sampler_kw(a)) as s:
            for ev in s:
                if live is not None:
                    live.show(ev)
    finally:
        prefill.close()
        if live is not None:
            live.clear()
    assert s.generation is not None
    return s.generation


def _stats(g: Any) -> str:
    steps = ", ".join(str(c.steps) for c in g.canvases)
    t = g.timings
    return (f"[{len(g.tokens)} tokens in {len(g.canvases)} canvas(es); steps per canvas: {steps}; prefill "
            f"{t.prefill_ms:.1f} ms; {t.step_ms:.2f} ms/step; {t.tokens_per_s:.1f} tokens/s; seed {g.seed}]")


def _read_template(path: str) -> str:
    """The text of a --template FILE ('-': standard input)."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise Error(f"cannot read the template {path}: {e}") from e


def _cmd_generate(a: argparse.Namespace) -> int:
    prompt = a.prompt if a.prompt is not None else a.text
    text = None if a.template is None else _read_template(a.template)
    if prompt is None and text is None:
        raise Error("give a prompt: diffgemma generate -p TEXT (or a positional TEXT, or --template FILE)")
    if a.image and a.no_chat:
        raise Error("--image needs the chat template (drop --no-chat)")
    if a.image and not a.mmproj:
        raise Error("--image needs --mmproj FILE (the vision tower)")
    m = _load(a)
    if a.image:
        prompt = _image_message(prompt, a.image)
    layout = None
    if text is not None:
        from .template import lay_out

        layout = lay_out(m, text)  # bad templates fail here, before any denoising
    live = _live_display(a, m, None if layout is None else layout.n_canvas)
    g = _generate_live(m, prompt, a, live, chat=False if a.no_chat else None, template=layout)
    if a.json:
        out = {"text": g.text, "tokens": g.tokens, "seed": g.seed,
               "canvases": [dataclasses.asdict(c) for c in g.canvases], "timings": dataclasses.asdict(g.timings)}
        if layout is not None:
            out["holes"] = g.holes
        print(json.dumps(out))
        return 0
    print(g.text)
    if sys.stdout.isatty() or a.stats:
        print(_stats(g), file=sys.stderr)
    return 0


def _read_tools(path: str) -> list[dict]:
    """--tools FILE.json: a list of OpenAI function tools, or {"tools": [...]}."""
    from .chat_format import check_tools

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise Error(f"--tools: cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise Error(f"--tools: {path} is not valid JSON: {e}") from e
    tools = data.get("tools") if isinstance(data, dict) else data
    try:
        return check_tools(tools)
    except Error as e:
        raise Error(f"--tools: {path}: {e}") from e


def _tool_turn(m: Any, messages: list[dict], tools: list[dict], a: argparse.Namespace) -> None:
    """One assistant turn with tools: print thinking, content and calls; the user types each call's result,
    and the model goes on until it answers without a call."""
    while True:
        r = m.chat(messages, tools=tools, **_sampler_kw(a))
        if r.reasoning:
            print(f"[thinking] {r.reasoning}", file=sys.stderr)
        if r.content:
            print(r.content)
        messages.append(r.to_message())
        if not r.tool_calls:
            return
        for c in r.tool_calls:
            print(f"[tool call {c.id}] {c.name}({json.dumps(c.arguments, ensure_ascii=False)})")
            try:
                result = input(f"result of {c.name}> ")
            except EOFError:
                result = ""
            messages.append({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": result})


_CHAT_HELP = ("/image FILE attaches a picture to the next message, /clear forgets the conversation, /exit quits, "
              "/help shows this")


def _cmd_chat(a: argparse.Namespace) -> int:
    tools = _read_tools(a.tools) if a.tools else None
    m = _load(a)
    messages: list[dict] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print(f"diffgemma chat: {_CHAT_HELP}; Ctrl-C cancels a reply", file=sys.stderr)
    pending: list[str] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/clear":
            messages = messages[:1] if a.system else []
            print("(cleared)", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(_CHAT_HELP, file=sys.stderr)
            continue
        if cmd.startswith("/image"):
            path = cmd[len("/image"):].strip()
            if m.vision is None:
                print("(no vision tower: start chat with --mmproj FILE)", file=sys.stderr)
            elif not path:
                print("(usage: /image FILE)", file=sys.stderr)
            else:
                try:
                    m.image_embeddings(path, image_budget=a.image_budget)  # check it now, not after typing
                    pending.append(path)
                    print(f"(attached {path})", file=sys.stderr)
                except Error as e:
                    print(f"(cannot use {path}: {e})", file=sys.stderr)
            continue
        if cmd.startswith("/") and " " not in cmd:
            print(f"unknown command {cmd}; {_CHAT_HELP}", file=sys.stderr)
            continue
        if not cmd:
            continue
        n_before = len(messages)
        messages += _image_message(line, pending) if pending else [{"role": "user", "content": line}]
        pending = []
        try:
            if tools:
                _tool_turn(m, messages, tools, a)
                continue
            g = _generate_live(m, messages, a, _live_display(a, m))
        except KeyboardInterrupt:  # cancels this reply, not the chat
            del messages[n_before:]
            m.reset()  # Ctrl-C may have come inside an encode: start the prompt-KV store clean next turn
            print("\n(reply cancelled)", file=sys.stderr)
            continue
        print(g.text.strip())
        if sys.stdout.isatty():
            print(_stats(g), file=sys.stderr)
        messages.append({"role": "assistant", "content": g.text.strip()})


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench

    r = bench(a.model, prompt_tokens=a.prompt_tokens, steps=a.steps, n_gpu_layers=a.n_gpu_layers, threads=a.threads,
              compare=a.compare, hf_dtype=a.hf_dtype, device=a.device, tensor_split=a.tensor_split, rpc=a.rpc)
    if a.json:
        print(json.dumps({"file": r.file, "devices": r.devices, "ours": r.ours, "transformers": r.transformers,
                          "ratio": r.ratio}, indent=1))
    else:
        print(r.table())
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from .bench import validate

    md = validate(a.file, a.against, out=a.out, max_new_tokens=a.max_new_tokens, seed=a.seed,
                  n_gpu_layers=a.n_gpu_layers, progress=sys.stderr.isatty(), overwrite=a.force)
    if not a.out:
        print(md)
    else:
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def _tensor_type_arg(v: str) -> list[tuple[str, str]]:
    """--tensor-type PATTERN=TYPE as llama-quantize reads it: split at the first '=', pattern lowercased."""
    pat, sep, ty = v.partition("=")
    if not sep or not pat or not ty:
        raise argparse.ArgumentTypeError(f"expected PATTERN=TYPE, got {v!r}")
    return [(pat.lower(), ty)]


def _tensor_type_file_arg(path: str) -> list[tuple[str, str]]:
    """--tensor-type-file: PATTERN=TYPE entries separated by spaces or newlines."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None
    return [x for tok in text.split() for x in _tensor_type_arg(tok)]


def _override_arg(v: str) -> list[tuple[str, str]]:
    rx, sep, ty = v.rpartition("=")
    if not sep or not rx:
        raise argparse.ArgumentTypeError(f"expected REGEX=TYPE, got {v!r}")
    return [(rx, ty)]


def _prune_arg(v: str) -> list[int]:
    try:
        ids = [int(x) for x in v.split(",")]
    except ValueError:
        ids = [-1]
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {v!r}")
    return sorted(set(ids))


def _quantize_positionals(a: argparse.Namespace) -> tuple[str, pathlib.Path, str | None, int | None]:
    """SRC DST, SRC DST TYPE [NTHREADS] or SRC TYPE [NTHREADS]: llama-quantize's orders (with only TYPE the
    output is ggml-model-TYPE.gguf next to SRC, as llama-quantize names it)."""
    from .quantizer import find_recipe

    if not a.args:
        raise Error("quantize needs SRC and DST (or --list-recipes)")
    src, rest = a.args[0], list(a.args[1:])
    dst = recipe = threads = None
    if rest and find_recipe(rest[0]) is not None:
        recipe = rest.pop(0)
    elif rest:
        dst = rest.pop(0)
        if rest and not ((a.recipe or a.type) and rest[0].isdigit()):  # with --recipe a number is NTHREADS
            recipe = rest.pop(0)
            if find_recipe(recipe) is None:
                raise Error(f"unknown file type {recipe!r}; see `diffgemma quantize --list-recipes`")
    if rest:
        if len(rest) > 1 or not rest[0].isdigit() or int(rest[0]) < 1:
            raise Error(f"unexpected {' '.join(rest)!r}: the order is SRC [DST] TYPE [NTHREADS]")
        threads = int(rest[0])
    if recipe is not None and (a.recipe or a.type):
        raise Error(f"the file type is given twice: {recipe!r} and --recipe/--type")
    if dst is None:
        if recipe is None:
            raise Error("quantize needs SRC and DST (or SRC TYPE)")
        dst = pathlib.Path(src).parent / f"ggml-model-{find_recipe(recipe).name}.gguf"
    return src, pathlib.Path(dst), recipe, threads


def _cmd_quantize(a: argparse.Namespace) -> int:
    from . import quantizer as _q
    from .model import resolve

    if a.list_recipes:
        for name, desc in _q.recipes().items():
            print(f"{name}\n    {desc}")
        return 0
    src, dst, recipe, threads = _quantize_positionals(a)
    if threads is not None and a.threads is not None:
        raise Error("NTHREADS is given twice: positional and --threads")
    rep = _q.quantize(resolve(src), dst, recipe=recipe or a.recipe, type=a.type, imatrix=a.imatrix,
                      overrides=a.overrides or None, token_embedding_type=a.token_embedding_type,
                      output_tensor_type=a.output_tensor_type, pure=a.pure,
                      leave_output_tensor=a.leave_output_tensor, include_weights=a.include_weights,
                      exclude_weights=a.exclude_weights, prune_layers=a.prune_layers, override_kv=a.override_kv,
                      allow_requantize=not a.no_requantize, threads=threads or a.threads, dry_run=a.dry_run,
                      progress=sys.stderr.isatty(), overwrite=a.force)
    print(rep.summary())
    return 0


def _cmd_imatrix(a: argparse.Namespace) -> int:
    import pathlib

    from .calibration import imatrix

    calibration = pathlib.Path(a.file) if a.file is not None else a.text  # -f is always a path, --text the text
    rep = imatrix(a.model, calibration, a.out, chunks=a.chunks, mode=a.mode, n_gpu_layers=a.n_gpu_layers,
                  format=a.format, progress=sys.stderr.isatty(), chunk_size=a.chunk_size, seed=a.seed,
                  save_every=a.save_every, overwrite=a.force)
    print(rep.summary())
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from .converter import convert

    out = convert(a.hf_dir, a.out, outtype=a.outtype, progress=sys.stderr.isatty(), mmproj=a.mmproj,
                  overwrite=a.force)
    print(out)
    if a.mmproj:
        print(a.mmproj)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from .server import Server

    if a.queue_size < 0:
        raise Error(f"--queue-size must be >= 0, got {a.queue_size}")
    if a.max_batch < 1:
        raise Error(f"--max-batch must be >= 1, got {a.max_batch}")
    m = _load(a)
    try:
        srv = Server(m, host=a.host, port=a.port, queue_size=a.queue_size, model_name=a.alias,
                     shutdown_timeout=a.shutdown_timeout, reasoning_format=a.reasoning_format, max_batch=a.max_batch)
        print(f"diffgemma: serving {a.alias or m.path.stem} at {srv.url}/ (web view), OpenAI API at {srv.url}/v1",
              file=sys.stderr, flush=True)
        srv.run()
    finally:
        m.close()
    return 0


def _cmd_rpc_server(a: argparse.Namespace) -> int:
    from .devices import serve_rpc

    serve_rpc(a.host, a.port, a.threads, a.device, a.cache)
    return 0


def _add_serve_parser(sub: Any) -> None:
    from .server import MAX_BATCH, REASONING_FORMATS

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with live canvas streaming and a web view")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    s.add_argument("--max-batch", "-np", "--parallel", type=int, default=MAX_BATCH,
                   help=f"most requests whose canvases share each denoising step (default {MAX_BATCH}; "
                   "docs/performance.md); the others wait and join between steps")
    s.add_argument("--queue-size", type=int, default=16,
                   help="most requests waiting behind the running ones; more get 503 (default 16)")
    s.add_argument("--alias", default=None, help="model id reported by /v1/models (default: the file name)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let open responses finish on Ctrl-C/SIGTERM (default 10)")
    s.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="auto",
                   help="auto: the thinking channel goes to reasoning_content; none: it stays in the content")
    s.set_defaults(fn=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffgemma", description="DiffusionGemma on ggml: generate, quantize, "
                                "calibrate and inspect block-diffusion models.")
    from . import __version__
    from .converter import OUTTYPES

    p.add_argument("--version", action="version", version=f"diffgemma {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="describe a diffusion-gemma GGUF file, or list devices")
    s.add_argument("file", nargs="?", help='a GGUF file, or "tiny" for the embedded model')
    s.add_argument("--devices", action="store_true", help="list the ggml devices (CPU, CUDA0, ...) and their memory")
    s.add_argument("--rpc", default=None, metavar="HOST:PORT,...", help="with --devices: also these RPC servers'")
    s.add_argument("--json", action="store_true", help="hyper-parameters, census and size as JSON")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("generate", help="generate text by block diffusion")
    s.add_argument("text", nargs="?", help="the prompt (or -p)")
    s.add_argument("-p", "--prompt", default=None, help="the prompt (instead of the positional TEXT)")
    _model_args(s)
    _image_budget_arg(s)
    _sampler_args(s)
    s.add_argument("--no-chat", action="store_true", help="do not apply the file's chat template")
    s.add_argument("--template", metavar="FILE", default=None,
                   help="fill the holes of the template in FILE ('-': stdin; syntax in docs/templates.md); the "
                        "prompt is then optional and -n is ignored")
    s.add_argument("--visual", action="store_true", help="watch the canvas denoise (on a terminal)")
    s.add_argument("--stats", action="store_true", help="print timing stats even when not on a terminal")
    s.add_argument("--json", action="store_true", help="text, tokens, seed, canvases and timings as JSON")
    s.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="a picture for the prompt (repeatable; needs --mmproj)")
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("chat", help="multi-turn chat in the terminal (/clear, /exit)")
    _model_args(s)
    _image_budget_arg(s)
    _sampler_args(s)
    s.add_argument("--system", default=None, help="a system message")
    s.add_argument("--tools", default=None, metavar="FILE.json",
                   help="OpenAI function tools the model may call; you type each call's result")
    s.add_argument("--visual", action="store_true", help="watch each reply's canvas denoise (on a terminal)")
    s.set_defaults(fn=_cmd_chat)

    _add_serve_parser(sub)

    s = sub.add_parser("bench", help="prefill and per-step latency, optionally against transformers")
    _model_args(s)
    _image_budget_arg(s)
    s.add_argument("--prompt-tokens", type=int, default=128, help="random prompt tokens prefilled (default 128)")
    s.add_argument("--steps", type=int, default=16, help="denoising steps timed (fixed, no early stop)")
    s.add_argument("--compare", choices=["transformers"], default=None,
                   help="also time transformers on the same weights, in this process")
    s.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="transformers' compute type for --compare (default float32)")
    s.add_argument("--json", action="store_true", help="the measurements as JSON")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("validate", help="the five-prompt validation protocol, side by side for two files")
    s.add_argument("file", help='a GGUF file, or "tiny"')
    s.add_argument("--against", default=None, help="a second file to compare with")
    s.add_argument("-o", "--out", default=None, help="write the Markdown report here")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.add_argument("-n", "--max-new-tokens", type=int, default=None, help="default: one canvas")
    s.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every prompt (default 0)")
    s.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="-1 all layers on the GPU, 0 CPU only")
    s.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("quantize", help="quantize a diffusion-gemma GGUF as llama-quantize would (Q4_K_M, ...)",
                       description="Quantize with a llama-quantize file type (Q4_K_M, IQ2_S, ... as llama.cpp "
                       "chooses per tensor), asym-2bitexp, or one type. Positional orders: SRC DST TYPE [NTHREADS], "
                       "SRC TYPE [NTHREADS] (writes ggml-model-TYPE.gguf next to SRC), or SRC DST --recipe/--type.")
    s.add_argument("args", nargs="*", metavar="SRC [DST] [TYPE] [NTHREADS]",
                   help='SRC (a GGUF, or "tiny"), DST, a file type and threads, in llama-quantize\'s orders')
    g = s.add_mutually_exclusive_group()
    g.add_argument("--recipe", default=None, help="a recipe, e.g. Q4_K_M or asym-2bitexp (see --list-recipes)")
    g.add_argument("--type", default=None, help="one type for every quantizable tensor, e.g. q8_0")
    s.add_argument("--imatrix", default=None, help="importance matrix (GGUF or legacy .dat)")
    s.add_argument("--tensor-type", dest="overrides", action="extend", type=_tensor_type_arg, metavar="PATTERN=TYPE",
                   help="quantize tensors whose name matches PATTERN (a regex, lowercased) to TYPE (repeatable)")
    s.add_argument("--tensor-type-file", dest="overrides", action="extend", type=_tensor_type_file_arg,
                   metavar="FILE", help="PATTERN=TYPE entries separated by spaces or newlines")
    s.add_argument("--override", dest="overrides", action="extend", type=_override_arg, metavar="REGEX=TYPE",
                   help="like --tensor-type, the regex taken as written (repeatable)")
    s.add_argument("--token-embedding-type", default=None, metavar="TYPE", help="type of token_embd")
    s.add_argument("--output-tensor-type", default=None, metavar="TYPE",
                   help="type of the output head (token_embd: tied), through the file type's rules")
    s.add_argument("--pure", action="store_true", help="no mixture: every tensor gets the file type's type")
    s.add_argument("--leave-output-tensor", action="store_true",
                   help="keep output.weight (there is none: the head is tied to token_embd)")
    s.add_argument("--include-weights", action="append", metavar="NAME", help="use imatrix entries containing NAME")
    s.add_argument("--exclude-weights", action="append", metavar="NAME", help="drop imatrix entries containing NAME")
    s.add_argument("--prune-layers", type=_prune_arg, default=None, metavar="L0,L1,...",
                   help="remove these blocks and renumber the rest")
    s.add_argument("--override-kv", action="append", metavar="KEY=TYPE:VALUE",
                   help="set metadata (TYPE int, float, bool or str; repeatable)")
    s.add_argument("--allow-requantize", action="store_true", help="requantize quantized tensors (the default here)")
    s.add_argument("--no-requantize", action="store_true", help="refuse to requantize already quantized tensors")
    s.add_argument("--dry-run", action="store_true", help="report types, census and size without writing")
    s.add_argument("--force", action="store_true", help="replace an existing DST")
    s.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default: all usable cores)")
    s.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("imatrix", help="collect an importance matrix through the diffusion graph")
    s.add_argument("-m", "--model", default="tiny",
                   help='GGUF file (default: "tiny", the embedded Shakespeare model)')
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--file", default=None, help="calibration text file (must exist)")
    src.add_argument("--text", default=None, help="calibration text given on the command line")
    s.add_argument("-o", "--out", required=True, help=".gguf (llama.cpp's current format) or .dat (legacy)")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.add_argument("--mode", choices=["denoise", "unified"], default="denoise",
                   help="denoise: noisy canvases as in generation (default); unified: clean canvases, as "
                        "llama-imatrix")
    s.add_argument("--chunks", type=int, default=None, help="most chunks to process (default: all the text)")
    s.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: two canvases)")
    s.add_argument("--format", choices=["gguf", "dat"], default=None, help="default: from the --out suffix")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise levels and tokens (default 0; -1: random)")
    s.add_argument("--save-every", type=int, default=10, help="save the file every N chunks (0: only at the end)")
    s.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="-1 all layers on the GPU, 0 CPU only")
    s.set_defaults(fn=_cmd_imatrix)

    s = sub.add_parser("rpc-server", help="serve a local device to other machines' models (ggml's RPC server)",
                       description="Serve a device through ggml's RPC server; clients add it with --rpc HOST:PORT. "
                       "The protocol has no authentication or encryption: keep the default host 127.0.0.1, or "
                       "use a trusted network.")
    s.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    s.add_argument("-t", "--threads", type=int, default=None, help="CPU threads of a served CPU (default: all)")
    s.add_argument("-d", "--device", default=None, metavar="DEV1,DEV2",
                   help="devices to serve (default: the first GPU, else the CPU; 'cpu' for the CPU)")
    s.add_argument("-c", "--cache", default=None, metavar="DIR", help="cache received weights in DIR (ggml's -c)")
    s.set_defaults(fn=_cmd_rpc_server)

    s = sub.add_parser("convert", help="Hugging Face DiffusionGemma checkpoint -> GGUF")
    s.add_argument("hf_dir", help="a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    s.add_argument("out", help="the GGUF to write, or a directory (named after the checkpoint)")
    s.add_argument("--outtype", choices=list(OUTTYPES), default="bf16",
                   help="type of the matrices (default bf16; norms and the router stay f32)")
    s.add_argument("--mmproj", default=None, metavar="OUT", help="also write the vision tower (gemma4v mmproj)")
    s.add_argument("--force", action="store_true", help="replace an existing output (and --mmproj)")
    s.set_defaults(fn=_cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if getattr(a, "list_devices", False):
            _list_devices(a)
            return 0
        if a.cmd == "serve":  # the server handles SIGTERM itself (graceful shutdown)
            return int(a.fn(a) or 0)
        with outputs.sigterm_unwinds():  # SIGTERM cleans up like Ctrl-C (no temporary files left)
            return int(a.fn(a) or 0)
    except Error as e:
        print(f"diffgemma: error: {e.cli or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffgemma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `diffgemma info FILE | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
