"""The server's errors, all answered with OpenAI's body {"error": {message, type, param, code}}.

`ApiError` is raised wherever a request fails; request validation (pydantic, run by FastAPI) reports its
failures as a list, which `validation_error` turns into the same 400, with `param` naming the field.
"""

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

OURS = "invalid_request"  # the type of the validation errors we word ourselves (see `invalid`)
CODES = ("unsupported_parameter", "remote_image_url")  # ... and those that also carry an OpenAI `code`


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None  # OpenAI's codes are names; llama-server's 401 carries the status


class ErrorResponse(BaseModel):
    """Every error's body."""

    error: ErrorInfo


class ApiError(Exception):
    """An error answered with an OpenAI-style body (status: the HTTP status)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body of the answer (also an SSE `data:` event once a stream has begun)."""
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 `invalid_request_error`."""
    return ApiError(400, message, param=param, code=code)


def shutdown_error() -> ApiError:
    """The 503 of a request the server ends because it is stopping."""
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def invalid(message: str, *, param: str | None = None, type: str = OURS) -> PydanticCustomError:
    """A validation error in our own words (raise it in a validator). `param` names the field where the error's
    location cannot (a check of several fields runs on the whole request); `type` may be one of CODES."""
    return PydanticCustomError(type, message, {"param": param} if param else None)


def _where(loc: tuple) -> str:
    """A location as the request writes it: messages[0].content."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out


def validation_error(errors: list[dict]) -> ApiError:
    """The 400 for a request that failed validation (pydantic's or FastAPI's errors()): the first error, with
    `param` the top-level field it is in."""
    e = errors[0]
    loc = tuple(e["loc"][1:] if e["loc"][:1] == ("body",) else e["loc"])  # FastAPI puts the body first
    ctx = e.get("ctx") or {}
    if e["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {ctx.get('error', e['msg'])}")
    param = ctx.get("param") or (loc[0] if loc and isinstance(loc[0], str) else None)
    if e["type"] in (OURS, *CODES):  # the message is already a sentence
        message = e["msg"] + (f" ({_where(loc)})" if len(loc) > 1 else "")
    elif not loc:
        message = "the request body must be a JSON object"
    else:
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or e["type"] == "missing" else f", got {got!r:.80}"
        message = f"'{_where(loc)}': {e['msg']}{shown}"
    return bad_request(message, param, e["type"] if e["type"] in CODES else None)
