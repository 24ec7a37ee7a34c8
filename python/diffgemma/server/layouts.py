"""What a request lays out over the canvas besides a template: its `response_format` schema, or a forced tool
call's arguments (docs/structured.md).

`response_format` (OpenAI's, on both generating endpoints) is compiled while the request is validated, so that a
keyword outside the supported subset is a 400 naming it before anything is queued; it is laid out against the
model later.

{"type": "text"} (or none) asks for nothing. {"type": "json_object"} is refused: a fixed layout needs the keys
and the sizes of the values, which only a schema gives, and JSON that merely parses is not something this server
can promise without one; llama-server's {"type": "json_object", "schema": {...}} is served as that schema.
`strict` changes nothing: every accepted schema is enforced exactly, and an unsupported keyword is a 400 either
way.
"""

import dataclasses
import logging
from typing import Any

from .. import tool_layout
from ..errors import Error
from ..schema_compile import JsonSchema, compile
from ..template import Layout
from .errors import invalid

log = logging.getLogger("diffgemma.server")

SHAPE = ('\'response_format\' must be {"type": "text"} or {"type": "json_schema", "json_schema": {"name": ..., '
         '"schema": {...}, "strict": true}}')


def check(v: Any) -> JsonSchema | None:
    """The compiled schema a `response_format` asks for (None for text); a 400 naming what is wrong."""
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise invalid(SHAPE)
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object" and "schema" in v:  # llama-server's spelling of a schema
        return _compiled(v["schema"])
    if kind == "json_object":
        raise invalid("'response_format' {\"type\": \"json_object\"} is not supported: the JSON is laid out over the "
                      "canvas from a schema (its keys, the sizes of its values), so pass one: {\"type\": "
                      "\"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}} (docs/structured.md)",
                      type="unsupported_parameter")
    if kind != "json_schema":
        raise invalid(f"unknown 'response_format' type {kind!r}: {SHAPE}")
    spec = v.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(f"'response_format.json_schema' is missing or not an object: {SHAPE}")
    if not isinstance(spec.get("name", ""), str):
        raise invalid("'response_format.json_schema.name' must be a string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise invalid("'response_format.json_schema.strict' must be true or false")
    if "schema" not in spec:
        raise invalid("'response_format.json_schema' needs its 'schema': this server lays the answer out from it")
    return _compiled(spec["schema"])


def _compiled(schema: Any) -> JsonSchema:
    try:
        return compile(schema)
    except Error as e:  # the keyword and its JSON path in the schema document
        raise invalid(f"response_format schema: {e} (the supported subset: docs/structured.md)") from e


def forced_call(model: Any, chat: Any, tool_choice: str, free: bool) -> tuple[Any, Layout | None]:
    """A chat request's ChatOptions with its forced call's prefix, and the layout of the call's arguments (None:
    no call forced, `free` (a template or logprobs in the request), or a call that cannot be laid out, then
    forced as before and logged)."""
    if not chat.prefix or free:
        return chat, None
    call = tool_layout.forced_call(model, chat.tools, tool_choice)
    if call.unenforced:
        log.info("the forced tool call is written freely: %s", call.unenforced)
    return dataclasses.replace(chat, prefix=call.prefix), call.layout
