"""A forced tool call laid out with its function's `parameters` schema, so that its arguments validate
(docs/structured.md, "Tool calls").

tool_choice naming a function (or "required" with one tool): the prompt ends with `<|tool_call>call:NAME` and the
canvas holds the arguments in Gemma 4's call syntax (`{key:VALUE,...}`, schema_compile.GEMMA), then
`<tool_call|>`. "required" with several tools: the prompt ends with `<|tool_call>call:` and the canvas holds
`NAME{...}` of every tool as alternatives, exactly one of them written (the model chooses). Where that cannot be
done (a schema outside the supported subset, alternatives wider than a canvas) the call is forced as before
(chat_format.forced_prefix) and the model writes its arguments freely; `ForcedCall.unenforced` says why.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from . import chat_format
from .errors import Error
from .schema_compile import GEMMA, Fixed, Group, JsonSchema, OneOf, compile
from .structured import SchemaLayout, lay_out


@dataclasses.dataclass(frozen=True)
class ForcedCall:
    """How a forced call is generated: `prefix` ends the prompt; `layout` (None: free text) is the rest of the call
    as a template, whose text follows the prefix."""

    prefix: str
    layout: SchemaLayout | None = None
    unenforced: str | None = None  # why the arguments are not laid out (None when they are, or nothing is forced)


def _parameters(function: dict) -> dict:
    """A function's parameters schema; absent means no arguments, and its type is object (chat_format's rule)."""
    params = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    return params if "type" in params else {**params, "type": "object"}


def _arguments(name: str, function: dict) -> JsonSchema:
    try:
        return compile(_parameters(function), GEMMA)
    except Error as e:
        raise Error(f"function {name!r}, parameters {e}") from e


def forced_call(model: Any, tools: list[dict], choice: str | None) -> ForcedCall:
    """The forced call of `choice` ('required' or a function name, as chat_format.check_tool_choice gives it)
    among the checked `tools`, laid out for `model`; no call is forced for 'auto', 'none' or no tools."""
    if not tools or choice in (None, "auto", "none"):
        return ForcedCall("")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    names = list(functions) if choice == "required" else [choice]
    try:
        args = [_arguments(n, functions[n]) for n in names]
        if len(names) == 1:
            prefix, nodes = f"{chat_format.CALL}call:{names[0]}", args[0].nodes
        else:  # each alternative is the function's name and its arguments; the model writes one
            options = tuple(Group(f"$.{n}", (Fixed(n), *a.nodes)) for n, a in zip(names, args, strict=True))
            prefix, nodes = f"{chat_format.CALL}call:", (OneOf("$", options, choose=True),)
        schema = {n: a.schema for n, a in zip(names, args, strict=True)}
        js = JsonSchema(schema, (*nodes, Fixed(chat_format.CALL_END)), "call:" + json.dumps(schema, sort_keys=True),
                        GEMMA.name)
        return ForcedCall(prefix, lay_out(model, js))
    except Error as e:
        return ForcedCall(chat_format.forced_prefix(choice), None, str(e))
