"""A recorded transaction as a conversation: the turns of its request and of its answer,
for each dialect the proxy speaks, in one shape the console renders.

A turn is ``{"role", "kind", "text", "name"}``: ``kind`` is ``text``, ``thinking``,
``tool_call`` (``name`` the tool, ``text`` its arguments) or ``tool_result`` (``name`` the
call's id). Whatever a body holds that is not one of these is left to the raw JSON view
beside it: this view reads, it never decides anything.
"""

from __future__ import annotations

import json
from typing import Any

Turn = dict[str, str]


def request_turns(endpoint: str, body: Any) -> list[Turn]:
    if not isinstance(body, dict):
        return []
    if endpoint.endswith("/messages"):
        turns = _system(body.get("system"))
        for message in _list(body.get("messages")):
            if isinstance(message, dict):
                turns += _anthropic_content(str(message.get("role", "")), message.get("content"))
        return turns
    if endpoint.endswith("/responses"):
        turns = []
        if isinstance(body.get("instructions"), str):
            turns.append(_turn("system", "text", body["instructions"]))
        given = body.get("input")
        if isinstance(given, str):
            return [*turns, _turn("user", "text", given)]
        for item in _list(given):
            turns += _responses_item(item, default_role="user")
        return turns
    if endpoint.endswith("/completions") and "prompt" in body and "messages" not in body:
        prompt = body.get("prompt")
        texts = prompt if isinstance(prompt, list) else [prompt]
        return [_turn("user", "text", t) for t in texts if isinstance(t, str)]
    turns = []
    for message in _list(body.get("messages")):
        if isinstance(message, dict):
            turns += _chat_message(message)
    return turns


def answer_turns(endpoint: str, sent: Any) -> list[Turn]:
    """The answer as the client got it: the buffered body, or the assembled stream."""
    if not isinstance(sent, dict):
        return []
    stream = sent.get("stream")
    body = stream if isinstance(stream, dict) else sent.get("body")
    if not isinstance(body, dict):
        return []
    if endpoint.endswith("/messages"):
        message = body.get("message", body)
        if isinstance(message, dict):
            return _anthropic_content("assistant", message.get("content"))
        return []
    if isinstance(body.get("output"), list):  # a Responses object
        turns: list[Turn] = []
        for item in body["output"]:
            turns += _responses_item(item, default_role="assistant")
        return turns
    turns = []
    for choice in _list(body.get("choices")):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            turns += _chat_message({"role": "assistant", **message})
        elif isinstance(choice.get("text"), str):
            turns.append(_turn("assistant", "text", choice["text"]))
    return turns


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _turn(role: str, kind: str, text: Any, name: Any = "") -> Turn:
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False, indent=2)
    return {
        "role": role,
        # the role is the client's text: only a known one becomes a class name
        "role_class": role if role in ROLES else "other",
        "kind": kind,
        "text": text,
        "name": str(name or ""),
    }


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _parts_text(content: Any, *, typed: bool = False, apart: bool = False) -> str | None:
    """The text of a content given as a string or as parts with ``text``, joined as the
    record's redaction reads them as one text (``TextSlot.joins``), never wider: a key
    split across strings the record reads apart is redacted in neither, and must not be
    shown whole. ``typed``: only ``type: text`` parts are one text (Anthropic's blocks),
    the others each a line of their own; ``apart``: every part a line of its own (a
    Responses reasoning summary)."""
    if isinstance(content, str):
        return content
    lines: list[str] = []
    joined: str | None = None  # the text being joined, not yet a line
    for part in _list(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            continue
        if apart or (typed and part.get("type") != "text"):
            if joined is not None:
                lines.append(joined)
                joined = None
            lines.append(part["text"])
        else:
            joined = part["text"] if joined is None else joined + part["text"]
    if joined is not None:
        lines.append(joined)
    return "\n".join(lines) if lines else None


def _system(system: Any) -> list[Turn]:
    text = _parts_text(system, typed=True)
    return [_turn("system", "text", text)] if text else []


def _chat_message(message: dict[str, Any]) -> list[Turn]:
    role = str(message.get("role", ""))
    turns: list[Turn] = []
    if role == "tool":
        return [
            _turn(
                "tool",
                "tool_result",
                _parts_text(message.get("content")) or "",
                message.get("tool_call_id"),
            )
        ]
    for key, kind in (("reasoning_content", "thinking"), ("reasoning", "thinking")):
        if isinstance(message.get(key), str) and message[key]:
            turns.append(_turn(role, kind, message[key]))
    text = _parts_text(message.get("content"))
    if text:
        turns.append(_turn(role, "text", text))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        turns.append(_turn(role, "text", message["refusal"], "refusal"))
    for call in _list(message.get("tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            turns.append(
                _turn(role, "tool_call", _pretty(function.get("arguments")), function.get("name"))
            )
    return turns


def _anthropic_content(role: str, content: Any) -> list[Turn]:
    if isinstance(content, str):
        return [_turn(role, "text", content)]
    turns: list[Turn] = []
    for block in _list(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if not isinstance(kind, str):
            continue
        if kind == "text":
            turns.append(_turn(role, "text", block.get("text", "")))
        elif kind == "thinking":
            turns.append(_turn(role, "thinking", block.get("thinking", "")))
        elif kind in ("tool_use", "server_tool_use"):
            turns.append(_turn(role, "tool_call", block.get("input", {}), block.get("name")))
        elif kind == "tool_result":
            result = _parts_text(block.get("content"), typed=True)
            turns.append(
                _turn(
                    role,
                    "tool_result",
                    result if result is not None else block.get("content"),
                    block.get("tool_use_id"),
                )
            )
    return turns


def _responses_item(item: Any, default_role: str) -> list[Turn]:
    if not isinstance(item, dict):
        return []
    kind = item.get("type", "message")
    if not isinstance(kind, str):
        return [_turn("user", "text", item, "item of an unknown type")]
    if kind == "message":
        text = _parts_text(item.get("content"))
        return [_turn(str(item.get("role", default_role)), "text", text)] if text else []
    if kind == "reasoning":
        text = _parts_text(item.get("summary"), apart=True)
        return [_turn("assistant", "thinking", text)] if text else []
    if kind == "function_call_output":
        return [_turn("tool", "tool_result", item.get("output", ""), item.get("call_id"))]
    if kind.endswith("_call"):  # function_call and the built-in tools' calls
        if kind == "function_call":
            return [
                _turn("assistant", "tool_call", _pretty(item.get("arguments")), item.get("name"))
            ]
        shown = {k: v for k, v in item.items() if k not in ("type", "id", "status")}
        return [_turn("assistant", "tool_call", shown, item.get("name") or kind)]
    return []


def _pretty(arguments: Any) -> str:
    """Tool-call arguments (JSON text) indented when they are JSON, as written if not."""
    if isinstance(arguments, str):
        try:
            return json.dumps(json.loads(arguments), ensure_ascii=False, indent=2)
        except ValueError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False, indent=2)
