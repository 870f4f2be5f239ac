"""Text rewriting over requests, responses and streams, with bounded hold-back.

A ``TextRewriter`` sees one text channel as it grows (a choice's ``content``, a tool
call's ``arguments``), returns what may go out now and keeps back only what a later
piece could still change: the start of a secret, the digits of a number. ``ChatTextStream``
runs one rewriter per channel over a chat-completion stream; ``rewrite_strings`` applies
the same rewrite to every string of a buffered body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from luthien_control.sse import Chunk

ChannelKey = tuple[int, str, int]  # (choice index, field, tool call index or -1)
RESPONSES_DELTA = "response.output_text.delta"
RESPONSES_DONE = "response.output_text.done"
RESPONSES_ARGUMENTS_DELTA = "response.function_call_arguments.delta"
# Responses API delta events → the text field they belong to; done events → their delta.
RESPONSES_DELTAS = {RESPONSES_DELTA: "content", RESPONSES_ARGUMENTS_DELTA: "arguments"}
_RESPONSES_DONE = {
    RESPONSES_DONE: RESPONSES_DELTA,
    "response.function_call_arguments.done": RESPONSES_ARGUMENTS_DELTA,
}

# Delta fields that are never model text.
_NOT_TEXT = frozenset({"role", "tool_calls", "function_call"})


def _emptied(choice: Any) -> bool:
    """A choice with nothing left in it (its text was all held back)."""
    if not isinstance(choice, dict) or choice.get("finish_reason"):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return all(value == "" or value is None or value == [] for value in delta.values())
    return choice.get("text") == ""


class TextRewriter(Protocol):
    def feed(self, text: str) -> str:
        """Take the next piece of the channel; return the text that may go out now."""
        ...

    def flush(self) -> str:
        """The channel has ended: return what was held back (rewritten)."""
        ...


def rewrite_strings(value: Any, rewrite: Callable[[str], str]) -> tuple[Any, bool]:
    """Apply ``rewrite`` to every string in a JSON value; returns (new value, changed)."""
    if isinstance(value, str):
        new = rewrite(value)
        return new, new != value
    changed = False
    if isinstance(value, dict):
        for key, item in value.items():
            new_item, item_changed = rewrite_strings(item, rewrite)
            if item_changed:
                value[key] = new_item
                changed = True
    elif isinstance(value, list):
        for index, item in enumerate(value):
            new_item, item_changed = rewrite_strings(item, rewrite)
            if item_changed:
                value[index] = new_item
                changed = True
    return value, changed


def iter_strings(value: Any) -> list[str]:
    """Every string in a JSON value (keys excluded)."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


class ChatTextStream:
    """A stream transform that runs a ``TextRewriter`` over every text channel.

    Works on chat-completion chunks (``choices[].delta``: content, refusal, reasoning
    and every other text field, and each tool call's arguments) and on legacy
    completions (``choices[].text``). Held-back text is released into the chunk that
    carries the choice's ``finish_reason``, or into one last chunk when the stream ends.
    Chunks left with nothing in them are dropped; every other chunk keeps its shape.
    """

    def __init__(
        self, make_rewriter: Callable[[], TextRewriter], *, fields: frozenset[str] | None = None
    ) -> None:
        self._make = make_rewriter
        self._fields = fields  # the text fields to rewrite; None: all of them
        self._channels: dict[ChannelKey, TextRewriter] = {}
        self._template: dict[str, Any] | None = None

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        if not isinstance(data, dict):
            return [chunk]
        return self.on_data(chunk, data)

    def on_data(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        """``on_chunk`` for a chunk whose JSON is an object (``data``)."""
        choices = data.get("choices")
        if not choices or not isinstance(choices, list):
            kind = data.get("type")
            field = RESPONSES_DELTAS.get(kind) if isinstance(kind, str) else None
            if field is not None and self._wants(field):
                return self._responses_delta(chunk, data, kind)  # type: ignore[arg-type]
            if kind in _RESPONSES_DONE:
                return self._responses_done(chunk, data, _RESPONSES_DONE[kind])
            return [chunk]
        if self._template is None:
            self._template = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
        changed = False
        for choice in choices:
            # isinstance, not type(): a subclass an earlier policy put there is still
            # text that goes out (orjson writes it as a plain object or string).
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                changed |= self._rewrite_delta(index, delta)
            elif isinstance(choice.get("text"), str) and self._wants("text"):  # completions
                changed |= self._rewrite_field(choice, "text", (index, "text", -1))
            if choice.get("finish_reason"):
                changed |= self._flush_choice(index, choice)
        if not changed:
            return [chunk]
        chunk.mark_changed()
        if "usage" not in data and all(_emptied(choice) for choice in choices):
            return []  # everything it carried is held back: nothing to send yet
        return [chunk]

    async def on_end(self) -> list[Chunk]:
        if not self._channels:
            return []
        choices: dict[int, dict[str, Any]] = {}
        for key in list(self._channels):
            index = key[0]
            choice = choices.setdefault(index, {"index": index, "delta": {}})
            self._flush_into(key, choice)
        choices = {i: c for i, c in choices.items() if c["delta"] or "text" in c}
        if not choices:
            return []
        data = dict(self._template or {})
        data["choices"] = [choices[i] for i in sorted(choices)]
        return [Chunk.from_data(data)]

    def _responses_delta(self, chunk: Chunk, data: dict[str, Any], kind: str) -> list[Chunk]:
        """A Responses API delta (text, or a function call's arguments): one channel per
        output item and content part."""
        if not isinstance(data.get("delta"), str):
            return [chunk]
        key = (data.get("output_index", 0), kind, data.get("content_index", 0))
        if self._rewrite_field(data, "delta", key):
            chunk.mark_changed()
            if data["delta"] == "":
                return []
        return [chunk]

    def _responses_done(self, chunk: Chunk, data: dict[str, Any], kind: str) -> list[Chunk]:
        """The part is complete: what its channel held goes out as one more delta first."""
        key = (data.get("output_index", 0), kind, data.get("content_index", 0))
        rewriter = self._channels.pop(key, None)
        rest = rewriter.flush() if rewriter is not None else ""
        if not rest:
            return [chunk]
        fields: dict[str, Any] = {
            k: data[k] for k in ("item_id", "output_index", "content_index") if k in data
        }
        delta: dict[str, Any] = {
            "type": kind,
            "sequence_number": data.get("sequence_number"),
            **fields,
            "delta": rest,
        }
        if kind == RESPONSES_DELTA:
            delta["logprobs"] = []
        return [Chunk.from_data(delta, event=kind), chunk]

    def _wants(self, field: str) -> bool:
        return self._fields is None or field in self._fields

    def _rewriter(self, key: ChannelKey) -> TextRewriter:
        rewriter = self._channels.get(key)
        if rewriter is None:
            rewriter = self._channels[key] = self._make()
        return rewriter

    def _rewrite_field(self, holder: dict[str, Any], field: str, key: ChannelKey) -> bool:
        text = holder[field]
        out = self._rewriter(key).feed(text)
        if out == text:
            return False
        holder[field] = out
        return True

    def _rewrite_delta(self, index: int, delta: dict[str, Any]) -> bool:
        changed = False
        for field, value in delta.items():
            if isinstance(value, str) and field not in _NOT_TEXT and self._wants(field):
                changed |= self._rewrite_field(delta, field, (index, field, -1))
        if "tool_calls" not in delta or not self._wants("arguments"):
            return changed
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                key = (index, "arguments", call.get("index", 0))
                changed |= self._rewrite_field(function, "arguments", key)
        return changed

    def _flush_choice(self, index: int, choice: dict[str, Any]) -> bool:
        changed = False
        for key in [k for k in self._channels if k[0] == index]:
            changed |= self._flush_into(key, choice)
        return changed

    def _flush_into(self, key: ChannelKey, choice: dict[str, Any]) -> bool:
        rest = self._channels.pop(key).flush()
        if not rest:
            return False
        _, field, call_index = key
        if field == "text":
            choice["text"] = choice.get("text", "") + rest
            return True
        delta = choice.setdefault("delta", {})
        if field != "arguments":
            delta[field] = (delta.get(field) or "") + rest
            return True
        calls = delta.setdefault("tool_calls", [])
        for call in calls:
            if call.get("index", 0) == call_index:
                function = call.setdefault("function", {})
                function["arguments"] = (function.get("arguments") or "") + rest
                return True
        calls.append({"index": call_index, "function": {"arguments": rest}})
        return True
