"""``ToolCall``: one complete tool call as a check sees it, whatever the dialect, and
the texts of its arguments that ``argument_patterns`` are searched in."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

_NESTED_DEPTH = 2  # how deep a JSON document inside a string is decoded in turn


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call: ``arguments`` as the model wrote them, and parsed
    (``parsed_arguments``) when they are strict JSON, else ``None``.

    ``item_type`` is set for the Responses API's built-in tool calls (``local_shell_call``,
    ``mcp_call``, ...): ``name`` is then the item type, or the item's own name for one
    that has a name (an ``mcp_call``'s tool), and ``arguments`` the JSON of its
    argument-like fields (``{"action": {"command": [...]}}``)."""

    id: str | None
    name: str
    arguments: str
    parsed_arguments: Any = None
    item_type: str | None = None

    @classmethod
    def of(
        cls, id: str | None, name: str, arguments: str, *, item_type: str | None = None
    ) -> ToolCall:
        try:
            parsed = strict_json(arguments, []) if arguments else None
        except ValueError:
            parsed = None
        return cls(id, name, arguments, parsed, item_type)


def versions(
    call_id: str | None, names: list[str], texts: list[str], *, item_type: str | None = None
) -> list[ToolCall]:
    """The call with each of ``names`` and each of ``texts`` as its arguments: every
    version of one call that a client could take when the backend spelled it in more
    than one way (a name in pieces or repeated, arguments stated twice). Duplicates are
    left out; each text is parsed once."""
    names = list(dict.fromkeys(names)) or [""]
    out: list[ToolCall] = []
    for text in dict.fromkeys(texts or [""]):
        parsed = ToolCall.of(call_id, "", text).parsed_arguments
        out.extend(ToolCall(call_id, name, text, parsed, item_type) for name in names)
    return out


def strict_json(text: str, shadowed: list[Any]) -> Any:
    """``text`` decoded as strict JSON: no ``NaN`` or ``Infinity``, no control character
    inside a string, no BOM. A key given twice keeps its last value, as clients decode
    it; the values it had before are appended to ``shadowed``. Raises ``ValueError``."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                shadowed.append(obj[key])
            obj[key] = value
        return obj

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=_not_json)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


@lru_cache(maxsize=32)  # a call spelled in several versions has the same arguments
def argument_texts(arguments: str) -> tuple[str, ...]:
    """Every text of ``arguments`` that a client or a tool may act on, for
    ``argument_patterns``: the arguments as written; when they are strict JSON, every
    string and every object key once decoded (so that a ``\\u0072m`` escape hides
    nothing), the values of a key given twice, a list of strings joined by spaces (an
    argument vector: ``["rm", "-rf", "/"]``) and a string that is itself a JSON object or
    array, decoded in turn; when they are not, the text with its JSON escapes decoded and
    each of its complete string literals decoded on its own: what a lenient parser reads
    (the anthropic SDK parses a streamed input with ``jiter`` in partial mode, which
    takes the first value, ignores what follows and closes what is left open), so that a
    pattern anchored at a value's start (``^/etc/``) still sees the value."""
    texts = [arguments]
    shadowed: list[Any] = []
    try:
        value = strict_json(arguments, shadowed)
    except ValueError:
        unescaped = _unescape(arguments)
        if unescaped != arguments:
            texts.append(unescaped)
        texts.extend(_string_literals(arguments))
        return tuple(texts)
    _collect(value, texts, _NESTED_DEPTH)
    for old in shadowed:
        _collect(old, texts, _NESTED_DEPTH)
    return tuple(texts)


def _collect(value: Any, out: list[str], depth: int) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            if depth and item.lstrip()[:1] in ("{", "["):
                nested: list[Any] = []
                try:
                    decoded = strict_json(item, nested)
                except ValueError:
                    continue
                for inner in (decoded, *nested):
                    _collect(inner, out, depth - 1)
        elif isinstance(item, dict):
            out.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            if len(item) > 1 and all(isinstance(part, str) for part in item):
                out.append(" ".join(item))
            stack.extend(item)


_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _string_literals(text: str) -> list[str]:
    """Each complete JSON string literal of ``text``, decoded (left to right, as a parser
    meets them)."""
    if '"' not in text:
        return []
    return [_unescape(match.group()[1:-1]) for match in _STRING_LITERAL.finditer(text)]


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


_ESCAPE = re.compile(r'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def _unescape(text: str) -> str:
    """``text`` with its JSON string escapes decoded wherever they stand (a surrogate
    pair as the one character it encodes)."""
    if "\\" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        return chr(int(code, 16)) if code else _SIMPLE_ESCAPES[match.group(2)]

    decoded = _ESCAPE.sub(replace, text)
    return decoded.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def text_of(value: Any) -> str:
    """``value`` when it is a string, else ``""``."""
    return value if isinstance(value, str) else ""


def json_text(value: Any) -> str:
    """A field holding arguments, as text: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()
