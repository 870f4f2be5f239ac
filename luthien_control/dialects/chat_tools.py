"""Where chat completions keep tool calls: in a request's history and in a buffered
answer's choices (``tool_calls`` entries, and the legacy ``function_call``). The stream's
tool calls: ``chat_tool_stream``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from luthien_control.dialects.tool_calls import NO_CALLS, FoundCall, ToolCalls
from luthien_control.policies.tools.call import ToolCall, json_text, text_of, versions

CALL_FIELDS = ("tool_calls", "function_call")  # function_call: the legacy single call
CALL_FINISHES = frozenset(CALL_FIELDS)
EMPTY: tuple[Any, ...] = (None, "", [], {})

# What a found call is: (the field it is in, the entry, the name of a legacy call).
_At = tuple[str, dict[str, Any], str]


def answer_calls(choices: list[Any]) -> ToolCalls:
    """The calls of a buffered answer's choices. Committed: the dropped ones removed, and
    a choice left without calls finishes with ``stop``."""
    groups: list[tuple[dict[str, Any], dict[str, Any], list[FoundCall]]] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and (found := message_calls(message)):
            groups.append((choice, message, found))
    if not groups:
        return NO_CALLS

    def commit() -> bool:
        changed = False
        for choice, message, found in groups:
            if remove_dropped(message, found):
                changed = True
                remaining = message.get("tool_calls") or message.get("function_call")
                if not remaining and choice.get("finish_reason") in CALL_FINISHES:
                    choice["finish_reason"] = "stop"
        return changed

    return ToolCalls([call for _, _, found in groups for call in found], commit)


def history_calls(messages: list[Any]) -> ToolCalls:
    """The calls of a request's assistant messages. Committed: the dropped ones removed
    with their results and any assistant message left empty (a backend rejects
    orphaned results and empty messages)."""
    groups: list[tuple[int, dict[str, Any], list[FoundCall]]] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        if found := message_calls(message):
            groups.append((position, message, found))
    if not groups:
        return NO_CALLS

    def commit() -> bool:
        dropped: set[tuple[str, str | None]] = set()
        empty: set[int] = set()
        for position, message, found in groups:
            removed = remove_dropped(message, found)
            if removed:
                dropped.update(removed)
                if all(message.get(key) in EMPTY for key in ("content", *CALL_FIELDS)):
                    empty.add(position)
        if not dropped:
            return False
        messages[:] = [
            message
            for position, message in enumerate(messages)
            if position not in empty and _result_of(message) not in dropped
        ]
        return True

    return ToolCalls([call for _, _, found in groups for call in found], commit)


def message_calls(message: dict[str, Any]) -> list[FoundCall]:
    """A message's calls, in order: its ``tool_calls`` entries, then ``function_call``.
    Entries that are not objects are no calls (and stay)."""
    found: list[FoundCall] = []
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        for item in calls:
            if isinstance(item, dict):
                found.append(FoundCall(_item_calls(item), ("tool_calls", item, "")))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        name = text_of(legacy.get("name"))
        legacy_calls = versions(None, [name], argument_fields(legacy, json_text))
        found.append(FoundCall(legacy_calls, ("function_call", legacy, name)))
    return found


def remove_dropped(message: dict[str, Any], found: list[FoundCall]) -> list[tuple[str, str | None]]:
    """Take ``message``'s dropped calls out; returns what was dropped, as
    ``("tool", id)`` and ``("function", name)``."""
    dropped: list[tuple[str, str | None]] = []
    gone: set[int] = set()
    legacy: str | None = None
    for call in found:
        if not call.dropped:
            continue
        at: _At = call.at
        field, entry, name = at
        if field == "tool_calls":
            gone.add(id(entry))
            call_id = entry.get("id")
            dropped.append(("tool", call_id if isinstance(call_id, str) else None))
        else:
            legacy = name
    if gone:
        kept = [item for item in message["tool_calls"] if id(item) not in gone]
        if kept:
            message["tool_calls"] = kept
        else:
            del message["tool_calls"]
    if legacy is not None:
        del message["function_call"]
        dropped.append(("function", legacy))
    return dropped


def function_parts(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a ``tool_calls`` entry (or delta) that describe the call, with
    their key: ``function``, and ``custom`` for a custom tool. Both are read when both
    are there, since the client picks one by the entry's ``type``."""
    parts = ((key, entry.get(key)) for key in ("function", "custom"))
    return [(key, part) for key, part in parts if isinstance(part, dict)]


def argument_fields(part: dict[str, Any], text: Callable[[Any], str]) -> list[str]:
    """The arguments a function object holds, as text: its ``arguments`` (a function)
    and its ``input`` (a custom tool), whichever are there."""
    return [text(part[key]) for key in ("arguments", "input") if key in part]


def _result_of(message: Any) -> tuple[str, str | None] | None:
    """Which call a ``tool`` (by id) or legacy ``function`` (by name) message answers."""
    if isinstance(message, dict):
        role = message.get("role")
        if role == "tool":
            return ("tool", message.get("tool_call_id"))
        if role == "function":
            return ("function", message.get("name"))
    return None


def _item_calls(item: dict[str, Any]) -> list[ToolCall]:
    """The call of a ``tool_calls`` entry: one version for its ``function`` and one for
    its ``custom`` object when it has both (an entry with neither: a call without name)."""
    call_id = item.get("id")
    call_id = call_id if isinstance(call_id, str) else None
    parts = function_parts(item)
    if not parts:
        return versions(call_id, [], [])
    return [
        call
        for _, part in parts
        for call in versions(call_id, [text_of(part.get("name"))], argument_fields(part, json_text))
    ]
