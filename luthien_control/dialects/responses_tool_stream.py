"""Holding the tool-call items of a Responses API stream, from each item's
``response.output_item.added`` to its ``response.output_item.done``."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from luthien_control.dialects.responses import RESPONSES_TERMINAL
from luthien_control.dialects.responses_tools import (
    BUILTIN_ITEMS,
    FUNCTION_ITEMS,
    is_call_type,
    item_calls,
    remove_calls,
)
from luthien_control.policies.tools.call import ToolCall, json_text, text_of, versions
from luthien_control.policies.tools.hold import CallJudge, Held
from luthien_control.sse import Chunk

_ITEM_ADDED = "response.output_item.added"
_ITEM_DONE = "response.output_item.done"
# Events of a call item that carry a piece of its arguments (``delta``), and those that
# state a whole text (the field that holds it): arguments, a custom tool's input, an MCP
# call's arguments, a code interpreter's code, one of a shell call's commands.
_TEXT_DELTAS = frozenset(
    {
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
        "response.code_interpreter_call_code.delta",
    }
)
_TEXT_DONES = {
    "response.function_call_arguments.done": "arguments",
    "response.custom_tool_call_input.done": "input",
    "response.mcp_call_arguments.done": "arguments",
    "response.code_interpreter_call_code.done": "code",
    "response.shell_call_command.added": "command",
    "response.shell_call_command.done": "command",
}
_COMMAND_DELTA = "response.shell_call_command.delta"  # a piece of command command_index
# The item type that the events named ``<prefix>...`` belong to: an event that comes
# before its item's output_item.added starts a held item of that type.
_EVENT_ITEMS = (
    ("response.function_call_arguments.", "function_call"),
    ("response.custom_tool_call_input.", "custom_tool_call"),
    ("response.mcp_call_arguments.", "mcp_call"),
    ("response.mcp_call.", "mcp_call"),
    ("response.code_interpreter_call_code.", "code_interpreter_call"),
    ("response.code_interpreter_call.", "code_interpreter_call"),
    ("response.shell_call_command.", "shell_call"),
    ("response.web_search_call.", "web_search_call"),
    ("response.file_search_call.", "file_search_call"),
    ("response.image_generation_call.", "image_generation_call"),
)


@dataclass(slots=True, eq=False)
class _Item(Held[Chunk]):
    """A tool-call output item of a Responses stream, and its held events."""

    index: int  # the backend's output_index
    kind: str  # the item type: function_call, custom_tool_call, or a built-in call
    id: str | None = None
    call_id: str | None = None
    names: list[str] = field(default_factory=list)
    # The arguments (code, ...) as the deltas spell them out, in pieces joined when read.
    pieces: list[str] = field(default_factory=list)
    finals: list[str] = field(default_factory=list)  # as the done events state them
    commands: dict[int, list[str]] = field(default_factory=dict)  # a shell call's, streamed
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # a built-in's item

    def note(self, item: dict[str, Any], *, final: bool) -> None:
        """Take what an ``output_item`` event's item says about the call."""
        item_id, call_id, name = item.get("id"), item.get("call_id"), item.get("name")
        if isinstance(item_id, str) and item_id:
            self.id = self.id or item_id
        if isinstance(call_id, str) and call_id:
            self.call_id = self.call_id or call_id
        if isinstance(name, str) and name and name not in self.names:
            self.names.append(name)
        if self.kind not in FUNCTION_ITEMS:
            self.snapshots.append(item)
            return
        arguments = item.get(FUNCTION_ITEMS[self.kind])
        if arguments is not None and not isinstance(arguments, str):
            arguments = json_text(arguments)  # an object, not JSON text: checked as its JSON
        if isinstance(arguments, str):
            if final:
                self.finals.append(arguments)
            elif arguments:
                self.pieces.insert(0, arguments)

    def absorb(self, kind: str, data: dict[str, Any]) -> None:
        """Take what an event of the item other than ``output_item`` says."""
        if kind in _TEXT_DELTAS:
            self.pieces.append(text_of(data.get("delta")))
        elif kind == _COMMAND_DELTA:
            number = data.get("command_index")
            number = number if isinstance(number, int) else -1
            self.commands.setdefault(number, []).append(text_of(data.get("delta")))
        elif kind in _TEXT_DONES:
            value = data.get(_TEXT_DONES[kind])
            if value is not None and not isinstance(value, str):
                value = json_text(value)
            if isinstance(value, str) and value:
                self.finals.append(value)
            name = data.get("name")
            if isinstance(name, str) and name and name not in self.names:
                self.names.append(name)

    def versions(self) -> list[ToolCall]:
        """Every version of the call the client could take (they differ only when the
        backend contradicts itself): each name with each spelling of the arguments."""
        call_id = self.call_id or (self.id if self.kind in BUILTIN_ITEMS else None)
        if self.kind in FUNCTION_ITEMS:
            names = self.names or [""]
            streamed = "".join(self.pieces)
            arguments = list(dict.fromkeys([streamed, *self.finals]))
            if len(arguments) > 1 and streamed == "" and self.finals:
                arguments.remove("")  # the whole arguments came only in the done events
            return versions(call_id, names, arguments)
        calls = [call for item in self.snapshots for call in item_calls(item) or ()]
        commands = "\n".join("".join(self.commands[n]) for n in sorted(self.commands))
        texts = ["".join(self.pieces), *self.finals, commands]
        texts = [text for text in texts if text]
        if texts or not calls:  # what the events spelled out, under every name
            names = [self.kind, *self.names]
            calls += versions(call_id, names, texts, item_type=self.kind)
        return calls


class ResponsesCalls:
    """Holds every event of a tool-call output item until the item is done, then checks
    the call and releases the events unchanged, raises ``PolicyBlocked``, or drops them.

    Events of other items go on at once. After a drop, the ``output_index`` of later
    items and every ``sequence_number`` are shifted down so that the client's stream has
    no gaps, and the item is removed from the ``output`` of the terminal event.
    """

    def __init__(self, judge: CallJudge) -> None:
        self._judge = judge
        self._items: dict[int, _Item] = {}  # by the backend's output_index
        self._ids: dict[str, _Item] = {}
        self._dropped: list[int] = []  # output indices of dropped items, sorted
        self._discarded: list[int] = []  # sequence numbers of discarded events, sorted
        self._shifts: dict[int, int] = {}  # output_index -> shift, fixed when first sent

    def on_event(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        """An event whose JSON is an object with a string ``type``."""
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
        item.reopen()
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
        call_kind = entry.get("type") if entry is not None else _item_type_of(kind)
        if not is_call_type(call_kind):
            return None
        assert isinstance(call_kind, str)
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
        else:
            item.absorb(kind, data)

    def _complete_all(self, terminal: dict[str, Any] | None) -> list[Chunk]:
        out: list[Chunk] = []
        for item in sorted(self._items.values(), key=_by_output_index):
            if item.status == "open":
                out.extend(self._complete(item, terminal))
        return out

    def _complete(self, item: _Item, terminal: dict[str, Any] | None) -> list[Chunk]:
        """Judge the item's call: release its held events, drop them, or raise.

        Raising during a terminal event, every tool call is first taken out of that
        event's response: the relay's ``response.failed`` is made from the last response
        the backend sent."""
        held = item.take()
        if self._judge.settle(item, item.versions(), on_block=_remover(terminal)):
            return [self._out(chunk) for chunk in held]
        self._drop(item, held)
        return []

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
            calls = item_calls(entry)
            if calls is None:
                kept.append(entry)
                continue
            item = self._tracked(entry, position)
            if item is not None and item.status == "dropped":
                continue
            released = item is not None and (item.status == "kept" or item.reopened)
            on_block = _remover(data)
            if all(
                self._judge.passes(call, item, released=released, on_block=on_block)
                for call in calls
            ):
                kept.append(entry)
            elif item is not None:
                self._drop(item, item.take())
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


def _item_type_of(kind: str) -> str | None:
    """The type of the call item an event of type ``kind`` belongs to, if any."""
    for prefix, item_type in _EVENT_ITEMS:
        if kind.startswith(prefix):
            return item_type
    return None


def _by_output_index(item: _Item) -> int:
    return item.index


def _remover(terminal: dict[str, Any] | None) -> Callable[[], None] | None:
    """What to do before a block raised during ``terminal``: take its calls out."""
    if terminal is None:
        return None
    return lambda: remove_calls(terminal)
