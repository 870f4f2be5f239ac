"""Tool-call control: every tool call is checked, whole, before any of it reaches the other side.

``ToolCallPolicy`` checks each call's name against allowed and denied lists and its
complete arguments against regular expressions, and blocks the transaction or drops the
call. After ``SendBackendRequest`` it checks the answer's calls; a streamed call is held
back only until it is complete (the next call of its choice begins, the choice finishes,
or the stream ends), while text keeps flowing, and is then released unchanged or never
sent at all. Before the backend it checks the calls in the request's history.

The Responses API (``/responses``) is covered the same way: its ``function_call`` and
``custom_tool_call`` output items, buffered or streamed (every event of such an item is
held from its ``response.output_item.added`` to its ``response.output_item.done``), and
the same items in a request's ``input``.

Subclass it and override ``check`` for a check of your own: it receives each call
reassembled as a ``ToolCall``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import regex

from luthien_control.chat import RESPONSES_TERMINAL
from luthien_control.exceptions import PolicyBlocked
from luthien_control.policies.base import Policy, PolicyConfig, RegexPattern
from luthien_control.policies.text import iter_strings
from luthien_control.sse import Chunk
from luthien_control.transaction import StreamTransform, Transaction

_CALL_FIELDS = ("tool_calls", "function_call")  # function_call: the legacy single call
_CALL_FINISHES = frozenset(_CALL_FIELDS)
_EMPTY: tuple[Any, ...] = (None, "", [], {})
# Responses API output items that are tool calls, with the field holding their arguments.
_CALL_ITEMS = {"function_call": "arguments", "custom_tool_call": "input"}
_CALL_RESULTS = {"function_call_output", "custom_tool_call_output"}


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


class ToolCallPolicy(Policy):
    """Blocks, or drops, tool calls whose name or arguments are not allowed."""

    type_name = "ToolCallPolicy"

    class Config(PolicyConfig):
        allowed_tools: list[str] | None = None
        denied_tools: list[str] = []
        argument_patterns: list[RegexPattern] = []
        action: Literal["block", "drop_call"] = "block"

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.allowed = None if config.allowed_tools is None else frozenset(config.allowed_tools)
        self.denied = frozenset(config.denied_tools)
        self.patterns = [regex.compile(p) for p in config.argument_patterns]
        self.action = config.action

    def check(self, call: ToolCall) -> str | None:
        """Why ``call`` may not pass, or ``None`` when it may. The reason is shown to the
        client, so it must not quote the arguments."""
        if call.name in self.denied:
            return "the tool is denied"
        if self.allowed is not None and call.name not in self.allowed:
            return "the tool is not allowed"
        if self.patterns:
            # The decoded strings too: a JSON escape (\u0072m) must not hide a match.
            texts = [call.arguments, *_strings_and_keys(call.parsed_arguments)]
            for i, pattern in enumerate(self.patterns):
                if any(pattern.search(text) for text in texts):
                    return f"its arguments match argument_patterns[{i}]"
        return None

    def judge(self, tx: Transaction, call: ToolCall, *, where: str, block: bool = False) -> bool:
        """Whether ``call`` may pass; a violation is recorded, and raises ``PolicyBlocked``
        when the action is ``block`` (or ``block`` is forced)."""
        return self._decide(tx, call, self.check(call), where=where, block=block)

    def _decide(
        self, tx: Transaction, call: ToolCall, reason: str | None, *, where: str, block: bool
    ) -> bool:
        """``judge`` once ``check`` has given its ``reason``."""
        if reason is None:
            return True
        if block or self.action == "block":
            tx.record(self.name, "blocked", f"tool {call.name}")
            raise PolicyBlocked(
                f"blocked by {self.name}: tool call {call.name!r} in the {where}: {reason}",
                policy=self.name,
            )
        tx.record(self.name, "dropped", f"tool {call.name}")
        return False

    async def on_request(self, tx: Transaction) -> None:
        payload = tx.request.payload
        if not isinstance(payload, dict):
            return
        messages = payload.get("messages")
        if isinstance(messages, list) and self._filter_history(tx, messages):
            tx.request.mark_changed()
        items = payload.get("input")  # the Responses API
        if isinstance(items, list) and self._filter_input(tx, items):
            tx.request.mark_changed()

    async def on_response(self, tx: Transaction) -> None:
        assert tx.response is not None
        payload = tx.response.payload
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            output = payload.get("output") if isinstance(payload, dict) else None
            if isinstance(output, list) and self._filter_output(tx, output):
                tx.response.mark_changed()  # a Responses API response object
            return
        changed = False
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            dropped = self._filter_message(tx, message, where="response")
            if dropped:
                changed = True
                remaining = message.get("tool_calls") or message.get("function_call")
                if not remaining and choice.get("finish_reason") in _CALL_FINISHES:
                    choice["finish_reason"] = "stop"
        if changed:
            tx.response.mark_changed()

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        return _ToolCallStream(self, tx)

    def _filter_message(
        self, tx: Transaction, message: dict[str, Any], *, where: str
    ) -> list[tuple[str, str | None]]:
        """Judge a message's calls and remove the dropped ones; returns what was dropped,
        as ``("tool", id)`` and ``("function", name)``."""
        dropped: list[tuple[str, str | None]] = []
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            kept = []
            for item in calls:
                call = _whole_call(item)
                if call is None or self.judge(tx, call, where=where):
                    kept.append(item)
                else:
                    dropped.append(("tool", call.id))
            if dropped:
                if kept:
                    message["tool_calls"] = kept
                else:
                    del message["tool_calls"]
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            call = ToolCall.of(None, _text(legacy.get("name")), _arguments(legacy))
            if not self.judge(tx, call, where=where):
                del message["function_call"]
                dropped.append(("function", call.name))
        return dropped

    def _filter_output(self, tx: Transaction, output: list[Any]) -> bool:
        """Judge the tool-call items of a Responses ``output`` and remove the dropped ones."""
        kept = [
            item
            for item in output
            if (call := _item_call(item)) is None or self.judge(tx, call, where="response")
        ]
        if len(kept) == len(output):
            return False
        output[:] = kept
        return True

    def _filter_input(self, tx: Transaction, items: list[Any]) -> bool:
        """Drop violating tool-call items from a Responses ``input``, with their results
        (matched by ``call_id``)."""
        dropped: set[str | None] = set()
        kept = []
        for item in items:
            call = _item_call(item)
            if call is None or self.judge(tx, call, where="request"):
                kept.append(item)
            else:
                dropped.add(call.id)
        if not dropped:
            return False
        items[:] = [
            item
            for item in kept
            if not (
                isinstance(item, dict)
                and item.get("type") in _CALL_RESULTS
                and item.get("call_id") in dropped
            )
        ]
        return True

    def _filter_history(self, tx: Transaction, messages: list[Any]) -> bool:
        """Drop violating calls from the history, with their results and any assistant
        message left empty (a backend rejects orphaned results and empty messages)."""
        dropped: set[tuple[str, str | None]] = set()
        empty: set[int] = set()
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") != "assistant":
                continue
            found = self._filter_message(tx, message, where="request")
            if found:
                dropped.update(found)
                if all(message.get(key) in _EMPTY for key in ("content", *_CALL_FIELDS)):
                    empty.add(position)
        if not dropped:
            return False
        messages[:] = [
            message
            for position, message in enumerate(messages)
            if position not in empty and _result_of(message) not in dropped
        ]
        return True


def _result_of(message: Any) -> tuple[str, str | None] | None:
    """Which call a ``tool`` (by id) or legacy ``function`` (by name) message answers."""
    if isinstance(message, dict):
        role = message.get("role")
        if role == "tool":
            return ("tool", message.get("tool_call_id"))
        if role == "function":
            return ("function", message.get("name"))
    return None


def _strings_and_keys(value: Any) -> list[str]:
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


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _arguments(function: dict[str, Any]) -> str:
    """A function's arguments as text (``input`` for custom tools; an object as JSON)."""
    value = function.get("arguments", function.get("input"))
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()


def _item_call(item: Any) -> ToolCall | None:
    """The call of a Responses API tool-call item (``function_call``, ``custom_tool_call``);
    ``None`` for any other item. Its id is the ``call_id`` (which results refer to)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    field_name = _CALL_ITEMS.get(kind) if isinstance(kind, str) else None
    if field_name is None:
        return None
    call_id = item.get("call_id")
    arguments = item.get(field_name)
    if not isinstance(arguments, str):
        arguments = "" if arguments is None else orjson.dumps(arguments).decode()
    call_id = call_id if isinstance(call_id, str) else None
    return ToolCall.of(call_id, _text(item.get("name")), arguments)


def _whole_call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    function = item.get("function", item.get("custom"))
    function = function if isinstance(function, dict) else {}
    call_id = item.get("id")
    return ToolCall.of(
        call_id if isinstance(call_id, str) else None,
        _text(function.get("name")),
        _arguments(function),
    )


# --- streams ---------------------------------------------------------------------------


class _Piece:
    """One held delta of a call: the original event when it carried nothing else (sent
    back byte for byte), or a new event carrying only this delta."""

    __slots__ = ("chunk", "entry", "field", "whole")

    def __init__(self, chunk: Chunk, field: str, entry: dict[str, Any], *, whole: bool) -> None:
        self.chunk = chunk
        self.field = field
        self.entry = entry  # the delta inside ``chunk.data``
        self.whole = whole

    def release(self, index: int) -> Chunk:
        if self.field == "tool_calls" and self.entry.get("index") != index:
            self.entry["index"] = index
            self.chunk.mark_changed()
        return self.chunk

    def remainder(self) -> Chunk | None:
        """What the event carries besides the call (a ``role``), for a dropped call."""
        if not self.whole:
            return None
        choice = self.chunk.data["choices"][0]
        delta = {k: v for k, v in choice["delta"].items() if k != self.field}
        if all(value in _EMPTY for value in delta.values()):
            return None
        choice["delta"] = delta
        self.chunk.mark_changed()
        return self.chunk


@dataclass(slots=True, eq=False)
class _Call:
    kind: str  # the delta field: tool_calls, or the legacy function_call
    index: int
    id: str | None = None
    name: str = ""
    arguments: str = ""
    pieces: list[_Piece] = field(default_factory=list)
    status: Literal["open", "kept", "dropped"] = "open"
    reopened: bool = False  # more deltas after it was released: it cannot be dropped now

    def add(self, entry: dict[str, Any]) -> None:
        function = entry if self.kind == "function_call" else entry.get("function")
        if not isinstance(function, dict):
            function = entry.get("custom")
        call_id = entry.get("id")
        if isinstance(call_id, str) and call_id and self.id is None:
            self.id = call_id
        if isinstance(function, dict):
            self.name += _text(function.get("name"))
            self.arguments += _text(function.get("arguments", function.get("input")))


@dataclass(slots=True)
class _ChoiceCalls:
    calls: dict[int, _Call] = field(default_factory=dict)  # by the backend's index
    dropped: set[int] = field(default_factory=set)
    kept: int = 0

    def open_calls(self) -> list[_Call]:
        return sorted((c for c in self.calls.values() if c.status == "open"), key=_by_index)


def _by_index(call: _Call) -> int:
    return call.index


class _ToolCallStream:
    """Holds each tool call's deltas until the call is complete, then releases or drops it.

    Everything else in a chunk goes on at once; a chunk that carried only held deltas
    is held whole. Dropped calls shift the index of later calls of their choice down,
    and a choice left without calls finishes with ``stop``.
    """

    def __init__(self, policy: ToolCallPolicy, tx: Transaction) -> None:
        self._policy = policy
        self._tx = tx
        self._choices: dict[int, _ChoiceCalls] = {}
        self._responses: _ResponsesCalls | None = None

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            if isinstance(data, dict) and isinstance(data.get("type"), str):
                if self._responses is None:
                    self._responses = _ResponsesCalls(self._policy, self._tx)
                return self._responses.on_event(chunk, data)
            return [chunk]
        assert isinstance(data, dict)
        out: list[Chunk] = []
        whole = _carries_one_call(data)
        changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index"))
            state = self._choices.setdefault(index, _ChoiceCalls())
            delta = choice.get("delta")
            entries = _call_deltas(delta) if isinstance(delta, dict) else None
            if entries is not None:
                assert isinstance(delta, dict)
                for name, key, entry in entries:
                    if whole:
                        piece = _Piece(chunk, name, entry, whole=True)
                    else:
                        piece = _one_delta(chunk, choice, name, entry)
                    out.extend(self._take(state, name, key, piece))
                if not whole:
                    choice["delta"] = {k: v for k, v in delta.items() if k not in _CALL_FIELDS}
                    changed = True
            finish = choice.get("finish_reason")
            if finish:
                out.extend(self._complete_all(state))
                if finish in _CALL_FINISHES and state.dropped and not state.kept:
                    choice["finish_reason"] = "stop"
                    changed = True
        if whole:
            return out
        if changed:
            if _is_empty(data):
                return out
            chunk.mark_changed()
        out.append(chunk)
        return out

    async def on_end(self) -> list[Chunk]:
        out: list[Chunk] = []
        for index in sorted(self._choices):
            out.extend(self._complete_all(self._choices[index]))
        if self._responses is not None:
            out.extend(self._responses.on_end())
        return out

    def _take(self, state: _ChoiceCalls, name: str, key: int, piece: _Piece) -> list[Chunk]:
        """Add a delta to its call; a delta of another call completes the open ones."""
        entry = piece.entry
        out: list[Chunk] = []
        for other in state.open_calls():
            if other.index != key:
                out.extend(self._complete(state, other))
        call = state.calls.get(key)
        call_id = entry.get("id")
        if (
            call is not None
            and isinstance(call_id, str)
            and call_id
            and call.id is not None
            and call_id != call.id
        ):  # a new call under an index already used
            if call.status == "open":
                out.extend(self._complete(state, call))
            call = None
        if call is None:
            call = state.calls[key] = _Call(name, key)
        elif call.status == "dropped":
            remainder = piece.remainder()
            return [*out, remainder] if remainder is not None else out
        elif call.status == "kept":
            call.status = "open"
            call.reopened = True
        call.add(entry)
        call.pieces.append(piece)
        return out

    def _complete_all(self, state: _ChoiceCalls) -> list[Chunk]:
        out: list[Chunk] = []
        for call in state.open_calls():
            out.extend(self._complete(state, call))
        return out

    def _complete(self, state: _ChoiceCalls, call: _Call) -> list[Chunk]:
        tool = ToolCall.of(call.id, call.name, call.arguments)
        keep = self._policy.judge(self._tx, tool, where="response", block=call.reopened)
        pieces, call.pieces = call.pieces, []
        if keep:
            if not call.reopened:
                state.kept += 1
            call.status = "kept"
            shift = sum(1 for j in state.dropped if j < call.index)
            return [piece.release(call.index - shift) for piece in pieces]
        call.status = "dropped"
        state.dropped.add(call.index)
        return [c for piece in pieces if (c := piece.remainder()) is not None]


def _index(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _call_deltas(delta: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]] | None:
    """The call deltas of a choice's delta as (field, call index, delta); None when none.
    Entries that are not objects are taken out too: they could not be checked."""
    calls = delta.get("tool_calls")
    legacy = delta.get("function_call")
    if not (isinstance(calls, list) and calls) and not isinstance(legacy, dict):
        return None
    entries = []
    if isinstance(calls, list):
        entries = [
            ("tool_calls", _index(item.get("index")), item)
            for item in calls
            if isinstance(item, dict)
        ]
    if isinstance(legacy, dict):
        entries.append(("function_call", -1, legacy))
    return entries


def _carries_one_call(data: dict[str, Any]) -> bool:
    """Whether the event is one delta of one call and nothing else (a ``role`` aside)."""
    choices = data["choices"]
    if len(choices) != 1 or isinstance(data.get("usage"), dict):
        return False
    choice = choices[0]
    if not isinstance(choice, dict) or choice.get("finish_reason"):
        return False
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    entries = _call_deltas(delta)
    if entries is None or len(entries) != 1:
        return False
    name = entries[0][0]
    if name == "tool_calls" and len(delta["tool_calls"]) != 1:
        return False
    return all(k in (name, "role") or v in _EMPTY for k, v in delta.items())


def _one_delta(chunk: Chunk, choice: dict[str, Any], name: str, entry: dict[str, Any]) -> _Piece:
    """A new event like ``chunk`` whose only content is one call delta of ``choice``."""
    data = dict(chunk.data)
    copy = dict(entry)
    one = dict(choice)
    one["delta"] = {name: [copy] if name == "tool_calls" else copy}
    for key in ("finish_reason", "logprobs"):
        if key in one:
            one[key] = None
    data["choices"] = [one]
    if isinstance(data.get("usage"), dict):
        data["usage"] = None
    event = Chunk(chunk.raw)  # keeps the event's other lines (event:, id:)
    event.set_data(data)
    return _Piece(event, name, copy, whole=False)


def _is_empty(data: dict[str, Any]) -> bool:
    if isinstance(data.get("usage"), dict):
        return False
    for choice in data["choices"]:
        if not isinstance(choice, dict) or choice.get("finish_reason"):
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict) or any(v not in _EMPTY for v in delta.values()):
            return False
    return True


# --- Responses API streams ---------------------------------------------------------------

_ITEM_ADDED = "response.output_item.added"
_ITEM_DONE = "response.output_item.done"
# Events that carry a piece of a call's arguments (``delta``) or all of them (``done``).
_ARGUMENT_DELTAS = {
    "response.function_call_arguments.delta": "function_call",
    "response.custom_tool_call_input.delta": "custom_tool_call",
}
_ARGUMENT_DONES = {
    "response.function_call_arguments.done": ("function_call", "arguments"),
    "response.custom_tool_call_input.done": ("custom_tool_call", "input"),
}


@dataclass(slots=True, eq=False)
class _Item:
    """A tool-call output item of a Responses stream, and its held events."""

    index: int  # the backend's output_index
    kind: str  # function_call or custom_tool_call
    id: str | None = None
    call_id: str | None = None
    names: list[str] = field(default_factory=list)
    streamed: str = ""  # the arguments as the deltas spell them out
    finals: list[str] = field(default_factory=list)  # as the done events state them
    held: list[Chunk] = field(default_factory=list)
    status: Literal["open", "kept", "dropped"] = "open"
    reopened: bool = False  # more events after it was released: it cannot be dropped now
    passed: set[tuple[str, str]] = field(default_factory=set)  # (name, arguments) checked

    def note(self, item: dict[str, Any], *, final: bool) -> None:
        """Take what an ``output_item`` event's item says about the call."""
        item_id, call_id, name = item.get("id"), item.get("call_id"), item.get("name")
        if isinstance(item_id, str) and item_id:
            self.id = self.id or item_id
        if isinstance(call_id, str) and call_id:
            self.call_id = self.call_id or call_id
        if isinstance(name, str) and name and name not in self.names:
            self.names.append(name)
        arguments = item.get(_CALL_ITEMS[self.kind])
        if isinstance(arguments, str):
            if final:
                self.finals.append(arguments)
            elif arguments:
                self.streamed = arguments + self.streamed

    def calls(self) -> list[ToolCall]:
        """Every version of the call the client could take (they differ only when the
        backend contradicts itself): each name with each spelling of the arguments."""
        names = self.names or [""]
        arguments = list(dict.fromkeys([self.streamed, *self.finals]))
        if len(arguments) > 1 and self.streamed == "" and self.finals:
            arguments.remove("")  # the whole arguments came only in the done events
        return [ToolCall.of(self.call_id, name, text) for name in names for text in arguments]


class _ResponsesCalls:
    """Holds every event of a tool-call output item until the item is done, then checks
    the call and releases the events unchanged, raises ``PolicyBlocked``, or drops them.

    Events of other items go on at once. After a drop, the ``output_index`` of later
    items and every ``sequence_number`` are shifted down so that the client's stream has
    no gaps, and the item is removed from the ``output`` of the terminal event.
    """

    def __init__(self, policy: ToolCallPolicy, tx: Transaction) -> None:
        self._policy = policy
        self._tx = tx
        self._items: dict[int, _Item] = {}  # by the backend's output_index
        self._ids: dict[str, _Item] = {}
        self._dropped: list[int] = []  # output indices of dropped items, sorted
        self._discarded: list[int] = []  # sequence numbers of discarded events, sorted
        self._shifts: dict[int, int] = {}  # output_index -> shift, fixed when first sent

    def on_event(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        kind = data["type"]
        if kind in RESPONSES_TERMINAL:
            out = self._complete_all(data)
            self._filter_output(chunk, data)
            out.append(self._out(chunk))
            return out
        item = self._item_of(kind, data)
        if item is None:
            if isinstance(data.get("response"), dict):
                self._filter_output(chunk, data)
            return [self._out(chunk)]
        if item.status == "dropped":
            self._discard([chunk])
            return []
        if item.status == "kept":
            item.status = "open"
            item.reopened = True
        item.held.append(chunk)
        self._take(item, kind, data)
        if kind == _ITEM_DONE:
            return self._complete(item, None)
        return []

    def on_end(self) -> list[Chunk]:
        return self._complete_all(None)

    def _item_of(self, kind: str, data: dict[str, Any]) -> _Item | None:
        """The tool-call item an event belongs to (by output_index, else item_id); a new
        one for an event that starts or names a tool call; None for any other item."""
        index = data.get("output_index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else None
        entry = data.get("item") if kind in (_ITEM_ADDED, _ITEM_DONE) else None
        entry = entry if isinstance(entry, dict) else None
        item_id = data.get("item_id")
        if entry is not None:
            item_id = entry.get("id")
        item = self._items.get(index) if index is not None else None
        if item is None and isinstance(item_id, str):
            item = self._ids.get(item_id)
        if kind == _ITEM_ADDED and item is not None and item.status != "open":
            item = None  # the index is used again: a new item
        if item is not None:
            return item
        if entry is not None:
            call_kind = entry.get("type")
        elif kind in _ARGUMENT_DELTAS:
            call_kind = _ARGUMENT_DELTAS[kind]
        elif kind in _ARGUMENT_DONES:
            call_kind = _ARGUMENT_DONES[kind][0]
        else:
            return None
        if not isinstance(call_kind, str) or call_kind not in _CALL_ITEMS:
            return None
        if index is None:
            index = -1 - len(self._items)  # no output_index: a key of its own
        item = self._items[index] = _Item(index, call_kind)
        if isinstance(item_id, str) and item_id:
            item.id = item_id
            self._ids[item_id] = item
        return item

    def _take(self, item: _Item, kind: str, data: dict[str, Any]) -> None:
        if kind in (_ITEM_ADDED, _ITEM_DONE):
            entry = data.get("item")
            if isinstance(entry, dict):
                item.note(entry, final=kind == _ITEM_DONE)
                if item.id is not None:
                    self._ids.setdefault(item.id, item)
        elif kind in _ARGUMENT_DELTAS:
            item.streamed += _text(data.get("delta"))
        elif kind in _ARGUMENT_DONES:
            value = data.get(_ARGUMENT_DONES[kind][1])
            if isinstance(value, str):
                item.finals.append(value)
            name = data.get("name")
            if isinstance(name, str) and name and name not in item.names:
                item.names.append(name)

    def _complete_all(self, terminal: dict[str, Any] | None) -> list[Chunk]:
        out: list[Chunk] = []
        for item in sorted(self._items.values(), key=_by_output_index):
            if item.status == "open":
                out.extend(self._complete(item, terminal))
        return out

    def _complete(self, item: _Item, terminal: dict[str, Any] | None) -> list[Chunk]:
        """Judge the item's call: release its held events, drop them, or raise."""
        held, item.held = item.held, []
        for call in item.calls():
            if (call.name, call.arguments) in item.passed:
                continue
            reason = self._policy.check(call)
            if reason is None:
                item.passed.add((call.name, call.arguments))
            elif not self._decide(call, reason, item.reopened, terminal):
                self._drop(item, held)
                return []
        item.status = "kept"
        return [self._out(chunk) for chunk in held]

    def _decide(
        self, call: ToolCall, reason: str, released: bool, terminal: dict[str, Any] | None
    ) -> bool:
        """The policy's decision on a violation. Raising during a terminal event, it first
        takes every tool call out of that event's response: the relay's ``response.failed``
        is made from the last response the backend sent."""
        try:
            return self._policy._decide(self._tx, call, reason, where="response", block=released)
        except PolicyBlocked:
            if terminal is not None:
                _remove_calls(terminal)
            raise

    def _drop(self, item: _Item, held: list[Chunk]) -> None:
        item.status = "dropped"
        insort(self._dropped, item.index)
        self._discard(held)

    def _filter_output(self, chunk: Chunk, data: dict[str, Any]) -> None:
        """The ``output`` of an event's response: without the dropped items, and every
        tool call in it checked (a call the stream never showed may still be dropped)."""
        response = data.get("response")
        output = response.get("output") if isinstance(response, dict) else None
        if not isinstance(output, list) or not output:
            return
        kept: list[Any] = []
        for position, entry in enumerate(output):
            call = _item_call(entry)
            if call is None:
                kept.append(entry)
                continue
            item = self._tracked(entry, position)
            if item is not None and item.status == "dropped":
                continue
            key = (call.name, call.arguments)
            if item is not None and key in item.passed:
                kept.append(entry)
                continue
            reason = self._policy.check(call)
            if reason is None:
                if item is not None:
                    item.passed.add(key)
                kept.append(entry)
                continue
            released = item is not None and (item.status == "kept" or item.reopened)
            if self._decide(call, reason, released, data):
                kept.append(entry)  # never: a violation raises or is dropped
            elif item is not None:
                held, item.held = item.held, []
                self._drop(item, held)
        if len(kept) != len(output):
            output[:] = kept
            chunk.mark_changed()

    def _tracked(self, entry: dict[str, Any], position: int) -> _Item | None:
        """The streamed item an ``output`` entry is (by id, else by position)."""
        item_id = entry.get("id")
        if isinstance(item_id, str) and item_id in self._ids:
            return self._ids[item_id]
        item = self._items.get(position)
        if item is not None and (item.id is None or not isinstance(item_id, str)):
            return item
        return None

    def _discard(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            number = chunk.data.get("sequence_number")
            if isinstance(number, int):
                insort(self._discarded, number)

    def _out(self, chunk: Chunk) -> Chunk:
        """The event as it goes out: renumbered when events or items were dropped before."""
        data = chunk.data
        index = data.get("output_index")
        if isinstance(index, int) and not isinstance(index, bool):
            shift = self._shifts.get(index)
            if shift is None:
                shift = self._shifts[index] = bisect_left(self._dropped, index)
            if shift:
                data["output_index"] = index - shift
                chunk.mark_changed()
        if self._discarded:
            number = data.get("sequence_number")
            if isinstance(number, int) and not isinstance(number, bool):
                shift = bisect_left(self._discarded, number)
                if shift:
                    data["sequence_number"] = number - shift
                    chunk.mark_changed()
        return chunk


def _by_output_index(item: _Item) -> int:
    return item.index


def _remove_calls(data: dict[str, Any]) -> None:
    """Take every tool-call item out of the ``output`` of an event's response, in place."""
    response = data.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    if isinstance(output, list):
        output[:] = [entry for entry in output if _item_call(entry) is None]
