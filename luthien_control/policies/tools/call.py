"""``ToolCall``: one complete tool call as a check sees it, whatever the dialect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from luthien_control.policies.text import iter_strings


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call: ``arguments`` as the model wrote them, and parsed
    (``parsed_arguments``) when they are JSON, else ``None``."""

    id: str | None
    name: str
    arguments: str
    parsed_arguments: Any = None

    @classmethod
    def of(cls, id: str | None, name: str, arguments: str) -> ToolCall:
        try:
            parsed = orjson.loads(arguments) if arguments else None
        except orjson.JSONDecodeError:
            parsed = None
        return cls(id, name, arguments, parsed)


def strings_and_keys(value: Any) -> list[str]:
    """Every string and every object key of a JSON value."""
    out = iter_strings(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.extend(str(key) for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def text_of(value: Any) -> str:
    """``value`` when it is a string, else ``""``."""
    return value if isinstance(value, str) else ""


def json_text(value: Any) -> str:
    """A field holding arguments, as text: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()
