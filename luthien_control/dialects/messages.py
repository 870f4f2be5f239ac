"""Anthropic's Messages API (``/messages``): the only module that knows its shapes.

Requests: ``system`` (a string or text blocks) and ``messages`` whose ``content`` is a
string or a list of blocks (``text``, ``thinking``, ``tool_use`` with an ``input``
object, ``tool_result`` with a string or blocks). Buffered answers: a ``message`` with
``content`` blocks, ``stop_reason`` and ``usage``. Streams: named events
(``message_start``, ``content_block_start``, ``content_block_delta``,
``content_block_stop``, ``message_delta``, ``message_stop``, ``ping``, ``error``); each
content block's deltas (``text_delta``, ``thinking_delta``, ``input_json_delta``) are a
channel the SDK joins, closed by the block's ``content_block_stop``. A complete stream
ends with ``message_stop``; a failure after it began ends it with ``event: error``.
Errors are ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from luthien_control.dialects.base import (
    ChannelKey,
    Dialect,
    Released,
    StreamAssembler,
    StreamRules,
    TextSlot,
    request_model,
    sse,
    string_slots,
)
from luthien_control.exceptions import BackendBroken, MalformedRequest
from luthien_control.sse import Chunk

if TYPE_CHECKING:
    from luthien_control.dialects.tool_calls import ToolCalls
    from luthien_control.policies.tools.hold import CallJudge
    from luthien_control.transaction import StreamTransform, Transaction, Usage

# content_block_delta types → (the field holding their text, the channel, its kind)
_DELTAS = {
    "text_delta": ("text", "text", "text"),
    "thinking_delta": ("thinking", "thinking", "reasoning"),
    "input_json_delta": ("partial_json", "input", "arguments"),
}
_CHANNEL_DELTA = {channel: (kind, name) for kind, (name, channel, _) in _DELTAS.items()}
# content_block_start blocks whose first text the deltas continue.
_START_TEXT = {"text": ("text", "text", "text"), "thinking": ("thinking", "thinking", "reasoning")}

# HTTP status → Anthropic's error type.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


@dataclass(slots=True)
class MessagesAssembler:
    """Folds Messages stream events into the message they spell out."""

    chunks: int = 0
    usage: dict[str, Any] | None = None
    terminal: str | None = None
    message: dict[str, Any] = field(default_factory=dict)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    partial: dict[int, list[str]] = field(default_factory=dict)  # tool inputs as JSON text
    stopped: set[int] = field(default_factory=set)  # blocks whose content_block_stop came
    # Text and thinking deltas per (block, channel), joined when read: appending to a
    # block's growing string would copy it whole at every delta (quadratic in its size).
    pieces: dict[tuple[int, str], list[str]] = field(default_factory=dict)

    def copy(self) -> MessagesAssembler:
        return MessagesAssembler(
            self.chunks,
            dict(self.usage) if self.usage is not None else None,
            self.terminal,
            dict(self.message),
            {index: dict(block) for index, block in self.blocks.items()},
            {index: list(parts) for index, parts in self.partial.items()},
            set(self.stopped),
            {key: list(parts) for key, parts in self.pieces.items()},
        )

    def feed(self, data: Any) -> None:
        self.chunks += 1
        if type(data) is not dict:
            return
        kind = data.get("type")
        if kind == "content_block_delta":
            delta = data.get("delta")
            index = data.get("index")
            block = self.blocks.get(index) if type(index) is int else None
            if type(delta) is not dict or block is None:
                return
            spec = _DELTAS.get(delta.get("type"))  # type: ignore[arg-type]
            text = delta.get(spec[0]) if spec is not None else None
            if spec is None or type(text) is not str:
                if delta.get("type") == "signature_delta":
                    block["signature"] = delta.get("signature")  # replaced, as the SDK does
                return
            if spec[1] == "input":
                self.partial.setdefault(data["index"], []).append(text)
            else:
                self.pieces.setdefault((data["index"], spec[1]), []).append(text)
        elif kind == "content_block_start":
            block = data.get("content_block")
            if type(block) is dict and type(data.get("index")) is int:
                self.blocks[data["index"]] = dict(block)
        elif kind == "message_start":
            message = data.get("message")
            if type(message) is dict:
                self.message = {k: v for k, v in message.items() if k != "content"}
                self._usage(message.get("usage"))
        elif kind == "message_delta":
            delta = data.get("delta")
            if type(delta) is dict:
                self.message.update(delta)
            self._usage(data.get("usage"))
        elif kind == "content_block_stop":
            if type(data.get("index")) is int:
                self.stopped.add(data["index"])
        elif kind in ("message_stop", "error"):
            self.terminal = kind

    def _usage(self, usage: Any) -> None:
        if type(usage) is dict:  # a null leaves the count as it was (as the SDK does)
            self.usage = {**(self.usage or {}), **{k: v for k, v in usage.items() if v is not None}}

    def content(self) -> list[dict[str, Any]]:
        """The content blocks, tool inputs parsed (left as text when not JSON)."""
        out = []
        for index, block in sorted(self.blocks.items()):
            block = dict(block)
            for channel in ("text", "thinking"):
                parts = self.pieces.get((index, channel))
                if parts is not None:
                    block[channel] = (block.get(channel) or "") + "".join(parts)
            text = "".join(self.partial.get(index, ()))
            if text:  # as the SDK: empty deltas leave the start's input
                try:
                    block["input"] = orjson.loads(text)
                except orjson.JSONDecodeError:
                    block["input"] = text
            out.append(block)
        return out

    def summary(self) -> dict[str, Any]:
        message = {**self.message, "role": "assistant", "content": self.content()}
        if self.usage is not None:
            message["usage"] = self.usage
        return {"chunks": self.chunks, "message": message}


def _block_slots(
    block: Any, key: ChannelKey, slots: list[TextSlot], joins: ChannelKey | None = None
) -> None:
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        slots.append(TextSlot(key, block, "text", "text", joins))
    elif kind == "thinking" and isinstance(block.get("thinking"), str):
        slots.append(TextSlot(key, block, "thinking", "reasoning"))
    elif kind in ("tool_use", "server_tool_use"):
        if isinstance(block.get("name"), str):
            slots.append(TextSlot((*key, "name"), block, "name", "name"))
        slots.extend(string_slots(block.get("input"), (*key, "input"), "arguments"))
    elif kind == "tool_result":
        _content_slots(block.get("content"), (*key, "content"), slots)


def _content_slots(content: Any, key: ChannelKey, slots: list[TextSlot]) -> None:
    """The texts of content blocks; their text blocks are read as one text (the SDK's
    ``get_final_text()`` joins them, a model reads a message's blocks so)."""
    if isinstance(content, str):
        return  # the caller adds it: only it knows the holder
    for index, block in enumerate(content if isinstance(content, list) else ()):
        _block_slots(block, (*key, index), slots, key)


def _blocks_text(content: Any) -> str:
    """A string, or content blocks as a reader sees them (tool calls and results named)."""
    if isinstance(content, str):
        return content
    lines = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            lines.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            lines.append(f"[thinking] {block['thinking']}")
        elif kind in ("tool_use", "server_tool_use"):
            arguments = orjson.dumps(block.get("input")).decode()
            lines.append(f"[tool call] {block.get('name') or ''}: {arguments}")
        elif kind == "tool_result":
            lines.append(f"[tool result] {_blocks_text(block.get('content'))}")
        else:
            lines.append(f"[{kind}]")
    return "\n".join(line for line in lines if line)


class AnthropicDialect(Dialect):
    """Any ``/messages/*`` route (``count_tokens``): Anthropic's error shapes, raw bodies."""

    name = "anthropic"
    vendor = "anthropic"

    def error_body(
        self, exc: BaseException, transaction_id: str, *, dev: bool
    ) -> tuple[int, dict[str, Any]]:
        status, payload = super().error_body(exc, transaction_id, dev=dev)
        return status, {
            "type": "error",
            "error": {"type": error_type(status), "message": payload["error"]["message"]},
        }

    def error_event(
        self, exc: BaseException, tx: Transaction, sent: StreamAssembler, *, dev: bool
    ) -> bytes:
        _, payload = self.error_body(exc, tx.id, dev=dev)
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessagesDialect(AnthropicDialect):
    """``POST /messages``."""

    name = "messages"

    def request_tool_calls(self, payload: Any) -> ToolCalls:
        from luthien_control.dialects import messages_tools

        return messages_tools.history_calls(payload)

    def answer_tool_calls(self, payload: Any) -> ToolCalls:
        from luthien_control.dialects import messages_tools

        return messages_tools.answer_calls(payload)

    def tool_call_holder(self, judge: CallJudge) -> StreamTransform:
        from luthien_control.dialects.messages_tools import MessagesCalls

        return MessagesCalls(judge)

    def validate_request(self, payload: Any) -> None:
        """What Anthropic itself refuses, no more: agents send fields the docs do not
        list (Claude Code puts a ``system`` role message inside ``messages``)."""
        if not isinstance(payload, dict):
            raise MalformedRequest("the request body must be a JSON object")
        if not isinstance(payload.get("model"), str):
            raise MalformedRequest("model: Field required", param="model")
        if not isinstance(payload.get("messages"), list):
            raise MalformedRequest("messages: Field required", param="messages")
        tokens = payload.get("max_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise MalformedRequest("max_tokens: Field required", param="max_tokens")

    def request_slots(self, payload: Any) -> list[TextSlot]:
        slots: list[TextSlot] = []
        if not isinstance(payload, dict):
            return slots
        system = payload.get("system")
        if isinstance(system, str):
            slots.append(TextSlot(("system",), payload, "system", "text"))
        else:
            _content_slots(system, ("system",), slots)
        messages = payload.get("messages")
        for index, message in enumerate(messages if isinstance(messages, list) else ()):
            if not isinstance(message, dict):
                continue
            if isinstance(message.get("content"), str):
                slots.append(TextSlot(("messages", index), message, "content", "text"))
            else:
                _content_slots(message.get("content"), ("messages", index), slots)
        return slots

    def answer_slots(self, payload: Any) -> list[TextSlot]:
        slots: list[TextSlot] = []
        if isinstance(payload, dict):
            _content_slots(payload.get("content"), ("content",), slots)
        return slots

    def usage(self, raw: dict[str, Any]) -> Usage:
        """Prompt tokens are every token the model read: plain input and the cache's."""
        from luthien_control.transaction import Usage

        read = [raw.get(name) for name in _INPUT_FIELDS]
        output = raw.get("output_tokens")
        counts = [n for n in (*read, output) if isinstance(n, int) and not isinstance(n, bool)]
        prompt = sum(n for n in read if isinstance(n, int) and not isinstance(n, bool))
        return Usage(
            prompt_tokens=prompt if any(isinstance(n, int) for n in read) else None,
            completion_tokens=output if isinstance(output, int) else None,
            total_tokens=sum(counts) if counts else None,
            raw=raw,
        )

    def request_text(self, payload: Any) -> str:
        if not isinstance(payload, dict):
            return ""
        paragraphs = []
        system = _blocks_text(payload.get("system"))
        if system:
            paragraphs.append(f"system: {system}")
        messages = payload.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict) and (text := _blocks_text(message.get("content"))):
                paragraphs.append(f"{message.get('role') or 'user'}: {text}")
        return "\n\n".join(paragraphs)

    def answer_text(self, payload: Any) -> str:
        return _blocks_text(payload.get("content")) if isinstance(payload, dict) else ""

    def stream_text(self, data: dict[str, Any], state: dict[Any, Any]) -> list[tuple[int, str]]:
        kind = data.get("type")
        if kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, dict) and block.get("type") in _CALL_BLOCKS:
                given = block.get("input")  # input in the start itself, not in deltas
                arguments = orjson.dumps(given).decode() if given else ""
                return [(0, f"\n[tool call] {block.get('name') or ''}: {arguments}")]
        return [(0, slot.text) for slot in self.text_slots(data) if slot.text]

    def new_assembler(self) -> MessagesAssembler:
        return MessagesAssembler()

    def text_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        kind = data.get("type")
        index = data.get("index")
        if kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, dict):
                spec = _DELTAS.get(delta.get("type"))  # type: ignore[arg-type]
                if spec is not None and isinstance(delta.get(spec[0]), str):
                    return [TextSlot((index, spec[1]), delta, spec[0], spec[2])]
        elif kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, dict):
                start = _START_TEXT.get(block.get("type"))  # type: ignore[arg-type]
                if start is not None and isinstance(block.get(start[0]), str):
                    return [TextSlot((index, start[1]), block, start[0], start[2])]
        return []

    def joins(self, key: ChannelKey) -> ChannelKey | None:
        return _TEXT_CHANNELS if key[1:] == ("text",) else None

    def assembled_slots(self, summary: dict[str, Any]) -> list[TextSlot]:
        return self.answer_slots(summary.get("message"))

    def plain_text(self, data: dict[str, Any]) -> tuple[Any, str, ChannelKey] | None:
        if data.get("type") != "content_block_delta":
            return None
        delta = data.get("delta")
        if type(delta) is not dict or delta.get("type") != "text_delta" or len(delta) != 2:
            return None  # (any other field: read by text_slots)
        if type(delta.get("text")) is not str:
            return None
        return delta, "text", (data.get("index"), "text")

    def closing(self, data: dict[str, Any]) -> list[ChannelKey]:
        if data.get("type") == "content_block_stop":
            return [(data.get("index"),)]
        return []

    def release(self, chunk: Chunk, data: dict[str, Any], held: list[Released]) -> list[Chunk]:
        """Held text goes out as one more delta just before ``content_block_stop``."""
        return [*(_delta_event(piece) for piece in held), chunk]

    def release_at_end(self, held: list[Released], template: dict[str, Any]) -> list[Chunk]:
        return [_delta_event(piece) for piece in held]

    def emptied(self, data: dict[str, Any]) -> bool:
        if data.get("type") != "content_block_delta":
            return False
        delta = data.get("delta")
        spec = _DELTAS.get(delta.get("type")) if isinstance(delta, dict) else None  # type: ignore[arg-type]
        return spec is not None and delta[spec[0]] == ""  # type: ignore[index]

    def stream_complete(self, received: Any, *, done: bool, pending: bytes) -> bool:
        return bool(received.terminal == "message_stop")

    def stream_rules(self) -> StreamRules:
        return _MessagesRules()

    def blocked_answer(self, notice: str, tx: Transaction) -> bytes | None:
        return orjson.dumps(
            {
                **_message_head(tx),
                "content": [{"type": "text", "text": notice}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
        )

    def blocked_stream(self, notice: str, tx: Transaction) -> bytes | None:
        start = {
            **_message_head(tx),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse({"type": "message_start", "message": start}, "message_start") + _notice_end(
            0, notice, 0
        )

    def blocked_ending(self, notice: str, tx: Transaction, sent: Any) -> bytes | None:
        calls = [i for i, block in sent.blocks.items() if block.get("type") in _CALL_BLOCKS]
        if any(index not in sent.stopped for index in calls):
            return None  # a tool call cut half-way cannot be taken back: the error ending
        out = [
            sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            for index in sorted(sent.blocks)
            if index not in sent.stopped  # begun, and cut: closed as far as it got
        ]
        index = max(sent.blocks, default=-1) + 1
        output = (sent.usage or {}).get("output_tokens", 0)
        stop = "tool_use" if calls else "end_turn"  # a whole call that passed stays callable
        tokens = output if isinstance(output, int) else 0
        return b"".join(out) + _notice_end(index, notice, tokens, stop)


class _MessagesRules:
    """The order of a Messages stream, as the SDK folds it: ``message_start`` first,
    with no content; blocks one at a time, numbered in order (``content_block_start``
    of block n, its deltas, its ``content_block_stop``); ``message_delta`` with no
    block open; nothing after ``message_stop``. The SDK appends a block's deltas by
    position whatever came before, so anything else would fold text the policies
    never saw into what the client reads."""

    __slots__ = ("_blocks", "_ended", "_open", "_started")

    def __init__(self) -> None:
        self._started = False
        self._blocks = 0  # blocks begun so far
        self._open: int | None = None
        self._ended = False

    def check(self, data: Any, chunk: Chunk) -> None:
        kind = data.get("type") if type(data) is dict else None
        if kind == "ping":
            return
        if kind is not None and chunk.event in (None, "ping"):
            # The SDK leaves out an event named ping or not named at all, whatever its
            # data: the policies would read text the client never folds (a key split
            # around it would reach the client whole).
            raise BackendBroken("the backend's stream has an event its name hides")
        if self._ended:
            raise BackendBroken("the backend's stream went on after message_stop")
        if kind == "message_start":
            message = data.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if self._started or content:
                raise BackendBroken("the backend's message_start is out of place")
            self._started = True
            return
        if not self._started and kind is not None:
            raise BackendBroken("the backend's stream did not begin with message_start")
        index = data.get("index") if kind is not None else None
        if kind == "content_block_start":
            if self._open is not None or index != self._blocks or type(index) is not int:
                raise BackendBroken("the backend's content block begins out of order")
            self._open = index
            self._blocks += 1
        elif kind in ("content_block_delta", "content_block_stop"):
            if self._open is None or index != self._open or type(index) is not int:
                raise BackendBroken("the backend's content block event is out of place")
            if kind == "content_block_stop":
                self._open = None
        elif kind == "message_delta":
            if self._open is not None:
                raise BackendBroken("the backend's message_delta came inside a block")
        elif kind in ("message_stop", "error"):
            self._ended = True


def _message_head(tx: Transaction) -> dict[str, Any]:
    return {
        "id": f"msg_{tx.id}",
        "type": "message",
        "role": "assistant",
        "model": request_model(tx),
    }


def _notice_end(index: int, notice: str, output_tokens: int, stop: str = "end_turn") -> bytes:
    """A text block saying ``notice`` at ``index``, then the message's normal end."""
    return b"".join(
        [
            sse(
                {"type": "content_block_start", "index": index, "content_block": _TEXT},
                "content_block_start",
            ),
            sse(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": notice},
                },
                "content_block_delta",
            ),
            sse({"type": "content_block_stop", "index": index}, "content_block_stop"),
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
                "message_delta",
            ),
            sse({"type": "message_stop"}, "message_stop"),
        ]
    )


_TEXT = {"type": "text", "text": ""}
_TEXT_CHANNELS: ChannelKey = ("text",)  # every text block of an answer: one text
_CALL_BLOCKS = frozenset({"tool_use", "server_tool_use"})
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _delta_event(piece: Released) -> Chunk:
    index, channel = piece.key
    kind, name = _CHANNEL_DELTA[channel]
    delta = {"type": kind, name: piece.text}
    data = {"type": "content_block_delta", "index": index, "delta": delta}
    return Chunk.from_data(data, event="content_block_delta")
