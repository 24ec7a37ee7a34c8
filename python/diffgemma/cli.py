"""The `diffgemma` command line: info | generate | chat | serve | bench | validate | quantize | imatrix | convert.

Each subcommand is a pair: `_add_NAME(sub)` declares its flags, `_cmd_NAME(a)` runs it. Flags several commands
share (the model, devices, context, sampler) are declared once, in cli_flags, with llama.cpp's spellings as
aliases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from . import binding, devices, hub, outputs, quantizer, structured
from .bench import bench, validate
from .calibration import imatrix
from .chat_format import check_tools
from .checkpoint import OUTTYPES
from .cli_display import LiveCanvas, PrefillBar, StepBar, info_json, info_text, live_display, stats
from .cli_flags import (
    command,
    device_args,
    force_arg,
    gpu_layers_arg,
    hf_arg,
    hf_model,
    image_budget,
    image_budget_arg,
    model_arg,
    override_arg,
    prune_arg,
    quantize_positionals,
    runtime_args,
    sampler_args,
    sampler_kw,
    tensor_type_arg,
    tensor_type_file_arg,
    threads_arg,
)
from .converter import convert
from .errors import Error
from .generation import CanvasEvent, Generation
from .model import Model, load, resolve
from .template import lay_out
from .version import __version__

# ---- helpers of several commands -------------------------------------------------------------------------


def _load(a: argparse.Namespace) -> Model:
    return load(a.model, n_gpu_layers=a.n_gpu_layers, threads=a.threads, flash_attn=a.flash_attn,
                verbose=a.verbose, n_ctx=a.n_ctx, n_batch=a.n_batch, kv_type=a.kv_type, mmproj=a.mmproj,
                repack=a.repack, device=a.device, tensor_split=a.tensor_split, rpc=a.rpc)


def _read_text(path: str, what: str) -> str:
    """The text of a FILE flag ('-': standard input)."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise Error(f"cannot read the {what} {path}: {e}") from e


# ---- info ---------------------------------------------------------------------------------------------------


def _add_info(sub: Any) -> None:
    s = command(sub, "info", _cmd_info, help="describe a diffusion-gemma GGUF, mmproj or imatrix file, or list devices")
    s.add_argument("file", nargs="?", help='a GGUF (model, mmproj or imatrix) or legacy .dat imatrix file, or "tiny"')
    s.add_argument("--devices", action="store_true", help="list the ggml devices (CPU, CUDA0, ...) and their memory")
    s.add_argument("--rpc", default=None, metavar="HOST:PORT,...", help="with --devices: also these RPC servers'")
    s.add_argument("--json", action="store_true", help="hyper-parameters, census and size as JSON")
    hf_arg(s)


def _list_devices(a: argparse.Namespace) -> None:
    print("\n".join(devices.backends_text(devices.local() + devices.remote(getattr(a, "rpc", None)))))
    print(f"ggml {binding.cstr(binding.lib.ggml_version())}, llama-cpp-python {binding.llama_cpp_python_version()}")


def _cmd_info(a: argparse.Namespace) -> int:
    if a.devices:
        _list_devices(a)
        if not a.file:
            return 0
    if not a.file:
        raise Error("info needs a FILE (or --devices)")
    print(json.dumps(info_json(a.file), indent=1) if a.json else info_text(a.file))
    return 0


# ---- generate -----------------------------------------------------------------------------------------------


def _add_generate(sub: Any) -> None:
    s = command(sub, "generate", _cmd_generate, help="generate text by block diffusion")
    s.add_argument("text", nargs="?", help="the prompt ('-': read it from stdin; or -p TEXT, or -f FILE)")
    s.add_argument("-p", "--prompt", default=None, help="the prompt (instead of the positional TEXT)")
    s.add_argument("-f", "--file", default=None, metavar="FILE", help="read the prompt from FILE ('-': stdin)")
    runtime_args(s)
    image_budget_arg(s)
    sampler_args(s)
    s.add_argument("--no-chat", action="store_true", help="do not apply the file's chat template")
    s.add_argument("--template", metavar="FILE", default=None,
                   help="fill the holes of the template in FILE ('-': stdin; syntax in docs/templates.md); the "
                        "prompt is then optional and -n is ignored")
    s.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON that validates against the JSON Schema in FILE ('-': stdin; the supported "
                        "subset is in docs/structured.md); the prompt is then optional and -n is ignored")
    s.add_argument("--visual", action="store_true", help="watch the canvas denoise (on a terminal)")
    s.add_argument("--stats", action="store_true", help="print timing stats even when not on a terminal")
    s.add_argument("--json", action="store_true", help="text, tokens, seed, canvases and timings as JSON")
    s.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="a picture for the prompt (repeatable; needs --mmproj)")


def _prompt(a: argparse.Namespace) -> str | None:
    """generate's prompt: the positional TEXT ('-': standard input), -p TEXT or -f FILE, given at most once."""
    given = [flag for flag, v in (("TEXT", a.text), ("-p", a.prompt), ("-f", a.file)) if v is not None]
    if len(given) > 1:
        raise Error(f"the prompt is given twice ({' and '.join(given)}); give one of TEXT, -p TEXT or -f FILE")
    path = "-" if a.text == "-" else a.file
    if path == "-" and a.template == "-":
        raise Error("the prompt and --template cannot both come from standard input ('-')")
    return _read_text(path, "prompt file") if path is not None else a.prompt if a.prompt is not None else a.text


def _image_message(text: str, images: list[str]) -> list[dict]:
    """One user message holding `images` (paths) and then `text`."""
    parts: list[dict] = [{"type": "image", "image": p} for p in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _live(a: argparse.Namespace, m: Model, n_canvas: int | None = None) -> LiveCanvas | StepBar | None:
    return live_display(a.visual, n_canvas or -(-a.max_new_tokens // m.hparams.canvas_length))


def _generate_live(m: Model, prompt: Any, a: argparse.Namespace, live: LiveCanvas | StepBar | None,
                   on_text: Callable[[str], Any] | None = None, **kw: Any) -> Generation:
    """m.stream(prompt) with the command line's settings, every event shown on `live`, each committed canvas's
    text passed to `on_text`, the prompt's encoding on a progress bar; the displays are cleared however it ends
    (Ctrl-C closes the stream)."""
    prefill = PrefillBar(m.n_batch)
    try:
        with m.stream(prompt, on_prefill=prefill, image_budget=image_budget(a), **kw,
                      **sampler_kw(a)) as s:
            for ev in s:
                if live is not None:
                    live.show(ev)
                if on_text is not None and isinstance(ev, CanvasEvent):
                    on_text(ev.text_delta)
    finally:
        prefill.close()
        if live is not None:
            live.clear()
    assert s.generation is not None
    return s.generation


def _write_now(text: str) -> None:
    """Write `text` to stdout and flush it (a reader at the other end of a pipe gets it now)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _cmd_generate(a: argparse.Namespace) -> int:
    prompt = _prompt(a)
    text = None if a.template is None else _read_text(a.template, "template")
    schema = None if a.json_schema is None else _read_text(a.json_schema, "JSON schema")
    if text is not None and schema is not None:
        raise Error("give --template or --json-schema, not both")
    if prompt is None and text is None and schema is None:
        raise Error("give a prompt: diffgemma generate -p TEXT (or a positional TEXT, -f FILE, --template FILE or "
                    "--json-schema FILE)")
    if a.image and a.no_chat:
        raise Error("--image needs the chat template (drop --no-chat)")
    if a.image and not a.mmproj and not hub.is_hf(a.model):  # an -hf repository brings its mmproj
        raise Error("--image needs --mmproj FILE (the vision tower)")
    if a.image_budget is not None and not a.image:
        raise Error("--image-budget sets the soft tokens of each --image, and no --image is given")
    m = _load(a)
    if a.image:
        prompt = _image_message(prompt, a.image)
    layout = None if text is None else lay_out(m, text)  # bad templates fail here, before any denoising
    if schema is not None:
        layout = structured.lay_out(m, schema)  # an unsupported schema fails here, before any denoising
    live = _live(a, m, None if layout is None else layout.n_canvas)
    piped = not a.json and not sys.stdout.isatty()  # into a pipe or file: each canvas's text as it commits
    g = _generate_live(m, prompt, a, live, _write_now if piped else None, chat=False if a.no_chat else None,
                       template=layout)
    if a.json:
        out = {"text": g.text, "tokens": g.tokens, "seed": g.seed, "finish_reason": g.finish_reason,
               "canvases": [dataclasses.asdict(c) for c in g.canvases], "timings": dataclasses.asdict(g.timings)}
        if layout is not None:
            out["holes"] = g.holes
        if schema is not None:
            out["json"] = g.json
        print(json.dumps(out))
        if a.stats:
            print(stats(g), file=sys.stderr)
        return 0
    print("" if piped else g.text)  # piped: the text is out already, the line ends it
    if sys.stdout.isatty() or a.stats:
        print(stats(g), file=sys.stderr)
    return 0


# ---- chat ---------------------------------------------------------------------------------------------------

_CHAT_HELP = ("/image FILE attaches a picture to the next message, /clear forgets the conversation, /exit quits, "
              "/help shows this")


def _add_chat(sub: Any) -> None:
    s = command(sub, "chat", _cmd_chat, help="multi-turn chat in the terminal (/clear, /exit)")
    runtime_args(s)
    image_budget_arg(s)
    sampler_args(s)
    s.add_argument("-sys", "--system-prompt", "--system", dest="system", default=None, help="a system message")
    s.add_argument("--tools", default=None, metavar="FILE.json",
                   help="OpenAI function tools the model may call; you type each call's result")
    s.add_argument("--visual", action="store_true", help="watch each reply's canvas denoise (on a terminal)")


def _read_tools(path: str) -> list[dict]:
    """--tools FILE.json: a list of OpenAI function tools, or {"tools": [...]}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise Error(f"--tools: cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise Error(f"--tools: {path} is not valid JSON: {e}") from e
    tools = data.get("tools") if isinstance(data, dict) else data
    try:
        if not check_tools(tools):  # a file of something else (or of nothing) is a mistake, not "no tools"
            raise Error('no tools in it: give a list of OpenAI function tools, or {"tools": [...]}')
        return tools
    except Error as e:
        raise Error(f"--tools: {path}: {e}") from e


def _tool_turn(m: Model, messages: list[dict], tools: list[dict], a: argparse.Namespace) -> None:
    """One assistant turn with tools: print thinking, content and calls; the user types each call's result,
    and the model goes on until it answers without a call."""
    while True:
        r = m.chat(messages, tools=tools, **sampler_kw(a))
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


def _attach_image(m: Model, path: str, a: argparse.Namespace, pending: list[str]) -> None:
    """/image FILE: checked now (not after the next message is typed), then attached to the next message."""
    if m.vision is None:
        print("(no vision tower: start chat with --mmproj FILE)", file=sys.stderr)
    elif not path:
        print("(usage: /image FILE)", file=sys.stderr)
    else:
        try:
            m.image_embeddings(path, image_budget=image_budget(a))
            pending.append(path)
            print(f"(attached {path})", file=sys.stderr)
        except Error as e:
            print(f"(cannot use {path}: {e})", file=sys.stderr)


def _cmd_chat(a: argparse.Namespace) -> int:
    tools = _read_tools(a.tools) if a.tools else None
    if a.image_budget is not None and not a.mmproj and not hub.is_hf(a.model):
        raise Error("--image-budget sets the soft tokens of each /image, which needs --mmproj FILE (the vision "
                    "tower)")
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
            _attach_image(m, cmd[len("/image"):].strip(), a, pending)
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
            g = _generate_live(m, messages, a, _live(a, m))
        except KeyboardInterrupt:  # cancels this reply, not the chat
            del messages[n_before:]
            m.reset()  # Ctrl-C may have come inside an encode: start the prompt-KV store clean next turn
            print("\n(reply cancelled)", file=sys.stderr)
            continue
        print(g.text.strip())
        if sys.stdout.isatty():
            print(stats(g), file=sys.stderr)
        messages.append({"role": "assistant", "content": g.text.strip()})


# ---- serve --------------------------------------------------------------------------------------------------


def _add_serve(sub: Any) -> None:
    s = command(sub, "serve", _cmd_serve,
                 help="OpenAI-compatible HTTP server with live canvas streaming and a web view")
    runtime_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    s.add_argument("--max-batch", "-np", "--parallel", dest="max_batch", type=int, default=None,
                   help="most requests whose canvases share each denoising step (default: the server's, "
                   "docs/performance.md); the others wait and join between steps")
    s.add_argument("--queue-size", type=int, default=16,
                   help="most requests waiting behind the running ones; more get 503 (default 16)")
    s.add_argument("--alias", default=None, help="model id reported by /v1/models (default: the file name)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let open responses finish on Ctrl-C/SIGTERM (default 10)")
    s.add_argument("--reasoning-format", default="auto",
                   help="auto: the thinking channel goes to reasoning_content; none: it stays in the content")
    s.add_argument("--api-key", default=None, help="require this key (Bearer; several: comma-separated)")
    s.add_argument("--api-key-file", default=None, metavar="FILE", help="require one of these keys (one a line)")
    s.add_argument("--log-disable", action="store_true", help="no access log (one line per request, on stderr)")


def _cmd_serve(a: argparse.Namespace) -> int:
    from .server import MAX_BATCH, REASONING_FORMATS, Server  # fastapi is optional: only serve needs it
    from .server.auth import api_keys

    keys = api_keys(a.api_key, a.api_key_file)  # a bad key file fails before the model loads

    if a.reasoning_format not in REASONING_FORMATS:
        raise Error(f"--reasoning-format must be one of {', '.join(REASONING_FORMATS)}, got {a.reasoning_format!r}")
    if a.queue_size < 0:
        raise Error(f"--queue-size must be >= 0, got {a.queue_size}")
    max_batch = MAX_BATCH if a.max_batch is None else a.max_batch
    if max_batch < 1:
        raise Error(f"--max-batch must be >= 1, got {max_batch}")
    m = _load(a)
    try:
        srv = Server(m, host=a.host, port=a.port, queue_size=a.queue_size, model_name=a.alias,
                     shutdown_timeout=a.shutdown_timeout, reasoning_format=a.reasoning_format, max_batch=max_batch,
                     api_key=keys, access_log=not a.log_disable)
        print(f"diffgemma: serving {a.alias or m.path.stem} at {srv.url}/ (web view), OpenAI API at {srv.url}/v1",
              file=sys.stderr, flush=True)
        srv.run()
    finally:
        m.close()
    return 0


# ---- bench and validate -------------------------------------------------------------------------------------


def _add_bench(sub: Any) -> None:
    s = command(sub, "bench", _cmd_bench, help="prefill and per-step latency, optionally against transformers")
    model_arg(s)
    gpu_layers_arg(s)
    threads_arg(s)
    device_args(s)
    s.add_argument("--prompt-tokens", type=int, default=128, help="random prompt tokens prefilled (default 128)")
    s.add_argument("--steps", type=int, default=16, help="denoising steps timed (fixed, no early stop)")
    s.add_argument("--compare", choices=["transformers"], default=None,
                   help="also time transformers on the same weights, in this process")
    s.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="transformers' compute type for --compare (default float32)")
    s.add_argument("--json", action="store_true", help="the measurements as JSON")


def _cmd_bench(a: argparse.Namespace) -> int:
    r = bench(a.model, prompt_tokens=a.prompt_tokens, steps=a.steps, n_gpu_layers=a.n_gpu_layers, threads=a.threads,
              compare=a.compare, hf_dtype=a.hf_dtype, device=a.device, tensor_split=a.tensor_split, rpc=a.rpc)
    if a.json:
        print(json.dumps({"file": r.file, "devices": r.devices, "ours": r.ours, "transformers": r.transformers,
                          "ratio": r.ratio}, indent=1))
    else:
        print(r.table())
    return 0


def _add_validate(sub: Any) -> None:
    s = command(sub, "validate", _cmd_validate, help="the five-prompt validation protocol, side by side for two files")
    s.add_argument("file", help='a GGUF file, or "tiny"')
    s.add_argument("--against", default=None, help="a second file to compare with")
    s.add_argument("-o", "--out", default=None, help="write the Markdown report here")
    force_arg(s, "--out file")
    s.add_argument("-n", "--max-new-tokens", type=int, default=None, help="default: one canvas")
    s.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every prompt (default 0)")
    gpu_layers_arg(s)
    threads_arg(s)


def _cmd_validate(a: argparse.Namespace) -> int:
    md = validate(a.file, a.against, out=a.out, max_new_tokens=a.max_new_tokens, seed=a.seed,
                  n_gpu_layers=a.n_gpu_layers, threads=a.threads, progress=sys.stderr.isatty(), overwrite=a.force)
    if not a.out:
        print(md)
    else:
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


# ---- quantize -----------------------------------------------------------------------------------------------


def _add_quantize(sub: Any) -> None:
    s = command(sub, "quantize", _cmd_quantize,
                 help="quantize a diffusion-gemma GGUF as llama-quantize would (Q4_K_M, ...)",
                 description="Quantize with a llama-quantize file type (Q4_K_M, IQ2_S, ... as llama.cpp chooses per "
                 "tensor), asym-2bitexp, or one type. Positional orders: SRC DST TYPE [NTHREADS], SRC TYPE "
                 "[NTHREADS] (writes ggml-model-TYPE.gguf next to SRC), or SRC DST --recipe/--type.")
    s.add_argument("args", nargs="*", metavar="SRC [DST] [TYPE] [NTHREADS]",
                   help='SRC (a GGUF, or "tiny"), DST, a file type and threads, in llama-quantize\'s orders')
    g = s.add_mutually_exclusive_group()
    g.add_argument("--recipe", default=None, help="a recipe, e.g. Q4_K_M or asym-2bitexp (see --list-recipes)")
    g.add_argument("--type", default=None, help="one type for every quantizable tensor, e.g. q8_0")
    s.add_argument("--imatrix", default=None, help="importance matrix (GGUF or legacy .dat)")
    s.add_argument("--tensor-type", dest="overrides", action="extend", type=tensor_type_arg, metavar="PATTERN=TYPE",
                   help="quantize tensors whose name matches PATTERN (a regex, lowercased) to TYPE (repeatable)")
    s.add_argument("--tensor-type-file", dest="overrides", action="extend", type=tensor_type_file_arg,
                   metavar="FILE", help="PATTERN=TYPE entries separated by spaces or newlines")
    s.add_argument("--override", dest="overrides", action="extend", type=override_arg, metavar="REGEX=TYPE",
                   help="like --tensor-type, the regex taken as written (repeatable)")
    s.add_argument("--token-embedding-type", default=None, metavar="TYPE", help="type of token_embd")
    s.add_argument("--output-tensor-type", default=None, metavar="TYPE",
                   help="type of the output head (token_embd: tied), through the file type's rules")
    s.add_argument("--pure", action="store_true", help="no mixture: every tensor gets the file type's type")
    s.add_argument("--leave-output-tensor", action="store_true",
                   help="keep output.weight (there is none: the head is tied to token_embd)")
    s.add_argument("--include-weights", action="append", metavar="NAME", help="use imatrix entries containing NAME")
    s.add_argument("--exclude-weights", action="append", metavar="NAME", help="drop imatrix entries containing NAME")
    s.add_argument("--prune-layers", type=prune_arg, default=None, metavar="L0,L1,...",
                   help="remove these blocks and renumber the rest")
    s.add_argument("--override-kv", action="append", metavar="KEY=TYPE:VALUE",
                   help="set metadata (TYPE int, float, bool or str; repeatable)")
    s.add_argument("--allow-requantize", action="store_true", help="requantize quantized tensors (the default here)")
    s.add_argument("--no-requantize", action="store_true", help="refuse to requantize already quantized tensors")
    s.add_argument("--dry-run", action="store_true", help="report types, census and size without writing")
    force_arg(s, "DST")
    threads_arg(s, "all usable cores: the workers do not spin")
    s.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")


def _cmd_quantize(a: argparse.Namespace) -> int:
    if a.list_recipes:
        for name, desc in quantizer.recipes().items():
            print(f"{name}\n    {desc}")
        return 0
    src, dst, recipe, threads = quantize_positionals(a)
    if threads is not None and a.threads is not None:
        raise Error("NTHREADS is given twice: positional and --threads")
    rep = quantizer.quantize(resolve(src), dst, recipe=recipe or a.recipe, type=a.type, imatrix=a.imatrix,
                             overrides=a.overrides or None, token_embedding_type=a.token_embedding_type,
                             output_tensor_type=a.output_tensor_type, pure=a.pure,
                             leave_output_tensor=a.leave_output_tensor, include_weights=a.include_weights,
                             exclude_weights=a.exclude_weights, prune_layers=a.prune_layers,
                             override_kv=a.override_kv, allow_requantize=not a.no_requantize,
                             threads=threads or a.threads, dry_run=a.dry_run, progress=sys.stderr.isatty(),
                             overwrite=a.force)
    print(rep.summary())
    return 0


# ---- imatrix and convert ------------------------------------------------------------------------------------


def _add_imatrix(sub: Any) -> None:
    s = command(sub, "imatrix", _cmd_imatrix, help="collect an importance matrix through the diffusion graph")
    model_arg(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--file", default=None, help="calibration text file (must exist)")
    src.add_argument("--text", default=None, help="calibration text given on the command line")
    s.add_argument("-o", "--out", required=True, help=".gguf (llama.cpp's current format) or .dat (legacy)")
    force_arg(s, "--out file")
    s.add_argument("--mode", choices=["denoise", "unified"], default="denoise",
                   help="denoise: noisy canvases as in generation (default); unified: clean canvases, as "
                        "llama-imatrix")
    s.add_argument("--chunks", type=int, default=None, help="most chunks to process (default: all the text)")
    s.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: two canvases)")
    s.add_argument("--format", choices=["gguf", "dat"], default=None, help="default: from the --out suffix")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise levels and tokens (default 0; -1: random)")
    s.add_argument("--save-every", type=int, default=10, help="save the file every N chunks (0: only at the end)")
    gpu_layers_arg(s)
    threads_arg(s)


def _cmd_imatrix(a: argparse.Namespace) -> int:
    calibration = pathlib.Path(a.file) if a.file is not None else a.text  # -f is always a path, --text the text
    rep = imatrix(a.model, calibration, a.out, chunks=a.chunks, mode=a.mode, n_gpu_layers=a.n_gpu_layers,
                  threads=a.threads, format=a.format, progress=sys.stderr.isatty(), chunk_size=a.chunk_size,
                  seed=a.seed, save_every=a.save_every, overwrite=a.force)
    print(rep.summary())
    return 0


def _add_rpc_server(sub: Any) -> None:
    s = command(sub, "rpc-server", _cmd_rpc_server,
                help="serve a local device to other machines' models (ggml's RPC server)",
                description="Serve a device through ggml's RPC server; clients add it with --rpc HOST:PORT. The "
                "protocol has no authentication or encryption: keep the default host 127.0.0.1, or use a trusted "
                "network.")
    s.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    s.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="CPU threads of a served CPU (default: one per physical core)")
    s.add_argument("-d", "--device", default=None, metavar="DEV1,DEV2",
                   help="devices to serve (default: the first GPU, else the CPU; 'cpu' for the CPU)")
    s.add_argument("-c", "--cache", default=None, metavar="DIR", help="cache received weights in DIR (ggml's -c)")


def _cmd_rpc_server(a: argparse.Namespace) -> int:
    devices.serve_rpc(a.host, a.port, a.threads, a.device, a.cache)
    return 0


def _add_convert(sub: Any) -> None:
    s = command(sub, "convert", _cmd_convert, help="Hugging Face DiffusionGemma checkpoint -> GGUF")
    s.add_argument("hf_dir", help="a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    s.add_argument("out", help="the GGUF to write, or a directory (named after the checkpoint)")
    s.add_argument("--outtype", choices=list(OUTTYPES), default="bf16",
                   help="type of the matrices (default bf16; norms and the router stay f32)")
    s.add_argument("--mmproj", default=None, metavar="OUT", help="also write the vision tower (gemma4v mmproj)")
    force_arg(s, "output (and --mmproj)")


def _cmd_convert(a: argparse.Namespace) -> int:
    out = convert(a.hf_dir, a.out, outtype=a.outtype, progress=sys.stderr.isatty(), mmproj=a.mmproj,
                  overwrite=a.force)
    print(out)
    if a.mmproj:
        print(a.mmproj)
    return 0


# ---- the parser and main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per command, none accepting abbreviated flags."""
    p = argparse.ArgumentParser(prog="diffgemma", allow_abbrev=False, description="DiffusionGemma on ggml: "
                                "generate, quantize, calibrate and inspect block-diffusion models.")
    p.add_argument("--version", action="version", version=f"diffgemma {__version__}")
    p.add_argument("--list-devices", action="store_true", help="list the devices with their memory and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for add in (_add_info, _add_generate, _add_chat, _add_serve, _add_bench, _add_validate, _add_quantize,
                _add_imatrix, _add_convert, _add_rpc_server):
        add(sub)
    p.commands = sub.choices  # name -> the command's parser (its own usage in errors)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage, not the top level's
        parser.commands.get(a.cmd, parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if a.cmd is None and not a.list_devices:
        parser.error("give a COMMAND (generate, chat, serve, quantize, ...), or --list-devices")
    try:
        hf_model(a)
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
