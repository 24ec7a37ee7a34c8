"""diffgemma: run, quantize and calibrate DiffusionGemma (block-diffusion Gemma-4 MoE) on ggml."""

from __future__ import annotations

import os
import threading
from typing import Any

from .chat import ChatReply
from .chat_format import ToolCall, parse_chat_output
from .errors import Error, GGUFError
from .generation import FROM_FILE, Generation, StepEvent
from .layout import HParams
from .model import Model, load, resolve
from .template import Hole
from .template import parse as parse_template


def imatrix(model: Any, calibration: Any, out: str | os.PathLike, **kw: Any) -> Any:
    """Collect an importance matrix (see diffgemma.calibration.imatrix)."""
    from .calibration import imatrix as _imatrix

    return _imatrix(model, calibration, out, **kw)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, **kw: Any) -> Any:
    """Quantize a diffusion-gemma GGUF (see diffgemma.quantizer.quantize)."""
    from .quantizer import quantize as _quantize

    return _quantize(resolve(src), dst, **kw)


def recipes() -> dict[str, str]:
    """Built-in quantization recipes and their descriptions."""
    from .quantizer import recipes as _recipes

    return _recipes()


def convert(hf_dir: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> Any:
    """Convert a Hugging Face DiffusionGemmaForBlockDiffusion checkpoint to GGUF (see diffgemma.converter)."""
    from .converter import convert as _convert

    return _convert(hf_dir, out, **kw)

__version__ = "0.1.0"

_cache: dict[tuple, Model] = {}
_cache_lock = threading.Lock()


def backends() -> list[str]:
    """Names of the ggml devices this installation can use, e.g. ['CUDA0', 'CPU']."""
    from . import binding

    return [d["name"] for d in binding.devices()]


def generate(prompt: Any, *, model: str | os.PathLike | Model, n_gpu_layers: int = -1, **kw: Any) -> str:
    """Load `model` (cached across calls) and generate; returns the text. Keywords as for Model.generate."""
    if isinstance(model, Model):
        return model.generate(prompt, **kw).text
    return _cached(model, n_gpu_layers).generate(prompt, **kw).text


def _cached(model: str | os.PathLike, n_gpu_layers: int) -> Model:
    path = resolve(model)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, n_gpu_layers)
    with _cache_lock:
        m = _cache.get(key)
        if m is None:
            m = load(path, n_gpu_layers=n_gpu_layers)
            _cache.clear()  # one model at a time: they are large
            _cache[key] = m
    return m


# Like mlx_lm.generate, the function shadows its module: import the module's names from diffgemma.chat.
def chat(messages: list[dict[str, Any]], *, model: str | os.PathLike | Model, tools: list[dict] | None = None,
         tool_choice: Any = "auto", n_gpu_layers: int = -1, **kw: Any) -> ChatReply:
    """Load `model` (cached across calls) and run one assistant turn with tools (see Model.chat)."""
    m = model if isinstance(model, Model) else _cached(model, n_gpu_layers)
    return m.chat(messages, tools=tools, tool_choice=tool_choice, **kw)


__all__ = ["FROM_FILE", "ChatReply", "Error", "GGUFError", "Generation", "HParams", "Hole", "Model", "StepEvent",
           "ToolCall", "__version__", "backends", "chat", "convert", "generate", "imatrix", "load", "parse_chat_output",
           "parse_template", "quantize", "recipes"]
