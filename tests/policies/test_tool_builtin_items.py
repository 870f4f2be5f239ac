"""ToolCallPolicy on the Responses API's built-in tool items: each is a tool call, named
by its type (and by its own name where it has one), its argument-like fields checked
by argument_patterns; held in streams, dropped, and checked in buffered answers and in
the request's ``input``. The item shapes are those of the openai SDK's types/responses.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from luthien_control.exceptions import PolicyBlocked
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, ProxyResponse, Transaction
from tests.policies.test_tools import decisions, policy, run

ITEMS: dict[str, dict[str, Any]] = {
    "local_shell_call": {
        "type": "local_shell_call",
        "id": "lsh_1",
        "call_id": "call_lsh",
        "status": "completed",
        "action": {"type": "exec", "command": ["bash", "-lc", "rm -rf /srv"], "env": {}},
    },
    "shell_call": {
        "type": "shell_call",
        "id": "sh_1",
        "call_id": "call_sh",
        "status": "completed",
        "action": {"commands": ["ls /srv", "rm -rf /srv"], "timeout_ms": 1000},
    },
    "mcp_call": {
        "type": "mcp_call",
        "id": "mcp_1",
        "name": "run_command",
        "server_label": "ops",
        "arguments": '{"cmd": "\\u0072m -rf /srv"}',
        "status": "completed",
    },
    "computer_call": {
        "type": "computer_call",
        "id": "cu_1",
        "call_id": "call_cu",
        "status": "completed",
        "pending_safety_checks": [],
        "action": {"type": "type", "text": "rm -rf /srv\n"},
    },
    "apply_patch_call": {
        "type": "apply_patch_call",
        "id": "ap_1",
        "call_id": "call_ap",
        "status": "completed",
        "operation": {"type": "update_file", "path": "run.sh", "diff": "+rm -rf /srv\n"},
    },
    "code_interpreter_call": {
        "type": "code_interpreter_call",
        "id": "ci_1",
        "container_id": "cntr_1",
        "status": "completed",
        "code": "import os\nos.system('rm -rf /srv')",
        "outputs": None,
    },
    "web_search_call": {
        "type": "web_search_call",
        "id": "ws_1",
        "status": "completed",
        "action": {"type": "search", "query": "how to rm -rf /srv"},
    },
    "file_search_call": {
        "type": "file_search_call",
        "id": "fs_1",
        "status": "completed",
        "queries": ["rm -rf /srv"],
        "results": None,
    },
    "image_generation_call": {
        "type": "image_generation_call",
        "id": "ig_1",
        "status": "completed",
        "result": None,
        "revised_prompt": "a poster saying rm -rf /srv",
    },
}
MESSAGE = {
    "type": "message",
    "id": "msg_1",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "Done.", "annotations": []}],
}
RM = r"rm\s+-rf\s+/srv"


def responded(*output: dict[str, Any]) -> Transaction:
    tx = Transaction(request=ProxyRequest("POST", "/responses", b"", {}, b"{}"), services=None)
    payload = {"id": "resp_1", "object": "response", "status": "completed", "output": output}
    tx.response = ProxyResponse(200, {}, orjson.dumps(payload))
    return tx


def requested(*items: dict[str, Any]) -> Transaction:
    body = orjson.dumps({"model": "m", "input": list(items)})
    return Transaction(request=ProxyRequest("POST", "/responses", b"", {}, body), services=None)


def output_of(tx: Transaction) -> list[dict[str, Any]]:
    assert tx.response is not None
    output: list[dict[str, Any]] = orjson.loads(tx.response.body)["output"]
    return output


# --- buffered answers -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ITEMS)
async def test_each_built_in_item_is_denied_by_its_type(kind: str) -> None:
    tx = responded(MESSAGE, ITEMS[kind])
    with pytest.raises(PolicyBlocked):
        await policy(denied_tools=[kind]).apply(tx)
    assert decisions(tx) == [("ToolCallPolicy", "blocked", f"tool {kind}")]
    tx = responded(MESSAGE, ITEMS[kind])
    await policy(denied_tools=[kind], action="drop_call").apply(tx)
    assert output_of(tx) == [MESSAGE]
    tx = responded(MESSAGE, ITEMS[kind])
    with pytest.raises(PolicyBlocked):
        await policy(allowed_tools=["read_file"]).apply(tx)  # not an allowed tool
    tx = responded(MESSAGE, ITEMS[kind])
    assert tx.response is not None
    body = tx.response.body
    await policy(allowed_tools=[kind, "run_command"]).apply(tx)
    assert tx.response.body is body and tx.decisions == []


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ITEMS)
async def test_each_built_in_item_s_arguments_meet_argument_patterns(kind: str) -> None:
    # An argument vector joined, a list of command lines, an action's text, a patch, code,
    # a query, an MCP call's JSON arguments with an escape in them: all are searched.
    tx = responded(ITEMS[kind])
    with pytest.raises(PolicyBlocked) as caught:
        await policy(argument_patterns=[RM]).apply(tx)
    assert "argument_patterns[0]" in caught.value.message


@pytest.mark.anyio
async def test_an_mcp_call_is_checked_by_its_name_too() -> None:
    item = ITEMS["mcp_call"]
    with pytest.raises(PolicyBlocked):
        await policy(denied_tools=["run_command"]).apply(responded(item))
    with pytest.raises(PolicyBlocked):  # the type alone does not allow every MCP tool
        await policy(allowed_tools=["mcp_call"]).apply(responded(item))
    with pytest.raises(PolicyBlocked):  # nor does the name alone allow an MCP call
        await policy(allowed_tools=["run_command"]).apply(responded(item))
    tx = responded(item)
    await policy(allowed_tools=["mcp_call", "run_command"]).apply(tx)
    assert tx.decisions == []


# --- the request's input ----------------------------------------------------------------


@pytest.mark.anyio
async def test_built_in_calls_in_the_input_are_dropped_with_their_results() -> None:
    user = {"role": "user", "content": "clean up"}
    shell = {"type": "local_shell_call_output", "id": "call_lsh", "output": "ok"}
    approval = {
        "type": "mcp_approval_request",
        "id": "mcpr_1",
        "name": "run_command",
        "server_label": "ops",
        "arguments": "{}",
    }
    approved = {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}
    patch_result = {"type": "apply_patch_call_output", "call_id": "call_ap", "status": "completed"}
    items = [
        user,
        ITEMS["local_shell_call"],
        shell,
        approval,
        approved,
        ITEMS["apply_patch_call"],
        patch_result,
    ]
    with pytest.raises(PolicyBlocked) as caught:
        await policy(denied_tools=["local_shell_call"]).apply(requested(*items))
    assert "in the request" in caught.value.message
    tx = requested(*items)
    p = policy(denied_tools=["local_shell_call", "run_command"], action="drop_call")
    await p.apply(tx)
    sent = orjson.loads(tx.request.body)["input"]
    assert sent == [user, ITEMS["apply_patch_call"], patch_result]
    assert [d[2] for d in decisions(tx)] == ["tool local_shell_call", "tool run_command"]


# --- streams ----------------------------------------------------------------------------


def stream(item: dict[str, Any], *middle: tuple[str, dict[str, Any]]) -> list[Chunk]:
    """A Responses stream: a message item, then ``item`` (added in progress, ``middle``
    events, done), then response.completed; numbered as a backend numbers them."""
    started = {**copy.deepcopy(item), "status": "in_progress"}
    for key in ("arguments", "code"):
        if isinstance(started.get(key), str):
            started[key] = ""
    where = {"output_index": 1, "item_id": item["id"]}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": {"id": "resp_1", "status": "in_progress", "output": []}}),
        ("response.output_item.added", {"output_index": 0, "item": {**MESSAGE, "content": []}}),
        ("response.output_text.delta", {"output_index": 0, "item_id": "msg_1", "delta": "Done."}),
        ("response.output_item.done", {"output_index": 0, "item": MESSAGE}),
        ("response.output_item.added", {"output_index": 1, "item": started}),
        *((kind, {**where, **data}) for kind, data in middle),
        ("response.output_item.done", {"output_index": 1, "item": item}),
        (
            "response.completed",
            {"response": {"id": "resp_1", "status": "completed", "output": [MESSAGE, item]}},
        ),
    ]
    return [
        Chunk.from_data({"type": kind, "sequence_number": number, **data}, event=kind)
        for number, (kind, data) in enumerate(events)
    ]


def streamed(kind: str) -> list[Chunk]:
    """The item of type ``kind`` streamed with the events the API sends for it."""
    item = ITEMS[kind]
    if kind == "mcp_call":
        arguments = item["arguments"]
        return stream(
            item,
            ("response.mcp_call.in_progress", {}),
            ("response.mcp_call_arguments.delta", {"delta": arguments[:12]}),
            ("response.mcp_call_arguments.delta", {"delta": arguments[12:]}),
            ("response.mcp_call_arguments.done", {"arguments": arguments}),
            ("response.mcp_call.completed", {}),
        )
    if kind == "code_interpreter_call":
        code = item["code"]
        return stream(
            item,
            ("response.code_interpreter_call.in_progress", {}),
            ("response.code_interpreter_call_code.delta", {"delta": code[:15]}),
            ("response.code_interpreter_call_code.delta", {"delta": code[15:]}),
            ("response.code_interpreter_call_code.done", {"code": code}),
            ("response.code_interpreter_call.interpreting", {}),
            ("response.code_interpreter_call.completed", {}),
        )
    if kind == "web_search_call":
        return stream(
            item,
            ("response.web_search_call.in_progress", {}),
            ("response.web_search_call.searching", {}),
            ("response.web_search_call.completed", {}),
        )
    return stream(item)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ITEMS)
async def test_a_streamed_built_in_item_is_held_then_released_or_blocked(kind: str) -> None:
    chunks = streamed(kind)
    out, tx = await run(policy(denied_tools=["read_file"]), chunks)
    assert [c.raw for c in out] == [c.raw for c in chunks] and tx.decisions == []
    transform = policy(argument_patterns=[RM]).stream_transform(tx)
    sent: list[Chunk] = []
    with pytest.raises(PolicyBlocked):
        for c in chunks:
            sent.extend(await transform.on_chunk(c))
    assert [c.data["type"] for c in sent] == [
        "response.created",
        "response.output_item.added",
        "response.output_text.delta",
        "response.output_item.done",
    ]  # the message went out; nothing of the call did


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["local_shell_call", "mcp_call", "code_interpreter_call"])
async def test_a_streamed_built_in_item_is_dropped_and_taken_out_of_the_response(
    kind: str,
) -> None:
    chunks = streamed(kind)
    out, tx = await run(policy(denied_tools=[kind], action="drop_call"), chunks)
    kinds = [c.data["type"] for c in out]
    assert kinds == [
        "response.created",
        "response.output_item.added",
        "response.output_text.delta",
        "response.output_item.done",
        "response.completed",
    ]
    assert [c.data["sequence_number"] for c in out] == list(range(len(out)))
    assert out[-1].data["response"]["output"] == [MESSAGE]
    assert decisions(tx) == [("ToolCallPolicy", "dropped", f"tool {kind}")]


@pytest.mark.anyio
async def test_streamed_texts_of_a_built_in_item_are_checked_even_if_the_item_hides_them() -> None:
    # The deltas spell out the command; the item itself claims harmless code.
    item = {**ITEMS["code_interpreter_call"], "code": "print(1)"}
    code = "import os; os.system('rm -rf /srv')"
    chunks = stream(
        item,
        ("response.code_interpreter_call_code.delta", {"delta": code[:20]}),
        ("response.code_interpreter_call_code.delta", {"delta": code[20:]}),
    )
    transform = policy(argument_patterns=[RM]).stream_transform(
        Transaction(request=ProxyRequest("POST", "/responses", b"", {}, b"{}"), services=None)
    )
    with pytest.raises(PolicyBlocked):
        for c in chunks:
            await transform.on_chunk(c)
    shell = {**ITEMS["shell_call"], "action": {"commands": ["ls"]}}
    chunks = stream(
        shell,
        ("response.shell_call_command.added", {"command_index": 0, "command": ""}),
        ("response.shell_call_command.delta", {"command_index": 0, "delta": "rm -r"}),
        ("response.shell_call_command.delta", {"command_index": 0, "delta": "f /srv"}),
    )
    transform = policy(argument_patterns=[RM]).stream_transform(
        Transaction(request=ProxyRequest("POST", "/responses", b"", {}, b"{}"), services=None)
    )
    with pytest.raises(PolicyBlocked):
        for c in chunks:
            await transform.on_chunk(c)


@pytest.mark.anyio
async def test_events_of_a_built_in_item_before_its_item_are_held() -> None:
    orphan = Chunk.from_data(
        {
            "type": "response.mcp_call_arguments.delta",
            "item_id": "mcp_9",
            "output_index": 4,
            "delta": '{"cmd": "rm -rf /srv"}',
        },
        event="response.mcp_call_arguments.delta",
    )
    transform = policy(argument_patterns=[RM]).stream_transform(
        Transaction(request=ProxyRequest("POST", "/responses", b"", {}, b"{}"), services=None)
    )
    assert await transform.on_chunk(orphan) == []
    with pytest.raises(PolicyBlocked):
        await transform.on_end()
