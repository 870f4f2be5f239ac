"""How a reader (a judge, a log) sees OpenAI-family bodies: chat completions, legacy
completions and the Responses API share these shapes' text forms.

``request_text`` renders a conversation as ``role: text`` paragraphs, ``answer_text``
a buffered answer, ``stream_text`` the text one stream event adds, per choice; tool calls
appear as ``[tool call] name: arguments``. The chat, completions and Responses dialects
use them; the Messages dialect has its own.
"""

from __future__ import annotations

from typing import Any


def _content_text(content: Any) -> str:
    """A message's ``content``: a string, or its parts (non-text parts named by type)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if isinstance(part, dict):
            text = part.get("text", part.get("refusal"))
            parts.append(text if isinstance(text, str) else f"[{part.get('type', 'part')}]")
        elif isinstance(part, str):
            parts.append(part)
    return "\n".join(parts)


def _call_text(call: Any) -> str:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return ""
    name, arguments = function.get("name") or "", function.get("arguments") or ""
    return f"[tool call] {name}: {arguments}"


def _message_text(message: dict[str, Any]) -> str:
    """A chat message, or a Responses API item: its text, then its tool calls."""
    if message.get("type") == "function_call":
        return _call_text(message)
    lines = [_content_text(message.get("content"))]
    lines.extend(message[key] for key in ("refusal", "output") if isinstance(message.get(key), str))
    lines.extend(_call_text(call) for call in message.get("tool_calls") or ())
    if message.get("function_call"):
        lines.append(_call_text(message["function_call"]))
    return "\n".join(line for line in lines if line)


def request_text(payload: Any) -> str:
    """The conversation in a request, one ``role: text`` paragraph per message."""
    if not isinstance(payload, dict):
        return ""
    paragraphs = []
    if isinstance(payload.get("instructions"), str):  # the Responses API's system prompt
        paragraphs.append(f"system: {payload['instructions']}")
    for key in ("messages", "input", "prompt"):
        value = payload.get(key)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str) and item:
                paragraphs.append(f"user: {item}")
            elif isinstance(item, dict) and (text := _message_text(item)):
                paragraphs.append(f"{item.get('role') or item.get('type') or 'item'}: {text}")
    return "\n\n".join(paragraphs)


def answer_text(payload: Any) -> str:
    """The answer in a buffered response: each choice's text and tool calls."""
    if not isinstance(payload, dict):
        return ""
    texts: list[str] = []
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                texts.append(_message_text(choice["message"]))
            elif isinstance(choice, dict) and isinstance(choice.get("text"), str):
                texts.append(choice["text"])  # legacy completions
    elif isinstance(payload.get("output"), list):  # the Responses API
        parts = [_message_text(item) for item in payload["output"] if isinstance(item, dict)]
        return "\n".join(part for part in parts if part)
    return join_choices(dict(enumerate(texts)))


def join_choices(texts: dict[int, str]) -> str:
    texts = {index: text for index, text in texts.items() if text}
    if len(texts) <= 1:
        return "".join(texts.values())
    return "\n\n".join(f"[choice {index}]\n{text}" for index, text in sorted(texts.items()))


def stream_text(data: dict[str, Any], state: dict[Any, Any]) -> list[tuple[int, str]]:
    """The text one event adds, per choice (``state``: what this stream has shown so far,
    kept by the caller)."""
    out: list[tuple[int, str]] = []
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            _choice_text(choice.get("index", 0), choice, state, out)
    kind = data.get("type")
    if isinstance(kind, str):  # Responses API events
        item = data.get("item")
        if kind == "response.output_item.added" and isinstance(item, dict):
            if item.get("type") == "function_call":
                out.append((0, f"\n[tool call] {item.get('name') or ''}: "))
        elif kind.endswith(".delta") and isinstance(data.get("delta"), str):
            out.append((0, data["delta"]))
    return out


def _choice_text(
    index: int, choice: dict[str, Any], state: dict[Any, Any], out: list[tuple[int, str]]
) -> None:
    if isinstance(choice.get("text"), str):
        out.append((index, choice["text"]))
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    for name, value in delta.items():
        if isinstance(value, str) and name != "role":
            out.append((index, value))
    calls = list(delta.get("tool_calls") or ())
    if isinstance(delta.get("function_call"), dict):
        calls.append({"index": -1, "function": delta["function_call"]})
    for call in calls:
        if not isinstance(call, dict):
            continue
        function: Any = call.get("function")
        if not isinstance(function, dict):
            function = {}
        name, arguments = function.get("name"), function.get("arguments")
        if (key := (index, call.get("index", 0))) not in state:
            state[key] = True
            out.append((index, "\n[tool call] "))
        if isinstance(name, str):
            out.append((index, f"{name}: "))
        if isinstance(arguments, str):
            out.append((index, arguments))
