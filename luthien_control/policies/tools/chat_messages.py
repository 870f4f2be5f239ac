"""The tool calls of chat-completion messages: in a request's history and in a buffered
answer's choices (``tool_calls`` entries, and the legacy ``function_call``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from luthien_control.policies.tools.call import ToolCall, json_text, text_of
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
            call = _whole_call(item)
            if call is None or policy.judge(tx, call, where=where):
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
        call = ToolCall.of(None, text_of(legacy.get("name")), _arguments(legacy))
        if not policy.judge(tx, call, where=where):
            del message["function_call"]
            dropped.append(("function", call.name))
    return dropped


def _result_of(message: Any) -> tuple[str, str | None] | None:
    """Which call a ``tool`` (by id) or legacy ``function`` (by name) message answers."""
    if isinstance(message, dict):
        role = message.get("role")
        if role == "tool":
            return ("tool", message.get("tool_call_id"))
        if role == "function":
            return ("function", message.get("name"))
    return None


def _arguments(function: dict[str, Any]) -> str:
    """A function's arguments as text (``input`` for custom tools; an object as JSON)."""
    return json_text(function.get("arguments", function.get("input")))


def _whole_call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    function = item.get("function", item.get("custom"))
    function = function if isinstance(function, dict) else {}
    call_id = item.get("id")
    return ToolCall.of(
        call_id if isinstance(call_id, str) else None,
        text_of(function.get("name")),
        _arguments(function),
    )
