"""The Responses API (``/v1/responses``): a response object, or its typed event stream.

Streamed, every event is ``event: <type>`` plus ``data: <json>`` carrying the same
``type`` and a ``sequence_number``; the stream ends with ``response.completed`` (there is
no ``[DONE]``).

Scripted tool calls (``x-mock-tool-calls``) become ``function_call`` output items after
the message item (there is no message item when only tool calls were scripted); streamed,
each item's arguments arrive as ``response.function_call_arguments.delta`` fragments.
An input that ends with a tool's output is answered with text only.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from luthien_control.mock_backend.content import Reply, message_text, new_id
from luthien_control.mock_backend.scenario import Scenario


def input_text(value: Any) -> str:
    """The text of a Responses ``input``: a string, or the last user item's text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role", "user") == "user":
                content = item.get("content")
                if isinstance(content, list):
                    return " ".join(
                        part.get("text", "") for part in content if isinstance(part, dict)
                    )
                return message_text(content)
    return ""


def ends_with_tool_output(value: Any) -> bool:
    """Whether the last ``input`` item is a tool's output (``function_call_output``, ...)."""
    if not isinstance(value, list) or not value:
        return False
    last = value[-1]
    return isinstance(last, dict) and str(last.get("type", "")).endswith("_output")


def reply_for(scenario: Scenario, request_input: Any) -> Reply:
    """The planned reply to a Responses request: the scripted text (or the echo of the
    input text, unless only tool calls were scripted) and the scripted tool calls, which
    do not answer a tool's output."""
    if ends_with_tool_output(request_input):
        scenario = scenario.without_tool_calls()
    return Reply.for_text(scenario, input_text, request_input)


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


class _Response:
    """The fields one response keeps across its events."""

    def __init__(self, model: str) -> None:
        self.id = new_id("resp_mock_")
        self.item_id = new_id("msg_mock_")
        self.model = model
        self.created_at = int(time.time())

    def object(
        self, status: str, output: list[dict[str, Any]], usage: Any = None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "usage": usage,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }

    @staticmethod
    def function_call(index: int, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_mock_{index}",
            "call_id": f"call_mock_{index}",
            "name": name,
            "arguments": arguments,
            "status": status,
        }


def _output(response: _Response, reply: Reply) -> list[dict[str, Any]]:
    """The complete output items: the message (if there is text), then the tool calls."""
    output = [] if reply.content is None else [response.message(reply.text, "completed")]
    output.extend(
        response.function_call(index, call.name, call.arguments, "completed")
        for index, call in enumerate(reply.tool_calls)
    )
    return output


def response_json(reply: Reply, model: str, input_tokens: int) -> dict[str, Any]:
    """A non-streamed response object."""
    response = _Response(model)
    usage = _usage(input_tokens, reply.completion_tokens)
    return response.object("completed", _output(response, reply), usage)


def response_stream(reply: Reply, model: str, input_tokens: int) -> list[bytes]:
    """Every event of a streamed response, in order."""
    response = _Response(model)
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": len(events), **fields}
        events.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    emit("response.created", response=response.object("in_progress", []))
    emit("response.in_progress", response=response.object("in_progress", []))
    output: list[dict[str, Any]] = []
    if reply.content is not None:
        where = {"item_id": response.item_id, "output_index": 0, "content_index": 0}
        emit(
            "response.output_item.added",
            output_index=0,
            item={**response.message("", "in_progress"), "content": []},
        )
        emit(
            "response.content_part.added",
            part={"type": "output_text", "text": "", "annotations": []},
            **where,
        )
        for delta in reply.deltas:
            emit("response.output_text.delta", delta=delta, logprobs=[], **where)
        emit("response.output_text.done", text=reply.text, logprobs=[], **where)
        emit(
            "response.content_part.done",
            part={"type": "output_text", "text": reply.text, "annotations": []},
            **where,
        )
        output.append(response.message(reply.text, "completed"))
        emit("response.output_item.done", output_index=0, item=output[-1])
    for index, (call, fragments) in enumerate(zip(reply.tool_calls, reply.fragments, strict=True)):
        position = len(output)
        item_id = f"fc_mock_{index}"
        emit(
            "response.output_item.added",
            output_index=position,
            item=response.function_call(index, call.name, "", "in_progress"),
        )
        for fragment in fragments:
            emit(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=position,
                delta=fragment,
            )
        emit(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=position,
            arguments=call.arguments,
        )
        output.append(response.function_call(index, call.name, call.arguments, "completed"))
        emit("response.output_item.done", output_index=position, item=output[-1])
    usage = _usage(input_tokens, reply.completion_tokens)
    emit("response.completed", response=response.object("completed", output, usage))
    return events
