"""diffgemma: run, quantize and calibrate DiffusionGemma (block-diffusion Gemma-4 MoE) on ggml."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from .calibration import ImatrixReport, imatrix
from .chat import ChatReply
from .chat_format import ToolCall, parse_chat_output
from .converter import convert
from .errors import Error, GGUFError
from .generation import FROM_FILE, BatchStream, CanvasEvent, Generation, StepEvent, Stream, TokenLogprob
from .layout import HParams
from .model import Model, load, resolve
from .quantizer import QuantizeReport, quantize, recipes
from .sampler import SamplerSettings
from .template import Hole
from .template import parse as parse_template
from .version import __version__

_cache: dict[tuple, Model] = {}
_cache_lock = threading.Lock()


def backends() -> list[str]:
    """Names of the ggml devices this installation can use, e.g. ['CUDA0', 'CPU']."""
    from . import devices

    return [d.name for d in devices.local()]


def list_devices(rpc: str | list[str] | None = None) -> list[Any]:
    """Every ggml device this installation can use, with its memory: dg.devices.Device records (.name, .type,
    .description, .memory_free, .memory_total). rpc: also the devices of these RPC servers ("host:port")."""
    from . import devices

    return devices.local() + devices.remote(rpc)


def generate(prompt: Any, *, model: str | os.PathLike | Model = "tiny", n_gpu_layers: int = -1,
             threads: int | None = None, max_new_tokens: int = 256, steps: int | None = None, seed: int | None = None,
             t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
             stability: Any = FROM_FILE, confidence: Any = FROM_FILE, chat: bool | None = None,
             on_step: Callable[[StepEvent], Any] | None = None,
             on_prefill: Callable[[int, int], Any] | None = None, image_budget: int = 280,
             template: Any = None, sampler: SamplerSettings | None = None, temperature: float | None = None,
             logprobs: bool | int | None = None, json_schema: Any = None) -> str:
    """Generate text after `prompt` with `model` and return the text (the rest as for Model.generate).

    model: a GGUF path, "tiny" (the embedded Shakespeare model, the default) or a loaded Model; a path is
    loaded once with `n_gpu_layers` and `threads` (CPU threads, default one per physical core) and cached for
    the next call (one model at a time). prompt: a str, a list
    of chat messages [{"role", "content"}] or a list of token ids. Sampler settings left as None take the
    file's values; stability/confidence=None disable the adaptive stop; seed None or -1 draws a random one;
    template: text with {{hole N ...}} tags or a list of str / Hole parts (docs/templates.md); sampler: a
    SamplerSettings to start from instead of the model's sampler_defaults (the sampler keywords override it);
    temperature: scales the temperature schedule, 0 is greedy (see Model.generate); logprobs: accepted for
    symmetry with Model.generate (the text alone carries none of them); json_schema: a JSON Schema the text
    follows (docs/structured.md; the text always parses and validates)."""
    kw = dict(max_new_tokens=max_new_tokens, steps=steps, seed=seed, t_min=t_min, t_max=t_max,
              entropy_bound=entropy_bound, stability=stability, confidence=confidence, chat=chat, on_step=on_step,
              on_prefill=on_prefill, image_budget=image_budget, template=template, sampler=sampler,
              temperature=temperature, logprobs=logprobs, json_schema=json_schema)
    if isinstance(model, Model):
        return model.generate(prompt, **kw).text
    return _cached(model, n_gpu_layers, threads).generate(prompt, **kw).text


def stream(prompt: Any, *, model: str | os.PathLike | Model = "tiny", n_gpu_layers: int = -1,
           threads: int | None = None, max_new_tokens: int = 256, steps: int | None = None, seed: int | None = None,
           t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
           stability: Any = FROM_FILE, confidence: Any = FROM_FILE, chat: bool | None = None,
           on_prefill: Callable[[int, int], Any] | None = None, image_budget: int = 280,
           template: Any = None, sampler: SamplerSettings | None = None, temperature: float | None = None,
           logprobs: bool | int | None = None, json_schema: Any = None) -> Stream:
    """Generate text after `prompt` with `model` as a stream of events (the rest as for Model.stream).

    model: a GGUF path, "tiny" (the embedded Shakespeare model, the default) or a loaded Model; a path is
    loaded once with `n_gpu_layers` and `threads` (CPU threads, default one per physical core) and cached (one
    model at a time). prompt: a str, a list of chat messages
    [{"role", "content"}] or a list of token ids. max_new_tokens: most new tokens (the last canvas is cut).
    Sampler settings (steps, t_min, t_max, entropy_bound) left as None take the file's values;
    stability/confidence=None disable the adaptive stop; seed None or -1 draws a random one (Stream.seed).
    chat=None applies the file's chat template when it has one. on_prefill(done, total) after each encoded
    chunk; image_budget: soft tokens per image; template: text with {{hole N ...}} tags or a list of str / Hole
    parts; sampler: a SamplerSettings to start from instead of the model's sampler_defaults (the sampler
    keywords override it); temperature: scales the temperature schedule, 0 is greedy (see Model.generate);
    logprobs: True or k, each token's log-probability (CanvasEvent.logprobs, Generation.logprobs);
    json_schema: a JSON Schema the text follows (docs/structured.md).
    Iterating yields dg.StepEvent after every denoising step and dg.CanvasEvent (.text_delta, .tokens, ...)
    when a canvas commits; `.generation` holds the final Generation once the loop ends. Breaking out stops
    generation cleanly."""
    kw = dict(max_new_tokens=max_new_tokens, steps=steps, seed=seed, t_min=t_min, t_max=t_max,
              entropy_bound=entropy_bound, stability=stability, confidence=confidence, chat=chat,
              on_prefill=on_prefill, image_budget=image_budget, template=template, sampler=sampler,
              temperature=temperature, logprobs=logprobs, json_schema=json_schema)
    m = model if isinstance(model, Model) else _cached(model, n_gpu_layers, threads)
    return m.stream(prompt, **kw)


def _cached(model: str | os.PathLike, n_gpu_layers: int, threads: int | None) -> Model:
    path = resolve(model)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, n_gpu_layers, threads)
    with _cache_lock:
        m = _cache.get(key)
        if m is None:
            m = load(path, n_gpu_layers=n_gpu_layers, threads=threads)
            _cache.clear()  # one model at a time: they are large
            _cache[key] = m
    return m


# Like mlx_lm.generate, the function shadows its module: import the module's names from diffgemma.chat.
def chat(messages: list[dict[str, Any]], *, model: str | os.PathLike | Model = "tiny", tools: list[dict] | None = None,
         tool_choice: Any = "auto", n_gpu_layers: int = -1, threads: int | None = None, **kw: Any) -> ChatReply:
    """Load `model` with `n_gpu_layers` and `threads` (cached across calls) and run one assistant turn with tools
    (see Model.chat)."""
    m = model if isinstance(model, Model) else _cached(model, n_gpu_layers, threads)
    return m.chat(messages, tools=tools, tool_choice=tool_choice, **kw)


def __dir__() -> list[str]:
    """The public API only (PEP 562): not the helpers this module imports (os, Any, ...) nor its submodules."""
    return sorted(__all__)


__all__ = ["BatchStream", "CanvasEvent", "ChatReply", "Error", "FROM_FILE", "GGUFError", "Generation", "HParams",
           "Hole", "ImatrixReport", "Model", "QuantizeReport", "SamplerSettings", "StepEvent", "Stream",
           "TokenLogprob", "ToolCall", "__version__", "backends", "chat", "convert", "generate", "imatrix",
           "list_devices", "load",
           "parse_chat_output", "parse_template", "quantize", "recipes", "stream"]
