"""`response_format` (OpenAI's, on both generating endpoints): a JSON Schema the answer is laid out with
(docs/structured.md). The schema is compiled here, while the request is validated, so that a keyword outside the
supported subset is a 400 naming it before anything is queued; it is laid out against the model later.

{"type": "text"} (or none) asks for nothing. {"type": "json_object"} is refused: a fixed layout needs the keys
and the sizes of the values, which only a schema gives, and JSON that merely parses is not something this server
can promise without one; llama-server's {"type": "json_object", "schema": {...}} is served as that schema.
`strict` changes nothing: every accepted schema is enforced exactly, and an unsupported keyword is a 400 either
way.
"""

from typing import Any

from ..errors import Error
from ..schema_compile import JsonSchema, compile
from .errors import invalid

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
