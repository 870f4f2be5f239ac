"""JSON text of any value the proxy has read, however deep; and, for what is stored,
within a depth.

orjson reads documents nested up to 1024 levels but writes only up to 254: a body the
proxy read and then changed (a policy's edit, the ``stream_options`` it adds to a chat
stream) could not be written back, and the client got a 500. ``dumps`` writes what
orjson writes, byte for byte, and the deeper rest without recursion.

Records keep their documents within a depth that every reader can take back
(``recording.RECORD_MAX_DEPTH``): ``dumps_within`` writes a value only if it is that
shallow, and ``flatten`` replaces what lies deeper by its JSON text.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import orjson

# The deepest nesting orjson writes (it refuses a 255th level).
ORJSON_MAX_DEPTH = 254


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


class _Nests(threading.local):
    """Per depth, ``ORJSON_MAX_DEPTH - depth`` arrays nested in one another: orjson,
    writing a value placed in the innermost, refuses it when the value itself is nested
    deeper than ``depth``. A depth check at the cost of the serialization."""

    def __init__(self) -> None:
        self.by_depth: dict[int, tuple[list[Any], list[Any]]] = {}

    def get(self, depth: int) -> tuple[list[Any], list[Any]]:
        nest = self.by_depth.get(depth)
        if nest is None:
            outer: list[Any] = [None]
            inner = outer
            for _ in range(ORJSON_MAX_DEPTH - depth - 1):
                inner[0] = [None]
                inner = inner[0]
            nest = self.by_depth[depth] = (outer, inner)
        return nest


_NESTS = _Nests()


def dumps_within(value: Any, depth: int) -> bytes | None:
    """``value`` as orjson writes it, or None when it is nested deeper than ``depth``
    (below ``ORJSON_MAX_DEPTH``) or holds what orjson does not write (an integer beyond
    64 bits)."""
    outer, inner = _NESTS.get(depth)
    skip = ORJSON_MAX_DEPTH - depth
    inner[0] = value
    try:
        return orjson.dumps(outer)[skip:-skip]
    except orjson.JSONEncodeError:
        return None
    finally:
        inner[0] = None


def flatten(value: Any, depth: int) -> Any:
    """``value`` with every array or object below ``depth`` levels replaced, in place, by
    its JSON text (``dumps_deep``): a string any reader can take back. Tuples become
    lists."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, (dict, list)):
        return value
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item))
        for key in keys:
            child = item[key]
            if isinstance(child, tuple):
                child = item[key] = list(child)
            if isinstance(child, (dict, list)):
                if level >= depth:
                    item[key] = dumps_deep(child)
                else:
                    stack.append((child, level + 1))
    return value
