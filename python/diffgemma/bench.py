"""Benchmarks and the validation harness: `diffgemma bench` and `diffgemma validate`.

Speed is always reported next to a peer measured in the same process (transformers on the same weights) so
the figures are ratios, not absolute claims. transformers/torch are imported only for the comparison.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import binding as B
from . import sampler
from .errors import Error

if TYPE_CHECKING:
    from .model import Model

VALIDATION_PROMPTS = {
    "factual": "What is the capital of France, and on which river does it lie?",
    "code": "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "explanation": "Explain in three sentences why the sky is blue.",
    "list": "List five fruits that are rich in vitamin C.",
    "creative": "Write a four-line poem about the sea at night.",
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_used_mb(m: Model) -> float | None:
    if m.gpu_backend is None:
        return None
    dev = B.lib.ggml_backend_get_device(m.gpu_backend)
    free, total = B.ffi.new("size_t *"), B.ffi.new("size_t *")
    B.lib.ggml_backend_dev_memory(dev, free, total)
    return (total[0] - free[0]) / 2**20


def _timed(fn: Any, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - t) / n


def ours(m: Model, *, prompt_tokens: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Prefill and denoising-step latency of a loaded Model (self-conditioning on, sampling on the device)."""
    hp = m.hparams
    L = hp.canvas_length
    rng = np.random.default_rng(seed)
    prompt = rng.integers(5, hp.n_vocab, prompt_tokens).astype(np.int32)
    canvas = rng.integers(0, hp.n_vocab, L)
    u = np.full(L, 0.5, np.float32)

    def prefill() -> None:
        m.reset()
        m.prefill(prompt)

    noise = rng.integers(0, hp.n_vocab, L)
    history: list[np.ndarray] = []
    cfg = m.sampler_defaults

    def step() -> None:  # a whole denoising step as generate runs it: device pass, then the host rules
        argmax, entropy, sampled = m.denoise_step(canvas, 0.7, True, u)
        sampler.renoise(sampler.accept(entropy, cfg.entropy_bound), sampled, noise)
        sampler.should_stop(history, argmax, entropy, cfg.stability, cfg.confidence)

    prefill()  # warm-up (graph build and allocation)
    prefill_ms = _timed(prefill, 3)
    m.denoise_step(canvas, 0.8, False, u)
    step()
    step_ms = _timed(step, steps)
    return {"prefill_ms": prefill_ms, "step_ms": step_ms, "effective_tokens_per_s": L / (steps * step_ms / 1e3),
            "canvas": L, "prompt_tokens": prompt_tokens,
            "steps": steps, "peak_host_mb": _peak_rss_mb(), "device_used_mb": _device_used_mb(m)}


# ---- the reference, on the same weights ------------------------------------------------------------------

def _require_reference() -> None:
    """Error (with how to install them) unless torch and a transformers with DiffusionGemma import."""
    try:
        import torch  # noqa: F401
        from transformers import DiffusionGemmaForBlockDiffusion  # noqa: F401
    except ImportError as e:
        raise Error(f"the transformers comparison needs torch and transformers with DiffusionGemma ({e}); install "
                    "the test extra from the clone: pip install '.[test]' (or pip install torch==2.13.0 "
                    "transformers==5.24.0)") from None


def hf_model_from_gguf(path: str | os.PathLike, dtype: str = "float32") -> Any:
    """transformers' DiffusionGemmaForBlockDiffusion holding the (dequantized) weights of a GGUF file."""
    _require_reference()
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

    from . import gguf_file
    from .converter import _DECODER, _ENCODER_TEXT, _GLOBAL_MAP, _LAYER_MAP

    gf = gguf_file.read(path)
    hp = gguf_file.validate(gf)
    types = ["sliding_attention" if s else "full_attention" for s in hp.swa_layers]
    raw = np.memmap(gf.path, dtype=np.uint8, mode="r")
    freqs = gf.tensors["rope_freqs.weight"]
    rot = int((raw[freqs.offset:freqs.offset + freqs.nbytes].view(np.float32) == 1.0).sum())
    tc = DiffusionGemmaTextConfig(
        vocab_size=hp.n_vocab, hidden_size=hp.n_embd, intermediate_size=hp.n_ff, moe_intermediate_size=hp.n_ff_exp,
        num_experts=hp.n_expert, top_k_experts=hp.n_expert_used, num_hidden_layers=hp.n_layer, layer_types=types,
        num_attention_heads=hp.n_head, num_key_value_heads=hp.n_head_kv[types.index("sliding_attention")]
        if "sliding_attention" in types else hp.n_head_kv[0], head_dim=hp.head_dim_swa,
        global_head_dim=hp.head_dim, num_global_key_value_heads=hp.n_head_kv[types.index("full_attention")],
        sliding_window=hp.sliding_window, max_position_embeddings=hp.context_length, rms_norm_eps=hp.rms_eps,
        use_bidirectional_attention="vision",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": hp.rope_base_swa},
                         "full_attention": {"rope_type": "proportional", "rope_theta": hp.rope_base,
                                            "partial_rotary_factor": 2 * rot / hp.head_dim}})
    tc.final_logit_softcapping = hp.softcap
    vc = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}
    torch_dtype = getattr(torch, dtype)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=tc, vision_config=vc,
                                                                 canvas_length=hp.canvas_length))
    state: dict[str, Any] = {}
    for info in gf.tensors.values():
        shape = tuple(reversed(info.shape))
        arr = np.array(gguf_file.decode(raw, info), dtype=np.float32).reshape(shape)  # a writable copy for torch
        if info.name == "rope_freqs.weight":
            continue
        if info.name in _GLOBAL_MAP:
            state[_DECODER + _GLOBAL_MAP[info.name]] = arr
            continue
        _, il, suffix = info.name.split(".", 2)
        if suffix == "enc_layer_output_scale.weight":
            state[f"{_ENCODER_TEXT}layers.{il}.layer_scalar"] = arr.reshape(1)
        else:
            scalar = suffix.startswith("layer_")
            state[f"{_DECODER}layers.{il}.{_LAYER_MAP[suffix]}"] = arr.reshape(1) if scalar else arr
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    left = [k for k in missing if k.startswith(_DECODER) or k.startswith(_ENCODER_TEXT) and "layer_scalar" in k]
    if unexpected or left:
        raise Error(f"GGUF -> transformers: unexpected {unexpected[:3]}, missing {left[:3]}")
    return model.to(torch_dtype).eval()


def transformers_step(model: Any, *, prompt_tokens: int, canvas: int, vocab: int, steps: int,
                      seed: int = 0) -> dict[str, Any]:
    """transformers' prefill (encoder over the prompt) and denoising step, timed two ways: `step_ms` is its
    own `_denoising_step` as its `generate` runs it (decoder with cache and self-conditioning, temperature,
    softmax, multinomial, argmax, entropy-bound acceptance, re-noising, stopping check); `forward_ms` is the
    decoder forward alone."""
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, vocab, (1, prompt_tokens), generator=g)
    cv = torch.randint(0, vocab, (1, canvas), generator=g)
    d = sampler.SamplerSettings()  # the reference settings, which the released checkpoint uses
    gc = DiffusionGemmaGenerationConfig(
        max_denoising_steps=d.steps, t_min=d.t_min, t_max=d.t_max,
        sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": d.entropy_bound},
        stability_threshold=d.stability, confidence_threshold=d.confidence)
    with torch.no_grad():
        def prefill() -> Any:
            return model(input_ids=prompt, decoder_input_ids=cv)

        out = prefill()
        prefill_ms = _timed(prefill, 3)
        cache, sc = out.cache, out.logits / 0.8

        def forward() -> None:
            model(cache=cache, decoder_input_ids=cv, self_conditioning_logits=sc)

        masks = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config, inputs_embeds=cv.unsqueeze(-1), cache=cache, decoder_attention_mask=None)
        parts = {"sampler": model._prepare_sampler(gc), "logits_processor": model._prepare_logits_processor(gc),
                 "diffusion_stopping_criteria": model._prepare_diffusion_stopping_criteria(gc)}
        positions = torch.arange(prompt_tokens, prompt_tokens + canvas)[None]

        def step() -> None:
            model._denoising_step(decoder_forward=model.forward, current_canvas=cv, argmax_canvas=cv,
                                  input_ids=prompt, decoder_position_ids=positions, self_conditioning_logits=sc,
                                  mask_mapping=masks, cache=cache, finished_denoising=torch.zeros(1, dtype=torch.bool),
                                  cur_step=24, **parts)

        forward()
        step()
        forward_ms = _timed(forward, steps)
        step_ms = _timed(step, steps)
    return {"prefill_ms": prefill_ms, "step_ms": step_ms, "forward_ms": forward_ms,
            "effective_tokens_per_s": canvas / (steps * step_ms / 1e3),
            "torch_threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype)}


@dataclasses.dataclass
class BenchResult:
    file: str
    devices: list[str]
    ours: dict[str, Any]
    transformers: dict[str, Any] | None = None

    @property
    def ratio(self) -> float | None:
        """transformers step time / ours (>1: we are faster)."""
        return None if not self.transformers else self.transformers["step_ms"] / self.ours["step_ms"]

    def table(self) -> str:
        rows = [("", "diffgemma") + (("transformers", "ratio") if self.transformers else ())]
        for key, label in (("prefill_ms", "prefill ms"), ("step_ms", "ms / denoising step"),
                           ("effective_tokens_per_s", "tokens/s at fixed steps")):
            r = [label, f"{self.ours[key]:.2f}"]
            if self.transformers:
                t = self.transformers[key]
                ratio = t / self.ours[key] if key.endswith("_ms") else self.ours[key] / t
                r += [f"{t:.2f}", f"{ratio:.2f}x"]
            rows.append(tuple(r))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        o = self.ours
        lines.append(f"[{self.file} on {', '.join(self.devices)}; prompt {o['prompt_tokens']}, canvas {o['canvas']}, "
                     f"{o['steps']} steps; peak host {o['peak_host_mb']:.0f} MB"
                     + (f", device {o['device_used_mb']:.0f} MB used" if o["device_used_mb"] is not None else "")
                     + "]")
        return "\n".join(lines)


def bench(path: str | os.PathLike, *, prompt_tokens: int = 128, steps: int = 16, n_gpu_layers: int = -1,
          threads: int | None = None, compare: str | None = None, hf_dtype: str = "float32", device: Any = None,
          tensor_split: Any = None, rpc: Any = None) -> BenchResult:
    """Measure prefill and per-step latency of a file; compare="transformers" also times the reference on the
    same (dequantized) weights in this process. threads: CPU threads of both (default: ours, one per physical
    core; torch's own). device, tensor_split, rpc: as for dg.load."""
    from .model import load, resolve

    if compare not in (None, "transformers"):
        raise Error(f"compare must be None or 'transformers', got {compare!r}")
    if prompt_tokens < 1 or steps < 1:
        raise Error("prompt_tokens and steps must be >= 1")
    path = resolve(path)
    if compare == "transformers":
        _require_reference()  # before timing our half, not after
    with load(path, n_gpu_layers=n_gpu_layers, threads=threads, n_ctx=prompt_tokens + 2 * 256 + 64, device=device,
              tensor_split=tensor_split, rpc=rpc) as m:
        res = BenchResult(str(path), m.devices, ours(m, prompt_tokens=prompt_tokens, steps=steps))
        hp = m.hparams
    if compare == "transformers":
        import torch

        if threads:
            torch.set_num_threads(threads)
        ref = hf_model_from_gguf(path, hf_dtype)
        res.transformers = transformers_step(ref, prompt_tokens=prompt_tokens, canvas=hp.canvas_length,
                                             vocab=hp.n_vocab, steps=steps)
    return res


# ---- validation protocol -----------------------------------------------------------------------------------

def validate(path: str | os.PathLike, against: str | os.PathLike | None = None, *, out: str | os.PathLike | None = None,
             max_new_tokens: int | None = None, seed: int = 0, n_gpu_layers: int = -1, threads: int | None = None,
             prompts: dict[str, str] | None = None, progress: bool = True, overwrite: bool = False) -> str:
    """The published validation protocol: five prompts (factual, code, explanation, list, creative), committed
    answers, steps per canvas and tokens/s, side by side for two files; returns (and writes) Markdown.
    Each file is loaded with `n_gpu_layers` and `threads` (CPU threads, default one per physical core).
    progress: a tqdm bar over the prompts; an existing `out` is an Error unless overwrite=True."""
    from tqdm.auto import tqdm

    from . import outputs
    from .model import load, resolve

    prompts = prompts or VALIDATION_PROMPTS
    files = [resolve(path)] + ([resolve(against)] if against else [])
    results: dict[str, dict[str, Any]] = {}
    templated: dict[str, bool] = {}  # file name -> whether its prompts went through its chat template
    if len(files) == 2 and files[0].name == files[1].name:
        raise Error("the two files must have different names (they label the report's columns)")
    if out:
        outputs.check_new(out, overwrite)
    with tqdm(total=len(files) * len(prompts), unit="prompt", desc="validate", disable=not progress,
              leave=False) as bar:
        for f in files:
            with load(f, n_gpu_layers=n_gpu_layers, threads=threads) as m:
                n = max_new_tokens or m.hparams.canvas_length
                templated[f.name] = bool(m.metadata.get("tokenizer.chat_template"))  # as generate's chat=None
                results[f.name] = {}
                for k, p in prompts.items():
                    bar.set_postfix_str(f"{f.name}: {k}")
                    results[f.name][k] = m.generate(p, max_new_tokens=n, seed=seed)
                    bar.update(1)
    names = list(results)
    how = {n: "through its chat template" if t else "as plain text (no chat template)" for n, t in templated.items()}
    prompting = (f"prompts {how[names[0]]}" if len(set(how.values())) == 1 else
                 "prompts " + ", ".join(f"`{n}` {h}" for n, h in how.items()))
    lines = ["# diffgemma validate", "",
             f"Files: {', '.join(f'`{n}`' for n in names)}; seed {seed}; {prompting}.", ""]
    lines += ["| prompt | " + " | ".join(f"{n}: steps/canvas | {n}: tokens/s" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for k in prompts:
        cells = []
        for n in names:
            g = results[n][k]
            cells += [", ".join(str(c.steps) for c in g.canvases), f"{g.timings.tokens_per_s:.1f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for k, p in prompts.items():
        lines += ["", f"## {k}", "", f"> {p}", ""]
        for n in names:
            text = results[n][k].text.strip().replace("\n", "\n    ") or "(empty)"
            lines += [f"**{n}**", "", "    " + text, ""]
    md = "\n".join(lines) + "\n"
    if out:
        with outputs.atomic(out) as tmp:
            tmp.write_text(md, encoding="utf-8")
    return md
