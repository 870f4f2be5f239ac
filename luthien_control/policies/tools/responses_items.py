"""The tool calls of the Responses API: output items of a buffered answer, and the same
items in a request's ``input``.

Besides ``function_call`` and ``custom_tool_call``, the API's built-in tools produce
call items of their own type (``BUILTIN_ITEMS``). Each is a call to ``ToolCallPolicy``:
its type is its tool name for ``allowed_tools`` and ``denied_tools``, its own ``name``
too where it has one (an MCP tool), and its argument-like fields are its arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from luthien_control.policies.tools.call import ToolCall, json_text, text_of, versions
from luthien_control.transaction import Transaction

if TYPE_CHECKING:
    from luthien_control.policies.tools.policy import ToolCallPolicy

# Function tools' call items, with the field holding their arguments.
FUNCTION_ITEMS = {"function_call": "arguments", "custom_tool_call": "input"}
# Built-in tools' call items, with their argument-like fields (the shapes of the openai
# SDK's types/responses: local_shell_call's action.command is an argument vector,
# shell_call's action.commands a list of command lines, apply_patch_call's operation
# holds the path and the diff, mcp_call's arguments a JSON string).
BUILTIN_ITEMS: dict[str, tuple[str, ...]] = {
    "local_shell_call": ("action",),
    "shell_call": ("action",),
    "computer_call": ("action", "actions"),
    "apply_patch_call": ("operation",),
    "mcp_call": ("server_label", "arguments"),
    "mcp_approval_request": ("server_label", "arguments"),
    "code_interpreter_call": ("code",),
    "web_search_call": ("action",),
    "file_search_call": ("queries",),
    "image_generation_call": ("revised_prompt",),
    "tool_search_call": ("arguments",),
    "program": ("code",),
}
# Input items that answer a call, and the field naming the call they answer.
_RESULTS = {
    "function_call_output": "call_id",
    "custom_tool_call_output": "call_id",
    "local_shell_call_output": "id",  # the id of the call it answers
    "shell_call_output": "call_id",
    "computer_call_output": "call_id",
    "apply_patch_call_output": "call_id",
    "tool_search_output": "call_id",
    "program_output": "call_id",
    "mcp_approval_response": "approval_request_id",
}


def is_call_type(kind: Any) -> bool:
    """Whether items of type ``kind`` are tool calls."""
    return isinstance(kind, str) and (kind in FUNCTION_ITEMS or kind in BUILTIN_ITEMS)


def item_calls(item: Any) -> list[ToolCall] | None:
    """The call a Responses API item is, in every version to check (a built-in call by
    its type and by its name); ``None`` for an item that is not a call. Its id is the
    ``call_id`` (which results refer to), else the item's ``id``."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if not is_call_type(kind):
        return None
    assert isinstance(kind, str)
    call_id = item.get("call_id")
    if not isinstance(call_id, str):
        call_id = item.get("id") if kind in BUILTIN_ITEMS else None
        call_id = call_id if isinstance(call_id, str) else None
    if kind in FUNCTION_ITEMS:
        arguments = json_text(item.get(FUNCTION_ITEMS[kind]))
        return [ToolCall.of(call_id, text_of(item.get("name")), arguments)]
    fields = {key: item[key] for key in BUILTIN_ITEMS[kind] if key in item}
    arguments = orjson.dumps(fields).decode() if fields else ""
    return versions(call_id, builtin_names(kind, item), [arguments], item_type=kind)


def builtin_names(kind: str, item: dict[str, Any]) -> list[str]:
    """A built-in call's names for the lists: its type, and its own name if it has one."""
    name = item.get("name")
    return [kind, name] if isinstance(name, str) and name else [kind]


def filter_output(policy: ToolCallPolicy, tx: Transaction, output: list[Any]) -> bool:
    """Judge the tool-call items of a Responses ``output`` and remove the dropped ones."""
    kept = [item for item in output if _passes(policy, tx, item_calls(item), "response")]
    if len(kept) == len(output):
        return False
    output[:] = kept
    return True


def filter_input(policy: ToolCallPolicy, tx: Transaction, items: list[Any]) -> bool:
    """Drop violating tool-call items from a Responses ``input``, with their results
    (matched by the id of the call they answer)."""
    dropped: set[str] = set()
    kept = []
    for item in items:
        calls = item_calls(item)
        if _passes(policy, tx, calls, "request"):
            kept.append(item)
        else:
            assert calls is not None and isinstance(item, dict)
            dropped.update(
                value
                for value in (calls[0].id, item.get("call_id"), item.get("id"))
                if isinstance(value, str)
            )
    if len(kept) == len(items):
        return False
    items[:] = [item for item in kept if _answered(item) not in dropped]
    return True


def remove_calls(data: dict[str, Any]) -> None:
    """Take every tool-call item out of the ``output`` of an event's response, in place."""
    response = data.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    if isinstance(output, list):
        output[:] = [entry for entry in output if item_calls(entry) is None]


def _passes(
    policy: ToolCallPolicy, tx: Transaction, calls: list[ToolCall] | None, where: str
) -> bool:
    """Whether an item may stay: not a call, or every version of its call passes."""
    return calls is None or all(policy.judge(tx, call, where=where) for call in calls)


def _answered(item: Any) -> str | None:
    """The id of the call an input item answers; ``None`` when it answers none."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    field = _RESULTS.get(kind) if isinstance(kind, str) else None
    value = item.get(field) if field is not None else None
    return value if isinstance(value, str) else None
