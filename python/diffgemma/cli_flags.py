"""The command line's flags that several commands share, declared once (with llama.cpp's spellings as aliases),
and the argument types of its flags."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

from . import hub, images, quantizer, sampler
from .errors import Error


def model_arg(s: argparse.ArgumentParser) -> None:
    """-m FILE, or -hf OWNER/NAME[:QUANT] (a Hugging Face repository)."""
    s.add_argument("-m", "--model", default="tiny",
                   help='GGUF file (default: "tiny", the embedded Shakespeare model)')
    hf_arg(s)


def hf_arg(s: argparse.ArgumentParser) -> None:
    """-hf OWNER/NAME[:QUANT]: the model from a Hugging Face repository (see hf_model)."""
    s.add_argument("-hf", "-hfr", "--hf-repo", default=None, metavar="OWNER/NAME[:QUANT]",
                   help="a Hugging Face GGUF repository instead of a file, downloaded into its cache (QUANT as "
                   "llama.cpp's -hf: default Q4_K_M, else Q8_0, else the first; its mmproj comes too)")


def hf_model(a: argparse.Namespace) -> None:
    """-hf OWNER/NAME[:QUANT] stands for the model argument hf://OWNER/NAME[:QUANT]."""
    if getattr(a, "hf_repo", None) is None:
        return
    target = "file" if a.cmd == "info" else "model"
    if getattr(a, target) not in (None, "tiny"):
        raise Error(f"give the model once: {'FILE' if target == 'file' else '-m'} or -hf, not both")
    setattr(a, target, a.hf_repo if hub.is_hf(a.hf_repo) else hub.SCHEME + a.hf_repo)


def gpu_layers_arg(s: argparse.ArgumentParser) -> None:
    """-ngl N: layers on the GPU."""
    s.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=-1, metavar="N",
                   help="-1 all layers on the GPU, 0 CPU only")


def threads_arg(s: argparse.ArgumentParser, default: str = "one per physical core") -> None:
    """-t N: CPU threads (`default` says what leaving it out means)."""
    s.add_argument("-t", "--threads", type=int, default=None, metavar="N", help=f"CPU threads (default: {default})")


def runtime_args(s: argparse.ArgumentParser) -> None:
    """The model and how it runs: file, devices, threads, context, batch, store type, attention, vision tower."""
    model_arg(s)
    gpu_layers_arg(s)
    threads_arg(s)
    s.add_argument("-c", "--ctx-size", "--n-ctx", dest="n_ctx", type=int, default=None, metavar="N",
                   help="most prompt + generated tokens (default: the file's context length, as memory allows)")
    s.add_argument("-b", "--batch-size", "--n-batch", dest="n_batch", type=int, default=512, metavar="N",
                   help="prompt tokens encoded per graph (default 512)")
    s.add_argument("--kv-type", choices=("f16", "f32"), default="f16", help="prompt-KV store type (default f16)")
    s.add_argument("-fa", "--flash-attn", nargs="?", const="on", choices=("on", "off", "auto"), default="auto",
                   metavar="on|off|auto",
                   help="flash attention: on, off or auto (default auto: wherever the backend runs it; -fa "
                        "alone: on)")
    s.add_argument("--no-repack", dest="repack", action="store_false",
                   help="map every weight from the file (default: CPU matrices are copied at load into the layout "
                        "their fastest kernel reads: Q4_0/IQ4_NL/MXFP4 repacked, dense Q4_1/Q5_1 as F32)")
    s.add_argument("-v", "--verbose", action="store_true", help="show ggml/libllama logs")
    s.add_argument("--mmproj", default=None, help="gemma4v mmproj GGUF with the vision tower (for images)")
    s.add_argument("--no-mmproj", dest="mmproj", action="store_const", const=False,
                   help="do not fetch the -hf repository's mmproj")
    device_args(s)


def device_args(s: argparse.ArgumentParser) -> None:
    """llama.cpp's device flags: -dev, -ts, --rpc, --list-devices (docs/devices.md)."""
    s.add_argument("-dev", "--device", default=None, metavar="DEV1,DEV2",
                   help="devices for the offloaded layers (Vulkan0, CUDA0,CUDA1, RPC0; 'none': CPU only; default: "
                        "every GPU)")
    s.add_argument("-ts", "--tensor-split", default=None, metavar="N0,N1",
                   help="share of the offloaded layers per device, e.g. 3,1 (default: by free memory)")
    s.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="ggml RPC servers whose devices join (see `diffgemma rpc-server`)")
    s.add_argument("--list-devices", action="store_true", help="list the devices (with --rpc, theirs too) and exit")


def image_budget_arg(s: argparse.ArgumentParser) -> None:
    """--image-budget N: soft tokens per image (left None when not given: without an image it is an error)."""
    s.add_argument("--image-budget", type=int, default=None, metavar="N",
                   help=f"soft tokens per image: {', '.join(map(str, images.BUDGETS))} (default "
                   f"{images.DEFAULT_BUDGET})")


def image_budget(a: argparse.Namespace) -> int:
    """--image-budget, or the default."""
    return images.DEFAULT_BUDGET if a.image_budget is None else a.image_budget


def sampler_args(s: argparse.ArgumentParser) -> None:
    """-n, --seed, --temp and one flag per SamplerSettings field (--steps, --t-min, ...)."""
    s.add_argument("-n", "--max-new-tokens", type=int, default=256,
                   help="most new tokens (canvases are denoised whole; the text is cut here); -1: until EOS or a "
                        "full context")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default or -1: a random one, reported)")
    s.add_argument("--temp", dest="temperature", type=float, default=None, metavar="T",
                   help="multiply the file's temperature schedule (t_max -> t_min) by T (default 1; 0: greedy, "
                        "argmax acceptance; --t-max and --t-min, where given, are scaled too)")
    for f in dataclasses.fields(sampler.SamplerSettings):  # --steps, --t-min, ...: one flag per setting
        s.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"{f.metadata['help']} (default: from the file)")


def sampler_kw(a: argparse.Namespace) -> dict:
    """generate()'s keywords from the sampler flags (--temp is generate's `temperature`)."""
    # A flag left out takes the file's value (so the command line cannot switch the adaptive stop off).
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(sampler.SamplerSettings)}
    given["temperature"] = getattr(a, "temperature", None)
    return {"max_new_tokens": a.max_new_tokens, "seed": a.seed, **{k: v for k, v in given.items() if v is not None}}


def force_arg(s: argparse.ArgumentParser, what: str) -> None:
    """--force: replace an existing output (`what` names it in the help)."""
    s.add_argument("--force", action="store_true", help=f"replace an existing {what}")


def command(sub: Any, name: str, fn: Any, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand's parser: no abbreviated flags (`--temp` must never mean `--template`)."""
    s = sub.add_parser(name, allow_abbrev=False, **kw)
    s.set_defaults(fn=fn)
    return s


def tensor_type_arg(v: str) -> list[tuple[str, str]]:
    """--tensor-type PATTERN=TYPE as llama-quantize reads it: split at the first '=', pattern lowercased."""
    pat, sep, ty = v.partition("=")
    if not sep or not pat or not ty:
        raise argparse.ArgumentTypeError(f"expected PATTERN=TYPE, got {v!r}")
    return [(pat.lower(), ty)]


def tensor_type_file_arg(path: str) -> list[tuple[str, str]]:
    """--tensor-type-file: PATTERN=TYPE entries separated by spaces or newlines."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None
    return [x for tok in text.split() for x in tensor_type_arg(tok)]


def override_arg(v: str) -> list[tuple[str, str]]:
    """--override REGEX=TYPE: split at the last '=', the regex taken as written."""
    rx, sep, ty = v.rpartition("=")
    if not sep or not rx:
        raise argparse.ArgumentTypeError(f"expected REGEX=TYPE, got {v!r}")
    return [(rx, ty)]


def prune_arg(v: str) -> list[int]:
    """--prune-layers L0,L1,...: sorted distinct layer numbers."""
    try:
        ids = [int(x) for x in v.split(",")]
    except ValueError:
        ids = [-1]
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {v!r}")
    return sorted(set(ids))


def quantize_positionals(a: argparse.Namespace) -> tuple[str, pathlib.Path, str | None, int | None]:
    """SRC DST, SRC DST TYPE [NTHREADS] or SRC TYPE [NTHREADS]: llama-quantize's orders (with only TYPE the
    output is ggml-model-TYPE.gguf next to SRC, as llama-quantize names it)."""
    if not a.args:
        raise Error("quantize needs SRC and DST (or --list-recipes)")
    src, rest = a.args[0], list(a.args[1:])
    dst = recipe = threads = None
    if rest and quantizer.find_recipe(rest[0]) is not None:
        recipe = rest.pop(0)
    elif rest:
        dst = rest.pop(0)
        if rest and not ((a.recipe or a.type) and rest[0].isdigit()):  # with --recipe a number is NTHREADS
            recipe = rest.pop(0)
            if quantizer.find_recipe(recipe) is None:
                raise Error(f"unknown file type {recipe!r}; see `diffgemma quantize --list-recipes`")
    if rest:
        if len(rest) > 1 or not rest[0].isdigit():
            raise Error(f"unexpected {' '.join(rest)!r}: the order is SRC [DST] TYPE [NTHREADS]")
        threads = int(rest[0]) or None  # 0: the default, as llama-quantize reads it
    if recipe is not None and (a.recipe or a.type):
        raise Error(f"the file type is given twice: {recipe!r} and --recipe/--type")
    if dst is None:
        if recipe is None:
            raise Error("quantize needs SRC and DST (or SRC TYPE)")
        dst = pathlib.Path(src).parent / f"ggml-model-{quantizer.find_recipe(recipe).name}.gguf"
    return src, pathlib.Path(dst), recipe, threads
