"""Holding the tool calls of a chat-completion stream (``choices[].delta.tool_calls``,
and the legacy ``function_call``) until each is complete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from luthien_control.dialects.chat_tools import CALL_FIELDS, CALL_FINISHES, EMPTY, function_parts
from luthien_control.policies.tools.call import ToolCall, json_text, text_of, versions
from luthien_control.policies.tools.hold import CallJudge, Held
from luthien_control.sse import Chunk


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
        if all(value in EMPTY for value in delta.values()):
            return None
        choice["delta"] = delta
        self.chunk.mark_changed()
        return self.chunk


@dataclass(slots=True)
class _Part:
    """What a call's deltas said in one of its objects (``function`` or ``custom``).
    Pieces are kept in lists and joined when read: appending to a growing string would
    copy it whole at every delta (quadratic in a long call)."""

    names: list[str] = field(default_factory=list)  # each delta's name on its own
    argument_parts: list[str] = field(default_factory=list)
    input_parts: list[str] = field(default_factory=list)  # a custom tool's input

    @property
    def name(self) -> str:
        """The names of the deltas joined, as the client's SDK joins them."""
        return "".join(self.names)

    @property
    def arguments(self) -> str:
        return "".join(self.argument_parts)

    @property
    def input(self) -> str:
        return "".join(self.input_parts)


@dataclass(slots=True, eq=False)
class _Call(Held[_Piece]):
    kind: str  # the delta field: tool_calls, or the legacy function_call
    index: int
    id: str | None = None
    parts: dict[str, _Part] = field(default_factory=dict)  # by key: function, custom
    # What the client holds under this index already, from an earlier call (another id)
    # that went out: its SDK merges the two, by index, into one call.
    lead: dict[str, tuple[str, str]] = field(default_factory=dict)
    follows: bool = False  # an earlier call under this index went out

    def add(self, entry: dict[str, Any]) -> None:
        call_id = entry.get("id")
        if isinstance(call_id, str) and call_id and self.id is None:
            self.id = call_id
        found = [("function", entry)] if self.kind == "function_call" else function_parts(entry)
        for key, function in found:
            part = self.parts.get(key)
            if part is None:
                part = self.parts[key] = _Part()
            name = text_of(function.get("name"))
            if name:
                part.names.append(name)
            # Arguments as an object, not JSON text, are checked as their JSON.
            part.argument_parts.append(json_text(function.get("arguments")))
            part.input_parts.append(json_text(function.get("input")))

    def view(self) -> dict[str, tuple[str, str]]:
        """(name, arguments) per object as the client holds them under this index."""
        view = dict(self.lead)
        for key, part in self.parts.items():
            name, arguments = view.get(key, ("", ""))
            view[key] = (name + part.name, arguments + part.arguments)
        return view

    def versions(self) -> list[ToolCall]:
        """Every version of the call a client could take: the names joined (the OpenAI
        SDKs concatenate them), each delta's name on its own (a client that keeps the
        first or the last), and what the client merges it with under the same index."""
        names: list[str] = []
        texts: list[str] = []
        for key, part in self.parts.items():
            names += [part.name, *part.names]
            texts.append(part.arguments)
            if part.input:
                texts.append(part.input)
            if key in self.lead:
                name, arguments = self.lead[key]
                names.append(name + part.name)
                texts.append(arguments + part.arguments)
        return versions(self.id, names, texts)


@dataclass(slots=True)
class _ChoiceCalls:
    calls: dict[int, _Call] = field(default_factory=dict)  # by the backend's index
    dropped: set[int] = field(default_factory=set)
    kept: int = 0

    def open_calls(self) -> list[_Call]:
        return sorted((c for c in self.calls.values() if c.status == "open"), key=_by_index)


def _by_index(call: _Call) -> int:
    return call.index


class ChatCalls:
    """Holds each tool call's deltas until the call is complete, then releases or drops it.

    Everything else in a chunk goes on at once; a chunk that carried only held deltas
    is held whole. Dropped calls shift the index of later calls of their choice down,
    and a choice left without calls finishes with ``stop``.
    """

    def __init__(self, judge: CallJudge) -> None:
        self._judge = judge
        self._choices: dict[int, _ChoiceCalls] = {}

    def on_event(self, chunk: Chunk, data: dict[str, Any], choices: list[Any]) -> list[Chunk]:
        """A chunk whose ``choices`` is a non-empty list."""
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
                    choice["delta"] = {k: v for k, v in delta.items() if k not in CALL_FIELDS}
                    changed = True
            finish = choice.get("finish_reason")
            if finish:
                out.extend(self._complete_all(state))
                if finish in CALL_FINISHES and state.dropped and not state.kept:
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

    def on_end(self) -> list[Chunk]:
        out: list[Chunk] = []
        for index in sorted(self._choices):
            out.extend(self._complete_all(self._choices[index]))
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
            released = call.status == "kept"
            lead = call.view() if released else call.lead
            follows = released or call.follows
            call = state.calls[key] = _Call(name, key, lead=lead, follows=follows)
        if call is None:
            call = state.calls[key] = _Call(name, key)
        elif call.status == "dropped":
            remainder = piece.remainder()
            return [*out, remainder] if remainder is not None else out
        else:
            call.reopen()
        call.add(entry)
        call.held.append(piece)
        return out

    def _complete_all(self, state: _ChoiceCalls) -> list[Chunk]:
        out: list[Chunk] = []
        for call in state.open_calls():
            out.extend(self._complete(state, call))
        return out

    def _complete(self, state: _ChoiceCalls, call: _Call) -> list[Chunk]:
        keep = self._judge.settle(call, call.versions())
        pieces = call.take()
        if keep:
            if not call.reopened:
                state.kept += 1
            shift = sum(1 for j in state.dropped if j < call.index)
            return [piece.release(call.index - shift) for piece in pieces]
        if not call.follows:  # else the index stays taken by the call that went out
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
    return all(k in (name, "role") or v in EMPTY for k, v in delta.items())


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
        if not isinstance(delta, dict) or any(v not in EMPTY for v in delta.values()):
            return False
    return True
