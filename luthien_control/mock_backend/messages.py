"""Anthropic's Messages API (``/v1/messages``): a message object, or its event stream.

The answer is planned once (``plan``) as content blocks: a ``thinking`` block when
``x-mock-thinking`` asks for one (signed), the ``text`` block (the scripted text or the
echo, none when only tool calls were scripted), then one ``tool_use`` block per scripted
tool call, whose ``input`` is the call's arguments, a JSON object, exactly as scripted.
A request whose last message holds a ``tool_result`` block is answered without tool calls.

Streamed, every event is ``event: <type>`` plus ``data: <json>`` carrying the same
``type``: ``message_start`` (no content yet), then per block ``content_block_start``,
its ``content_block_delta`` events (``thinking_delta`` pieces and one ``signature_delta``,
``text_delta`` pieces, ``input_json_delta`` pieces after an empty one) and
``content_block_stop``, a ``ping`` after the first block's start, then ``message_delta``
(``stop_reason``, ``usage.output_tokens``) and ``message_stop``.

Usage: ``input_tokens`` counts the words of ``system`` and of the messages' text (tool
results included); ``output_tokens`` counts the deltas (thinking, text, input fragments,
the empty first fragment and the signature aside). When they would exceed ``max_tokens``
the answer stops there with ``stop_reason`` ``max_tokens``: thinking and text are cut,
tool calls that do not fit are left out.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from luthien_control.mock_backend import errors
from luthien_control.mock_backend.content import Reply, new_id, split_content
from luthien_control.mock_backend.models import is_known_model
from luthien_control.mock_backend.scenario import DirectiveError, Scenario

MESSAGE_ID_PREFIX = "msg_mock_"
TOOL_USE_ID = "toolu_mock_{}"
START_OUTPUT_TOKENS = 1  # what message_start reports before anything was generated
PING_EVENT = b'event: ping\ndata: {"type": "ping"}\n\n'
MESSAGE_STOP_EVENT = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
GARBAGE_EVENT = b"event: content_block_delta\ndata: this is not json\n\n"

_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'


def check_request(body: Any, *, needs_max_tokens: bool = True) -> errors.ErrorResponse | None:
    """The first problem with a Messages request, or None. No stricter than Anthropic:
    only ``model``, ``messages``, ``max_tokens`` and ``stream`` are looked at."""
    if not isinstance(body, dict):
        return errors.anthropic(400, "The request body is not a valid JSON object.")
    required: tuple[tuple[str, str, type], ...] = (
        ("model", "string", str),
        ("messages", "list", list),
    )
    if needs_max_tokens:
        required += (("max_tokens", "integer", int),)
    for name, kind, expected in required:
        if name not in body:
            return errors.anthropic(400, f"{name}: Field required")
        value = body[name]
        if not isinstance(value, expected) or isinstance(value, bool):
            return errors.anthropic(400, f"{name}: Input should be a valid {kind}")
    if needs_max_tokens and body["max_tokens"] < 1:
        return errors.anthropic(400, "max_tokens: Input should be greater than or equal to 1")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return errors.anthropic(400, "stream: Input should be a valid boolean")
    if not is_known_model(body["model"]):
        return errors.anthropic(404, f"model: {body['model']}")
    return None


def block_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or its text blocks and the text of
    its tool results, joined by spaces."""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif block.get("type") == "tool_result":
                texts.append(block_text(block.get("content")))
    return " ".join(text for text in texts if text)


def last_user_text(messages: Sequence[Any]) -> str:
    """The text of the last ``user`` message, the default reply's echo."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return block_text(message.get("content"))
    return ""


def ends_with_tool_result(messages: Sequence[Any]) -> bool:
    """Whether the last message carries a ``tool_result`` block (the answer to a call)."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or not isinstance(last.get("content"), list):
        return False
    return any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in last["content"]
    )


def input_tokens(body: dict[str, Any]) -> int:
    """The words of ``system`` and of every message's text."""
    texts = [block_text(body.get("system"))]
    texts.extend(
        block_text(message.get("content"))
        for message in body["messages"]
        if isinstance(message, dict)
    )
    return sum(len(text.split()) for text in texts)


def signature(thinking: str) -> str:
    """A deterministic stand-in for the opaque signature of a thinking block."""
    return base64.b64encode(hashlib.sha256(b"luthien-mock:" + thinking.encode()).digest()).decode()


@dataclass(slots=True)
class _Block:
    """One content block: how it starts, its deltas, and its complete JSON."""

    start: dict[str, Any]
    deltas: list[dict[str, Any]] = field(default_factory=list)
    complete: bytes = b""


@dataclass(slots=True)
class Plan:
    """The planned answer to one Messages request."""

    blocks: list[_Block]
    stop_reason: str
    usage: dict[str, int]

    @property
    def output_tokens(self) -> int:
        return self.usage["output_tokens"]


def plan(scenario: Scenario, body: dict[str, Any]) -> Plan:
    """The answer to ``body`` (checked by ``check_request``) as scripted by ``scenario``.

    Raises ``DirectiveError`` when a scripted tool call's arguments are not a JSON object.
    """
    messages: list[Any] = body["messages"]
    if ends_with_tool_result(messages):
        scenario = scenario.without_tool_calls()
    reply = Reply.for_text(scenario, last_user_text, messages)
    inputs = [_tool_input(call.name, call.arguments) for call in reply.tool_calls]
    budget: int = body["max_tokens"]
    cut = False
    blocks: list[_Block] = []

    if scenario.thinking is not None:
        pieces = split_content(
            scenario.thinking, chunk_size=scenario.chunk_size, chunks=scenario.chunks
        )
        kept = pieces[:budget]
        budget -= len(kept)
        cut = len(kept) < len(pieces)
        thinking = "".join(kept) if cut else scenario.thinking
        sign = signature(thinking)
        block = _Block({"type": "thinking", "thinking": "", "signature": ""})
        block.deltas = [{"type": "thinking_delta", "thinking": piece} for piece in kept]
        block.deltas.append({"type": "signature_delta", "signature": sign})
        block.complete = orjson.dumps({"type": "thinking", "thinking": thinking, "signature": sign})
        blocks.append(block)

    if reply.content is not None:
        kept = reply.deltas[:budget]
        budget -= len(kept)
        text_cut = len(kept) < len(reply.deltas)
        if kept or not text_cut:  # no text block when not one delta of it fits
            text = "".join(kept) if text_cut else reply.content
            block = _Block({"type": "text", "text": ""})
            block.deltas = [{"type": "text_delta", "text": piece} for piece in kept]
            block.complete = orjson.dumps({"type": "text", "text": text})
            blocks.append(block)
        cut = cut or text_cut

    calls = 0
    for index, (call, fragments, raw) in enumerate(
        zip(reply.tool_calls, reply.fragments, inputs, strict=True)
    ):
        if cut or len(fragments) > budget:
            cut = True
            break
        budget -= len(fragments)
        calls += 1
        tool_id = TOOL_USE_ID.format(index)
        block = _Block({"type": "tool_use", "id": tool_id, "name": call.name, "input": {}})
        block.deltas = [
            {"type": "input_json_delta", "partial_json": piece} for piece in ["", *fragments]
        ]
        head = orjson.dumps({"type": "tool_use", "id": tool_id, "name": call.name})
        block.complete = head[:-1] + b',"input":' + raw + b"}"
        blocks.append(block)

    stop_reason = "max_tokens" if cut else "tool_use" if calls else "end_turn"
    output_tokens = body["max_tokens"] - budget
    usage = {
        "input_tokens": input_tokens(body),
        "cache_creation_input_tokens": scenario.cache_creation_tokens,
        "cache_read_input_tokens": scenario.cache_read_tokens,
        "output_tokens": output_tokens,
    }
    return Plan(blocks, stop_reason, usage)


def _tool_input(name: str, arguments: str) -> bytes:
    raw = arguments.encode()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise DirectiveError(
            "x-mock-tool-calls", f"the arguments of {name!r} must be a JSON object on /v1/messages"
        )
    return raw


def _head(model: str) -> bytes:
    """``{"id":...,"type":"message","role":"assistant","model":...`` without the brace."""
    message = {"id": new_id(MESSAGE_ID_PREFIX), "type": "message", "role": "assistant"}
    return orjson.dumps({**message, "model": model})[:-1]


def message_json(answer: Plan, model: str) -> bytes:
    """The non-streamed message; tool inputs as scripted, byte for byte."""
    tail = {"stop_reason": answer.stop_reason, "stop_sequence": None, "usage": answer.usage}
    return (
        _head(model)
        + b',"content":['
        + b",".join(block.complete for block in answer.blocks)
        + b"],"
        + orjson.dumps(tail)[1:]
    )


def message_stream(answer: Plan, model: str) -> list[bytes]:
    """Every event of the streamed message, in order, ``message_stop`` last."""
    start_usage = {**answer.usage, "output_tokens": START_OUTPUT_TOKENS}
    start_tail = {"stop_reason": None, "stop_sequence": None, "usage": start_usage}
    message = _head(model) + b',"content":[],' + orjson.dumps(start_tail)[1:]
    events = [_event(b"message_start", b'{"type":"message_start","message":' + message + b"}")]
    for index, block in enumerate(answer.blocks):
        position = str(index).encode()
        start = {"type": "content_block_start", "index": index, "content_block": block.start}
        events.append(_event(b"content_block_start", orjson.dumps(start)))
        if index == 0:
            events.append(PING_EVENT)
        head = _DELTA_HEAD + position + b',"delta":'
        events.extend(head + orjson.dumps(delta) + b"}\n\n" for delta in block.deltas)
        events.append(
            _event(
                b"content_block_stop", b'{"type":"content_block_stop","index":' + position + b"}"
            )
        )
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": answer.output_tokens},
    }
    events.append(_event(b"message_delta", orjson.dumps(delta)))
    events.append(MESSAGE_STOP_EVENT)
    return events


def count_tokens_json(body: dict[str, Any]) -> bytes:
    """The answer of ``/v1/messages/count_tokens``: the ``input_tokens`` of the request."""
    return orjson.dumps({"input_tokens": input_tokens(body)})


def _event(kind: bytes, data: bytes) -> bytes:
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"
