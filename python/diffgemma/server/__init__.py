"""`diffgemma serve`: an OpenAI-compatible HTTP server with live canvas streaming and a web view.

One model, one worker thread that denoises up to `max_batch` requests' canvases per decoder pass; the others wait
in a bounded FIFO queue. Committed text streams per canvas as standard SSE chunks; opt-in denoising frames ride
along as SSE comment lines, which every SSE client (the `openai` one included) skips. docs/server.md.

The package, in the shape FastAPI projects use:
- `defaults`: MAX_BATCH, REASONING_FORMATS (no third-party imports);
- `errors`: ApiError and the OpenAI error body, validation errors as 400s;
- `protocol`: the request and response models (pydantic) of the OpenAI endpoints and our extensions;
- `engine`: the batch driver (`Engine`) and the jobs it runs;
- `metrics`: the Prometheus metrics (prometheus_client, one registry per app);
- `auth`: the API keys (`--api-key`) and the middleware that checks them;
- `llama_api`: llama-server's own endpoints (/tokenize, /detokenize, /apply-template, /props, /slots);
- `app`: `create_app`, the routes, SSE, error handlers and lifespan;
- `runner`: `Server`, uvicorn serving the app (blocking, or on a background thread);
- `web/`: the web view's page.

Server, create_app, Engine, Metrics and ApiError are loaded on first use: they need the [serve] extras, and the
command line imports this package for MAX_BATCH and REASONING_FORMATS whether or not those are installed.
"""

import importlib
from typing import Any

from ..errors import Error
from .defaults import MAX_BATCH, NEEDS_EXTRAS, REASONING_FORMATS

_HOME = {"Server": "runner", "create_app": "app", "Engine": "engine", "Metrics": "metrics", "ApiError": "errors"}

__all__ = ["MAX_BATCH", "REASONING_FORMATS", *_HOME]


def __getattr__(name: str) -> Any:
    """Server, create_app, Engine, Metrics, ApiError: imported here, on first use (PEP 562)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{home}", __name__)
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "diffgemma":
            raise
        raise Error(NEEDS_EXTRAS) from e
    return getattr(module, name)
