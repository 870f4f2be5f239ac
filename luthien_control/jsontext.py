"""JSON text of any value the proxy has read, however deep.

orjson reads documents nested up to 1024 levels but writes only up to 254: a body the
proxy read and then changed (a policy's edit, the ``stream_options`` it adds to a chat
stream) could not be written back, and the client got a 500. ``dumps`` writes what
orjson writes, byte for byte, and the deeper rest without recursion.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


class _Raw(str):
    """JSON syntax already written, on the stack of ``dumps_deep``."""

    __slots__ = ()


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON: orjson's output, or, where orjson refuses the depth,
    the same text written without recursion."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255 levels)
        return dumps_deep(value).encode()


def dumps_deep(value: Any) -> str:
    """JSON text of a value nested at any depth, without recursion."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Raw:
            out.append(item)
        elif isinstance(item, dict):
            pending: list[Any] = []
            for key, child in item.items():
                pending.append(_Raw(("," if pending else "{") + _leaf(str(key)) + ":"))
                pending.append(child)
            pending.append(_Raw("}" if pending else "{}"))
            stack.extend(reversed(pending))
        elif isinstance(item, (list, tuple)):
            pending = []
            for child in item:
                pending.append(_Raw("," if pending else "["))
                pending.append(child)
            pending.append(_Raw("]" if pending else "[]"))
            stack.extend(reversed(pending))
        else:
            out.append(_leaf(item))
    return "".join(out)


def _leaf(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return json.dumps(value, ensure_ascii=False)
