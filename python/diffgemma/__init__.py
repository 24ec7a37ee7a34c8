"""diffgemma: run, quantize and calibrate DiffusionGemma (block-diffusion Gemma-4 MoE) on ggml."""

from __future__ import annotations

from .errors import Error, GGUFError
from .layout import HParams
from .model import Model, load

__version__ = "0.1.0"


def backends() -> list[str]:
    """Names of the ggml devices this installation can use, e.g. ['CUDA0', 'CPU']."""
    from . import binding

    return [d["name"] for d in binding.devices()]


__all__ = ["Error", "GGUFError", "HParams", "Model", "__version__", "backends", "load"]
