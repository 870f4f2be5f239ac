"""OpenAI's Responses API (``/responses``): the only module that knows its shapes.

Requests: ``instructions`` and ``input`` (a string or a list of items); buffered answers:
``output`` items; streams: typed events (``event: response.output_text.delta`` and a
``data:`` object with the same ``type``). Every ``*.delta`` event with a string ``delta``
is a channel (output text, refusal, reasoning, reasoning summary, function-call and
custom-tool arguments, audio transcript...), closed by its ``*.done`` event. A stream
ends with a terminal event (``response.completed``, ``response.failed``,
``response.incomplete``); a failure after it began ends it with ``response.failed``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from luthien_control.dialects.base import (
    ChannelKey,
    Dialect,
    Released,
    StreamRules,
    TextSlot,
    request_model,
    sse,
)
from luthien_control.exceptions import BackendBroken
from luthien_control.sse import Chunk

if TYPE_CHECKING:
    from luthien_control.transaction import Transaction

RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
OUTPUT_TEXT_DELTA = "response.output_text.delta"
_OUTPUT_TEXT_BASE = OUTPUT_TEXT_DELTA[:-6]
# The output text of an answer: every output_text part of every message item, read as
# one text (the SDK's ``output_text``).
_OUTPUT_TEXT: ChannelKey = ("output_text",)


def _kind(base: str) -> str:
    """What a delta event's text is, from its type without ``.delta``."""
    if base.endswith(("output_text", "text.annotation")):
        return "text"
    if base.endswith("refusal"):
        return "refusal"
    if "reasoning" in base:
        return "reasoning"
    if base.endswith(("arguments", "input", "code", "patch")):
        return "arguments"
    if "transcript" in base:
        return "audio"
    return "other"


def _closed(item: dict[str, Any], index: int, sent: ResponsesAssembler) -> dict[str, Any]:
    """An item the client saw begin but not end, closed with what it got of it."""
    item = {**item, "status": "incomplete"}
    if item.get("type") == "message":
        parts = sorted(
            (key[1], "".join(texts))
            for key, texts in sent.texts.items()
            if key[0] == index and key[2] == OUTPUT_TEXT_DELTA[:-6]
        )
        item["content"] = [
            {"type": "output_text", "text": text, "annotations": []} for _, text in parts
        ]
    return item


def _channel(data: dict[str, Any], base: str) -> ChannelKey:
    part = data.get("content_index", data.get("summary_index", 0))
    return (data.get("output_index", 0), part, base)


@dataclass(slots=True)
class ResponsesAssembler:
    """Follows a Responses API stream: the latest response object, the last sequence
    number, the terminal event, and the text of each output item."""

    chunks: int = 0
    usage: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    sequence_number: int = -1
    terminal: str | None = None
    texts: dict[ChannelKey, list[str]] = field(default_factory=dict)
    # Output items by output_index, as last seen (added, then done), and which are done.
    items: dict[int, dict[str, Any]] = field(default_factory=dict)
    done_items: set[int] = field(default_factory=set)

    def copy(self) -> ResponsesAssembler:
        return ResponsesAssembler(
            self.chunks,
            self.usage,
            self.response,
            self.sequence_number,
            self.terminal,
            {key: list(parts) for key, parts in self.texts.items()},
            dict(self.items),
            set(self.done_items),
        )

    def feed(self, data: Any) -> None:
        self.chunks += 1
        if type(data) is not dict:
            return
        kind = data.get("type")
        if type(kind) is not str:
            return
        if type(data.get("sequence_number")) is int:
            self.sequence_number = data["sequence_number"]
        response = data.get("response")
        if type(response) is dict:
            self.response = response
            if type(response.get("usage")) is dict:
                self.usage = response["usage"]
        if kind in RESPONSES_TERMINAL:
            self.terminal = kind
        elif kind.startswith("response.output_item."):
            item, index = data.get("item"), data.get("output_index")
            if type(item) is dict and type(index) is int:
                self.items[index] = item
                if kind == "response.output_item.done":
                    self.done_items.add(index)
        elif kind.endswith(".delta") and type(data.get("delta")) is str:
            self.texts.setdefault(_channel(data, kind[:-6]), []).append(data["delta"])

    @property
    def output_text(self) -> str:
        return "".join(
            "".join(parts)
            for key, parts in sorted(self.texts.items(), key=lambda item: item[0][:2])
            if key[2] == OUTPUT_TEXT_DELTA[:-6]
        )

    def summary(self) -> dict[str, Any]:
        status = self.response.get("status") if self.response else None
        summary: dict[str, Any] = {
            "chunks": self.chunks,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.output_text or None},
                    "finish_reason": status or self.terminal,
                }
            ],
        }
        # The output items as the terminal event gives them (function and built-in tool
        # calls, reasoning, messages by part), as the SDK's final response holds them.
        output = self.response.get("output") if self.terminal and self.response else None
        if isinstance(output, list):
            summary["output"] = output
        return summary


def _item_slots(
    item: Any, key: ChannelKey, slots: list[TextSlot], joins: ChannelKey | None = None
) -> None:
    """The texts of an input or output item. The text parts of its ``content`` are read
    as one text: the item's own (``joins`` None), or the one ``joins`` names."""
    if isinstance(item, str):
        return
    if not isinstance(item, dict):
        return
    content = item.get("content")
    if isinstance(content, str):
        slots.append(TextSlot((*key, "content"), item, "content", "text", joins))
    elif isinstance(content, list):
        joined = joins or (*key, "content")
        for position, part in enumerate(content):
            if isinstance(part, dict):
                for name in ("text", "refusal"):
                    if isinstance(part.get(name), str):
                        kind = "text" if name == "text" else "refusal"
                        slot_joins = joined if name == "text" else None
                        slots.append(TextSlot((*key, position), part, name, kind, slot_joins))
    for name, kind in (("name", "name"), ("arguments", "arguments"), ("input", "arguments")):
        if isinstance(item.get(name), str):
            slots.append(TextSlot((*key, name), item, name, kind))
    if isinstance(item.get("output"), str):
        slots.append(TextSlot((*key, "output"), item, "output", "text"))
    for position, part in enumerate(item.get("summary") or ()):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            slots.append(TextSlot((*key, "summary", position), part, "text", "reasoning"))


# ``*.done`` events: the field that holds the channel's whole text.
_DONE_FIELDS = ("text", "refusal", "arguments", "input", "code", "transcript", "delta")
# Content part types → the delta event base of their channel.
_PART_CHANNELS = {
    "output_text": ("text", "response.output_text"),
    "refusal": ("refusal", "response.refusal"),
}
# Output item types whose own field is one channel (content index 0).
_ITEM_CHANNELS = {
    "function_call": ("arguments", "response.function_call_arguments"),
    "custom_tool_call": ("input", "response.custom_tool_call_input"),
    "mcp_call": ("arguments", "response.mcp_call_arguments"),
    "code_interpreter_call": ("code", "response.code_interpreter_call_code"),
}


def _part_slot(part: Any, index: int, position: int, out: list[TextSlot]) -> None:
    if not isinstance(part, dict):
        return
    spec = _PART_CHANNELS.get(str(part.get("type")))
    if spec is not None and isinstance(part.get(spec[0]), str):
        kind = "text" if spec[0] == "text" else "refusal"
        out.append(TextSlot((index, position, spec[1]), part, spec[0], kind))


def _item_summaries(item: Any, index: int, out: list[TextSlot]) -> None:
    """The channel texts an output item repeats whole."""
    if not isinstance(item, dict):
        return
    kind = item.get("type")
    for position, part in enumerate(item.get("content") or () if kind == "message" else ()):
        _part_slot(part, index, position, out)
    for position, part in enumerate(item.get("summary") or () if kind == "reasoning" else ()):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            key = (index, position, "response.reasoning_summary_text")
            out.append(TextSlot(key, part, "text", "reasoning"))
    spec = _ITEM_CHANNELS.get(kind) if isinstance(kind, str) else None
    if spec is not None and isinstance(item.get(spec[0]), str):
        out.append(TextSlot((index, 0, spec[1]), item, spec[0], "arguments"))


class ResponsesDialect(Dialect):
    """``POST /responses``."""

    name = "responses"
    has_summaries = True

    def summary_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        kind = data.get("type")
        out: list[TextSlot] = []
        if not isinstance(kind, str):
            return out
        index = data.get("output_index", 0)
        if kind in RESPONSES_TERMINAL or kind == "response.created":
            response = data.get("response")
            output = response.get("output") if isinstance(response, dict) else None
            for position, item in enumerate(output if isinstance(output, list) else ()):
                _item_summaries(item, position, out)
        elif kind == "response.output_item.done":
            _item_summaries(data.get("item"), index, out)
        elif kind == "response.content_part.done":
            _part_slot(data.get("part"), index, data.get("content_index", 0), out)
        elif kind == "response.reasoning_summary_part.done":
            part = data.get("part")
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                key = (index, data.get("summary_index", 0), "response.reasoning_summary_text")
                out.append(TextSlot(key, part, "text", "reasoning"))
        elif kind.endswith(".done"):
            base = kind[:-5]
            name = next((f for f in _DONE_FIELDS if isinstance(data.get(f), str)), None)
            if name is not None:
                out.append(TextSlot(_channel(data, base), data, name, _kind(base)))
        return out

    def request_slots(self, payload: Any) -> list[TextSlot]:
        slots: list[TextSlot] = []
        if not isinstance(payload, dict):
            return slots
        if isinstance(payload.get("instructions"), str):
            slots.append(TextSlot(("instructions",), payload, "instructions", "text"))
        items = payload.get("input")
        if isinstance(items, str):
            slots.append(TextSlot(("input",), payload, "input", "text"))
        elif isinstance(items, list):
            for index, item in enumerate(items):
                _item_slots(item, ("input", index), slots)
        return slots

    def answer_slots(self, payload: Any) -> list[TextSlot]:
        slots: list[TextSlot] = []
        output = payload.get("output") if isinstance(payload, dict) else None
        for index, item in enumerate(output if isinstance(output, list) else ()):
            # The SDK's output_text joins the text of every message item, in order.
            message = isinstance(item, dict) and item.get("type", "message") == "message"
            _item_slots(item, ("output", index), slots, _OUTPUT_TEXT if message else None)
        return slots

    def assembled_slots(self, summary: dict[str, Any]) -> list[TextSlot]:
        # The output text is joined already (``output_text``); the terminal event's
        # items are read as a buffered answer's are, their parts joined.
        return self.answer_slots(summary) if isinstance(summary.get("output"), list) else []

    def event_answer(self, data: dict[str, Any]) -> Any:
        kind = data.get("type")
        if kind in RESPONSES_TERMINAL or kind == "response.created":
            return data.get("response")
        if kind in ("response.output_item.added", "response.output_item.done"):
            return {"output": [data.get("item")]}
        return None

    def joins(self, key: ChannelKey) -> ChannelKey | None:
        return _OUTPUT_TEXT if key[2:] == (_OUTPUT_TEXT_BASE,) else None

    def new_assembler(self) -> ResponsesAssembler:
        return ResponsesAssembler()

    def text_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        kind = data.get("type")
        if not isinstance(kind, str) or not kind.endswith(".delta"):
            return []
        if not isinstance(data.get("delta"), str):
            return []
        base = kind[:-6]
        return [TextSlot(_channel(data, base), data, "delta", _kind(base))]

    def closing(self, data: dict[str, Any]) -> list[ChannelKey]:
        kind = data.get("type")
        if isinstance(kind, str) and kind.endswith(".done"):
            return [_channel(data, kind[:-5])]
        return []

    def release(self, chunk: Chunk, data: dict[str, Any], held: list[Released]) -> list[Chunk]:
        """Held text goes out as one more delta just before the part's ``.done`` event."""
        out = [_delta_event(piece, data) for piece in held]
        out.append(chunk)
        return out

    def release_at_end(self, held: list[Released], template: dict[str, Any]) -> list[Chunk]:
        return [
            _delta_event(piece, {"output_index": piece.key[0], "content_index": piece.key[1]})
            for piece in held
        ]

    def emptied(self, data: dict[str, Any]) -> bool:
        return data.get("delta") == "" and str(data.get("type", "")).endswith(".delta")

    def stream_complete(self, received: Any, *, done: bool, pending: bytes) -> bool:
        return received.terminal is not None

    def stream_rules(self) -> StreamRules:
        return _ResponsesRules()

    def blocked_answer(self, notice: str, tx: Transaction) -> bytes | None:
        write = _Writer(-1)  # the events are thrown away: only the item is wanted
        item = _notice_events(write, 0, f"msg_{tx.id}", notice)
        return orjson.dumps(_response_object(tx, [item], "completed"))

    def blocked_stream(self, notice: str, tx: Transaction) -> bytes | None:
        write = _Writer(-1)
        write("response.created", response=_response_object(tx, [], "in_progress"))
        item = _notice_events(write, 0, f"msg_{tx.id}", notice)
        write("response.completed", response=_response_object(tx, [item], "completed"))
        return b"".join(write.out)

    def blocked_ending(self, notice: str, tx: Transaction, sent: Any) -> bytes | None:
        if any(
            index not in sent.done_items and item.get("type") not in ("message", "reasoning")
            for index, item in sent.items.items()
        ):
            return None  # a tool call cut half-way cannot be taken back: the error ending
        write = _Writer(sent.sequence_number)
        output: list[Any] = []
        for index, item in sorted(sent.items.items()):
            if index not in sent.done_items:
                item = _closed(item, index, sent)
                write("response.output_item.done", output_index=index, item=item)
            output.append(item)
        index = max(sent.items, default=-1) + 1
        output.append(_notice_events(write, index, f"msg_{tx.id}", notice))
        response = {**(sent.response or _response_object(tx, [], "completed"))}
        response.update(status="completed", output=output)
        write("response.completed", response=response)
        return b"".join(write.out)

    def error_event(self, exc: BaseException, tx: Transaction, sent: Any, *, dev: bool) -> bytes:
        """``response.failed``, numbered after the last event the client got (``sent``:
        the stream as it got it, never as received: the backend's own last response
        object may hold what a policy redacted or refused)."""
        _, payload = self.error_body(exc, tx.id, dev=dev)
        error = payload["error"]
        response = dict(sent.response or {"id": f"resp_{tx.id}", "object": "response"})
        # No output: what the backend produced may be exactly what a policy refused.
        response.update(
            status="failed",
            output=[],
            error={"code": error["code"], "message": error["message"]},
        )
        data = {
            "type": "response.failed",
            "sequence_number": sent.sequence_number + 1,
            "response": response,
        }
        return b"event: response.failed\ndata: " + orjson.dumps(data) + b"\n\n"


class _ResponsesRules:
    """No delta for a part once its ``.done`` came, none for an item once its
    ``output_item.done`` came, nothing after the terminal event; the output text's parts
    one at a time, in order (the SDK joins them in that order: a policy reads them so).

    The SDK appends an output text delta to the text its part began with, and a
    function call's arguments delta to the arguments its item began with (a part or an
    item as ``response.created``, ``output_item.added`` or ``content_part.added`` gave
    it, by list position): a delta may not continue a start that held text, which no
    channel read. Nor may a terminal event leave out ``output`` once items came: the SDK
    then makes the final response of the items as their ``output_item.done`` (or a later
    ``response.in_progress``) stated them, each read alone by the policies."""

    __slots__ = ("_closed", "_done_items", "_ended", "_items", "_parts", "_started", "_text")

    def __init__(self) -> None:
        self._closed: set[ChannelKey] = set()
        self._done_items: set[Any] = set()
        self._ended = False
        self._text: ChannelKey | None = None  # the output text part begun last
        self._items = False  # an output item was stated
        self._parts: dict[Any, int] = {}  # output_index → its parts so far (the SDK's list)
        self._started: set[tuple[Any, Any]] = set()  # (index, part or "arguments") with text

    def _item(self, index: Any, item: Any) -> None:
        """An item the SDK takes as begun (its parts, and any text they begin with)."""
        self._items = True
        if not isinstance(index, int) or not isinstance(item, dict):
            return  # (no delta can name it: a delta's place is a number)
        content = item.get("content")
        parts = content if isinstance(content, list) else []
        self._parts[index] = len(parts)
        for position, part in enumerate(parts):
            if isinstance(part, dict) and part.get("text"):
                self._started.add((index, position))
        if item.get("arguments"):
            self._started.add((index, "arguments"))

    def check(self, data: Any, chunk: Chunk) -> None:
        kind = data.get("type") if type(data) is dict else None
        if not isinstance(kind, str):
            return
        if self._ended:
            raise BackendBroken("the backend's stream went on after its terminal event")
        response = data.get("response")
        if kind in RESPONSES_TERMINAL:
            self._ended = True
            if self._items and not (
                isinstance(response, dict) and isinstance(response.get("output"), list)
            ):
                raise BackendBroken("the backend's terminal event has no output")
        elif kind == "response.created":
            output = response.get("output") if isinstance(response, dict) else None
            for position, item in enumerate(output if isinstance(output, list) else ()):
                self._item(position, item)
        elif kind == "response.output_item.added":
            self._item(data.get("output_index"), data.get("item"))
        elif kind == "response.content_part.added":
            index = data.get("output_index")
            if not isinstance(index, int):
                return
            position = self._parts.get(index, 0)
            self._parts[index] = position + 1
            part = data.get("part")
            if isinstance(part, dict) and part.get("text"):
                self._started.add((index, position))
        elif kind.endswith(".delta"):
            index = data.get("output_index", 0)
            part = data.get("content_index", data.get("summary_index", 0))
            if not isinstance(index, int) or not isinstance(part, int):
                raise BackendBroken("the backend's stream has a delta without its place")
            place = (
                (index, part)
                if kind == OUTPUT_TEXT_DELTA
                else (index, "arguments")
                if kind == "response.function_call_arguments.delta"
                else None
            )
            if place in self._started:
                raise BackendBroken("the backend's delta continues text its part began with")
            key = _channel(data, kind[:-6])
            if index in self._done_items or key in self._closed:
                raise BackendBroken("the backend's stream went on with a finished part")
            if kind == OUTPUT_TEXT_DELTA and key != self._text:
                if self._text is not None and (
                    self._text not in self._closed or key[:2] < self._text[:2]
                ):
                    raise BackendBroken("the backend's output text parts are out of order")
                self._text = key
        elif kind == "response.output_item.done":
            self._items = True
            self._done_items.add(data.get("output_index", 0))
        elif kind.endswith(".done"):
            self._closed.add(_channel(data, kind[:-5]))


class _Writer:
    """Numbers the events of an ending the proxy writes itself."""

    def __init__(self, after: int) -> None:
        self.sequence = after
        self.out: list[bytes] = []

    def __call__(self, kind: str, **fields: Any) -> None:
        self.sequence += 1
        self.out.append(sse({"type": kind, "sequence_number": self.sequence, **fields}, kind))


def _notice_events(write: _Writer, index: int, item_id: str, notice: str) -> dict[str, Any]:
    """A message output item saying ``notice``, event by event; returns the item."""
    part = {"type": "output_text", "text": notice, "annotations": [], "logprobs": []}
    item = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    place = {"item_id": item_id, "output_index": index}
    write(
        "response.output_item.added",
        output_index=index,
        item={**item, "status": "in_progress", "content": []},
    )
    write("response.content_part.added", **place, content_index=0, part={**part, "text": ""})
    write("response.output_text.delta", **place, content_index=0, delta=notice, logprobs=[])
    write("response.output_text.done", **place, content_index=0, text=notice, logprobs=[])
    write("response.content_part.done", **place, content_index=0, part=part)
    write("response.output_item.done", output_index=index, item=item)
    return item


def _response_object(tx: Transaction, output: list[Any], status: str) -> dict[str, Any]:
    return {
        "id": f"resp_{tx.id}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": request_model(tx),
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def _delta_event(piece: Released, done: dict[str, Any]) -> Chunk:
    """One more delta carrying ``piece``, with the place fields of its ``.done`` event."""
    kind = piece.key[2] + ".delta"
    data: dict[str, Any] = {"type": kind, "sequence_number": done.get("sequence_number")}
    for name in ("item_id", "output_index", "content_index", "summary_index"):
        if name in done:
            data[name] = done[name]
    data["delta"] = piece.text
    if kind == OUTPUT_TEXT_DELTA:
        data["logprobs"] = []
    return Chunk.from_data(data, event=kind)
