"""The tool calls of chat-completion messages: in a request's history and in a buffered
answer's choices (``tool_calls`` entries, and the legacy ``function_call``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from luthien_control.policies.tools.call import ToolCall, json_text, text_of, versions
from luthien_control.transaction import Transaction

if TYPE_CHECKING:
    from luthien_control.policies.tools.policy import ToolCallPolicy

CALL_FIELDS = ("tool_calls", "function_call")  # function_call: the legacy single call
CALL_FINISHES = frozenset(CALL_FIELDS)
EMPTY: tuple[Any, ...] = (None, "", [], {})


def filter_choices(policy: ToolCallPolicy, tx: Transaction, choices: list[Any]) -> bool:
    """Judge the calls of a buffered answer's choices and remove the dropped ones; a
    choice left without calls finishes with ``stop``. Whether anything changed."""
    changed = False
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        dropped = filter_message(policy, tx, message, where="response")
        if dropped:
            changed = True
            remaining = message.get("tool_calls") or message.get("function_call")
            if not remaining and choice.get("finish_reason") in CALL_FINISHES:
                choice["finish_reason"] = "stop"
    return changed


def filter_history(policy: ToolCallPolicy, tx: Transaction, messages: list[Any]) -> bool:
    """Drop violating calls from the history, with their results and any assistant
    message left empty (a backend rejects orphaned results and empty messages)."""
    dropped: set[tuple[str, str | None]] = set()
    empty: set[int] = set()
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        found = filter_message(policy, tx, message, where="request")
        if found:
            dropped.update(found)
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


def filter_message(
    policy: ToolCallPolicy, tx: Transaction, message: dict[str, Any], *, where: str
) -> list[tuple[str, str | None]]:
    """Judge a message's calls and remove the dropped ones; returns what was dropped,
    as ``("tool", id)`` and ``("function", name)``."""
    dropped: list[tuple[str, str | None]] = []
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        kept = []
        for item in calls:
            if not isinstance(item, dict) or _passes(policy, tx, _item_calls(item), where):
                kept.append(item)
            else:
                call_id = item.get("id")
                dropped.append(("tool", call_id if isinstance(call_id, str) else None))
        if dropped:
            if kept:
                message["tool_calls"] = kept
            else:
                del message["tool_calls"]
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        name = text_of(legacy.get("name"))
        legacy_calls = versions(None, [name], argument_fields(legacy, json_text))
        if not _passes(policy, tx, legacy_calls, where):
            del message["function_call"]
            dropped.append(("function", name))
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


def _passes(policy: ToolCallPolicy, tx: Transaction, calls: list[ToolCall], where: str) -> bool:
    """Whether every version of a call passes (the first refused one is decided)."""
    return all(policy.judge(tx, call, where=where) for call in calls)


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
