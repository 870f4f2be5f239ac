"""The dialect-neutral view of tool calls (``dialects/tool_calls.py``): every dialect
finds the calls of a request and a buffered answer in order, as ``ToolCall``s, and
repairs the payload its own way when some are dropped; its stream holder asks a judge."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from luthien_control.dialects import CHAT, MESSAGES, RESPONSES
from luthien_control.policies.tools import ToolCall
from luthien_control.policies.tools.hold import CallJudge
from luthien_control.sse import Chunk


def names(calls: Any) -> list[list[tuple[str | None, str, str]]]:
    return [[(v.id, v.name, v.arguments) for v in found.versions] for found in calls]


def test_chat_answer_calls_in_order_and_the_finish_reason_repaired() -> None:
    payload: dict[str, Any] = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "rm", "arguments": "{}"},
                        },
                    ],
                },
            }
        ]
    }
    calls = CHAT.answer_tool_calls(payload)
    assert names(calls) == [[("a", "rm", "{}")]]
    assert calls.commit() is False  # nothing dropped: nothing changed
    [found] = calls
    found.drop()
    assert calls.commit() is True
    assert payload["choices"][0] == {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": None},
    }


def test_chat_history_drops_the_call_its_result_and_the_empty_message() -> None:
    payload: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "rm", "arguments": "{}"}},
                    {"id": "b", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "gone"},
            {"role": "tool", "tool_call_id": "b", "content": "x"},
        ]
    }
    calls = CHAT.request_tool_calls(payload)
    assert names(calls) == [[("a", "rm", "{}")], [("b", "ls", "{}")]]
    calls.calls[0].drop()
    assert calls.commit() is True
    assert payload["messages"] == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "b", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "x"},
    ]


def test_responses_input_drops_the_item_and_its_output() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "rm", "arguments": "{}"}
    payload: dict[str, Any] = {
        "input": [
            {"role": "user", "content": "hi"},
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "gone"},
        ]
    }
    calls = RESPONSES.request_tool_calls(payload)
    assert names(calls) == [[("c1", "rm", "{}")]]
    calls.calls[0].drop()
    assert calls.commit() is True
    assert payload["input"] == [{"role": "user", "content": "hi"}]


def test_messages_answer_and_history() -> None:
    answer: dict[str, Any] = {
        "content": [
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "t1", "name": "rm", "input": {"p": "/"}},
        ],
        "stop_reason": "tool_use",
    }
    calls = MESSAGES.answer_tool_calls(answer)
    assert names(calls) == [[("t1", "rm", '{"p":"/"}')]]
    calls.calls[0].drop()
    assert calls.commit() is True
    assert answer == {"content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn"}

    request: dict[str, Any] = {
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "rm"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
        ]
    }
    calls = MESSAGES.request_tool_calls(request)
    calls.calls[0].drop()
    assert calls.commit() is True
    removed = {"type": "text", "text": "[a tool call was removed by the proxy's policy]"}
    assert request["messages"] == [
        {"role": "assistant", "content": [removed]},
        {"role": "user", "content": [removed]},
    ]


def test_no_calls_found_in_a_payload_without_them() -> None:
    for dialect, payload in (
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
        (RESPONSES, {"input": "hi"}),
        (MESSAGES, {"messages": [{"role": "user", "content": "hi"}]}),
        (CHAT, "not an object"),
    ):
        calls = dialect.request_tool_calls(payload)
        assert len(calls) == 0
        assert calls.commit() is False


def test_a_stream_holder_asks_the_judge_once_the_call_is_complete() -> None:
    asked: list[ToolCall] = []

    def decide(call: ToolCall, released: bool) -> bool:
        asked.append(call)
        return call.name != "rm"

    def event(data: dict[str, Any]) -> Chunk:
        return Chunk(
            b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        )

    use = {"type": "tool_use", "id": "t", "name": "rm", "input": {}}
    piece = {"type": "input_json_delta", "partial_json": '{"p": "/"}'}
    text = {"type": "text", "text": ""}
    events = [
        event({"type": "content_block_start", "index": 0, "content_block": use}),
        event({"type": "content_block_delta", "index": 0, "delta": piece}),
        event({"type": "content_block_stop", "index": 0}),
        event({"type": "content_block_start", "index": 1, "content_block": text}),
        event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
    ]

    async def run() -> list[Chunk]:
        holder = MESSAGES.tool_call_holder(CallJudge(decide))
        out: list[Chunk] = []
        for chunk in events:
            sent = await holder.on_chunk(chunk)
            if chunk is events[1]:
                assert not asked and not out  # held, not judged yet
            out += sent
        return out + await holder.on_end()

    out = asyncio.run(run())
    assert [(call.name, call.arguments) for call in asked] == [("rm", '{"p": "/"}')]
    assert [orjson.loads(chunk.raw.split(b"data: ", 1)[1]) for chunk in out] == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
    ]
