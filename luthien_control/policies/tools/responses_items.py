"""The tool calls of the Responses API: output items of a buffered answer, and the same
items in a request's ``input``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from luthien_control.policies.tools.call import ToolCall, json_text, text_of
from luthien_control.transaction import Transaction

if TYPE_CHECKING:
    from luthien_control.policies.tools.policy import ToolCallPolicy

# Output items that are tool calls, with the field holding their arguments.
CALL_ITEMS = {"function_call": "arguments", "custom_tool_call": "input"}
_CALL_RESULTS = {"function_call_output", "custom_tool_call_output"}


def item_call(item: Any) -> ToolCall | None:
    """The call of a Responses API tool-call item (``function_call``, ``custom_tool_call``);
    ``None`` for any other item. Its id is the ``call_id`` (which results refer to)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    field_name = CALL_ITEMS.get(kind) if isinstance(kind, str) else None
    if field_name is None:
        return None
    call_id = item.get("call_id")
    call_id = call_id if isinstance(call_id, str) else None
    return ToolCall.of(call_id, text_of(item.get("name")), json_text(item.get(field_name)))


def filter_output(policy: ToolCallPolicy, tx: Transaction, output: list[Any]) -> bool:
    """Judge the tool-call items of a Responses ``output`` and remove the dropped ones."""
    kept = [
        item
        for item in output
        if (call := item_call(item)) is None or policy.judge(tx, call, where="response")
    ]
    if len(kept) == len(output):
        return False
    output[:] = kept
    return True


def filter_input(policy: ToolCallPolicy, tx: Transaction, items: list[Any]) -> bool:
    """Drop violating tool-call items from a Responses ``input``, with their results
    (matched by ``call_id``)."""
    dropped: set[str | None] = set()
    kept = []
    for item in items:
        call = item_call(item)
        if call is None or policy.judge(tx, call, where="request"):
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


def remove_calls(data: dict[str, Any]) -> None:
    """Take every tool-call item out of the ``output`` of an event's response, in place."""
    response = data.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    if isinstance(output, list):
        output[:] = [entry for entry in output if item_call(entry) is None]
