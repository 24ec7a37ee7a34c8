"""API keys (`serve --api-key`, `--api-key-file`), checked as llama-server checks them.

A request must carry one of the keys as `Authorization: Bearer KEY` (or `X-Api-Key: KEY`, as Anthropic's clients
send it); otherwise it gets a 401 in llama-server's error shape. The paths llama-server leaves open stay open:
the health check, the model list and the web page (which asks for the key itself). CORS preflights (OPTIONS)
carry no credentials, so they pass too.
"""

import os
import pathlib
import secrets
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import Error
from .errors import ApiError

PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/models", "/v1/models", "/"})


def api_keys(api_key: str | Iterable[str] | None = None, api_key_file: str | os.PathLike | None = None) -> list[str]:
    """The accepted keys: `api_key` (one key, several separated by commas, or a list) and the lines of
    `api_key_file` (one key a line; blank lines and lines starting with '#' are skipped). No keys: no check."""
    given = api_key.split(",") if isinstance(api_key, str) else list(api_key or [])
    keys = [k.strip() for k in given if k.strip()]
    if api_key_file is not None:
        try:
            lines = pathlib.Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise Error(f"cannot read the API key file {os.fspath(api_key_file)!r}: {e}") from e
        found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise Error(f"the API key file {os.fspath(api_key_file)!r} holds no key (one a line, '#' starts a "
                        "comment)")
        keys += found
    return keys


def unauthorized() -> ApiError:
    """The 401 of a request without a valid key: llama-server's body ({"message": "Invalid API Key", "type":
    "authentication_error", "code": 401})."""
    return ApiError(401, "Invalid API Key", type="authentication_error", code=401)


class RequireApiKey:
    """ASGI middleware: requests to other than PUBLIC_PATHS need one of `keys` (compared in constant time)."""

    def __init__(self, app: Any, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: dict) -> bool:
        if scope["method"] == "OPTIONS" or scope["path"] in PUBLIC_PATHS:
            return True
        headers = dict(scope["headers"])  # names arrive lower-cased
        given = headers.get(b"authorization") or headers.get(b"x-api-key") or b""
        given = given.removeprefix(b"Bearer ")
        return any(secrets.compare_digest(given, k) for k in self.keys)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        e = unauthorized()
        await JSONResponse(e.body(), status_code=e.status, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
