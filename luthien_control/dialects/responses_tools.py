"""Where the Responses API keeps tool calls: output items of a buffered answer, and the
same items in a request's ``input``. The stream's: ``responses_tool_stream``.

Besides ``function_call`` and ``custom_tool_call``, the API's built-in tools produce
call items of their own type (``BUILTIN_ITEMS``). Each is a call to ``ToolCallPolicy``:
its type is its tool name for ``allowed_tools`` and ``denied_tools``, its own ``name``
too where it has one (an MCP tool), and its argument-like fields are its arguments.
"""

from __future__ import annotations

from typing import Any

import orjson

from luthien_control.dialects.tool_calls import NO_CALLS, FoundCall, ToolCalls
from luthien_control.policies.tools.call import ToolCall, json_text, text_of, versions

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


def output_calls(output: list[Any]) -> ToolCalls:
    """The tool-call items of a Responses ``output``. Committed: the dropped ones removed."""
    found = [FoundCall(calls, item) for item in output if (calls := item_calls(item)) is not None]
    if not found:
        return NO_CALLS

    def commit() -> bool:
        gone = {id(call.at) for call in found if call.dropped}
        if not gone:
            return False
        output[:] = [item for item in output if id(item) not in gone]
        return True

    return ToolCalls(found, commit)


def input_calls(items: list[Any]) -> ToolCalls:
    """The tool-call items of a Responses ``input``. Committed: the dropped ones removed
    with their results (matched by the id of the call they answer)."""
    found = [FoundCall(calls, item) for item in items if (calls := item_calls(item)) is not None]
    if not found:
        return NO_CALLS

    def commit() -> bool:
        gone: set[int] = set()
        dropped: set[str] = set()
        for call in found:
            if call.dropped:
                item = call.at
                gone.add(id(item))
                dropped.update(
                    value
                    for value in (call.versions[0].id, item.get("call_id"), item.get("id"))
                    if isinstance(value, str)
                )
        if not gone:
            return False
        kept = [item for item in items if id(item) not in gone]
        items[:] = [item for item in kept if _answered(item) not in dropped]
        return True

    return ToolCalls(found, commit)


def remove_calls(data: dict[str, Any]) -> None:
    """Take every tool-call item out of the ``output`` of an event's response, in place."""
    response = data.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    if isinstance(output, list):
        output[:] = [entry for entry in output if item_calls(entry) is None]


def _answered(item: Any) -> str | None:
    """The id of the call an input item answers; ``None`` when it answers none."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    field = _RESULTS.get(kind) if isinstance(kind, str) else None
    value = item.get(field) if field is not None else None
    return value if isinstance(value, str) else None
