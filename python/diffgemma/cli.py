"""The `diffgemma` command line: generate | chat | quantize | imatrix | convert | info | bench | serve."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import Error


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

    gf = gguf_file.read(resolve(path))
    hp = gguf_file.validate(gf)
    md = gf.metadata
    n_params = 0
    for t in gf.tensors.values():
        k = 1
        for x in t.shape:
            k *= x
        n_params += k
    data = sum(t.nbytes for t in gf.tensors.values())
    lines = [
        f"file          {gf.path}",
        f"architecture  {md.get('general.architecture')}   name: {md.get('general.name', '-')}",
        f"tensors       {len(gf.tensors)}   parameters: "
        f"{f'{n_params / 1e9:.2f} B' if n_params >= 1e9 else f'{n_params / 1e6:.2f} M'}   "
        f"bits/weight: {8 * data / max(n_params, 1):.2f}",
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
        "sampler defaults (diffusion.*)",
        f"  canvas {hp.canvas_length}   steps {hp.steps}   t {hp.t_max:g} -> {hp.t_min:g}   entropy bound "
        f"{hp.entropy_bound:g}   stability {hp.stability}   confidence {hp.confidence:g}",
    ]
    return "\n".join(lines)


def _cmd_info(a: argparse.Namespace) -> int:
    from . import binding

    if a.devices:
        for d in binding.devices():
            gib = (d["memory_free"] / 2**30, d["memory_total"] / 2**30)
            mem = f"{gib[0]:.1f}/{gib[1]:.1f} GiB free" if d["memory_total"] else ""
            print(f"{d['name']:10s} {d['type']:6s} {d['description']}  {mem}")
        print(f"ggml {binding.cstr(binding.lib.ggml_version())}, llama-cpp-python {binding.llama_cpp_python_version()}")
        if not a.file:
            return 0
    if not a.file:
        raise Error("info needs a FILE (or --devices)")
    if a.json:
        from . import gguf_file
        from .model import resolve

        gf = gguf_file.read(resolve(a.file))
        hp = gguf_file.validate(gf)
        import dataclasses

        print(json.dumps({"hparams": dataclasses.asdict(hp),
                          "census": gguf_file.census(t.type_name for t in gf.tensors.values()),
                          "tensors": len(gf.tensors), "size_bytes": gf.file_size}, indent=1))
    else:
        print(info_text(a.file))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffgemma", description="DiffusionGemma on ggml: generate, quantize, "
                                "calibrate and inspect block-diffusion models.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"diffgemma {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="describe a diffusion-gemma GGUF file, or list devices")
    s.add_argument("file", nargs="?")
    s.add_argument("--devices", action="store_true", help="list the ggml devices (CPU, CUDA0, ...)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.fn(a) or 0)
    except Error as e:
        print(f"diffgemma: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffgemma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `diffgemma info FILE | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
