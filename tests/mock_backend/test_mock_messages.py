"""The mock backend's Anthropic Messages API: exact bytes in process, the official
``anthropic`` SDK against a real server, the default scenario and tool-result follow-ups."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import anthropic
import anyio
import httpx
import orjson
import pytest
from starlette.types import Message

from luthien_control.mock_backend import MockBackend
from luthien_control.mock_backend.messages import signature
from luthien_control.mock_backend.scenario import (
    DirectiveError,
    Scenario,
    ToolCall,
    scenario_from_json,
)

from .conftest import RunningMock, _read_banner

MESSAGES = "/v1/messages"
MODEL = "claude-sonnet-4-5"
GREETING = "Hello from the Luthien mock backend! You said: "
API_KEY = "sk-ant-mock-key-1234"
BASH_CALL = [{"name": "Bash", "arguments": {"command": "rm -rf /"}}]
SCENARIO = orjson.dumps({"x-mock-tool-calls": orjson.dumps(BASH_CALL).decode()}).decode()
POLL_SECONDS = 5.0


def body(text: str = "hi there", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def tool_calls(calls: list[dict[str, Any]]) -> str:
    return quote(orjson.dumps(calls).decode())


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every event; each must be ``event:`` then ``data:``, and
    the data's ``type`` the event's name."""
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b""
    events = []
    for block in blocks[:-1]:
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: "), block
        name = event_line[len(b"event: ") :].decode()
        data = orjson.loads(data_line[len(b"data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


def usage(input_tokens: int, output_tokens: int, read: int = 0, creation: int = 0) -> Any:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "output_tokens": output_tokens,
    }


# --- in process: exact shapes ------------------------------------------------------------


@pytest.fixture
async def keyed_client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=MockBackend(api_key=API_KEY))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        yield client


@pytest.mark.anyio
async def test_message_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(MESSAGES + "?beta=true", json=body("what is  up?"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["id"].startswith("msg_mock_")
    assert data == {
        "id": data["id"],
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": GREETING + "what is  up?"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        # 3 prompt words; 11 words in the reply, one delta each
        "usage": usage(3, 11),
    }
    assert list(data) == [
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
        "usage",
    ]


@pytest.mark.anyio
async def test_stream_exact_bytes(client: httpx.AsyncClient) -> None:
    response = await client.post(
        MESSAGES, json=body("a b", stream=True), headers={"x-mock-content": "Hello there"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    message_id = orjson.loads(response.content.split(b"\n")[1][len(b"data: ") :])["message"]["id"]
    assert response.content == (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"id":"' + message_id.encode() + b'",'
        b'"type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],'
        b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":2,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
        b"\n\n"
        b"event: ping\n"
        b'data: {"type": "ping"}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":" there"}}\n\n'
        b"event: content_block_stop\n"
        b'data: {"type":"content_block_stop","index":0}\n\n'
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
        b'"usage":{"output_tokens":2}}\n\n'
        b"event: message_stop\n"
        b'data: {"type":"message_stop"}\n\n'
    )


@pytest.mark.anyio
async def test_stream_thinking_text_and_tool_use(client: httpx.AsyncClient) -> None:
    response = await client.post(
        MESSAGES,
        json=body(stream=True),
        headers={
            "x-mock-thinking": quote("Plan: look first."),
            "x-mock-content": "Checking.",
            "x-mock-tool-calls": tool_calls(
                [{"name": "get_weather", "arguments": {"city": "Paris"}}]
            ),
            "x-mock-chunk-size": "6",
            "x-mock-cache-read-tokens": "7",
            "x-mock-cache-creation-tokens": "3",
        },
    )
    events = sse_events(response.content)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,  # three thinking pieces and the signature
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * 2,
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * 4,  # the empty one and three fragments
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["usage"] == usage(2, 1, read=7, creation=3)
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "toolu_mock_0", "name": "get_weather", "input": {}},
    ]
    deltas = [
        (data["index"], data["delta"]) for name, data in events if name == "content_block_delta"
    ]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "Plan: "}),
        (0, {"type": "thinking_delta", "thinking": "look f"}),
        (0, {"type": "thinking_delta", "thinking": "irst."}),
        (0, {"type": "signature_delta", "signature": signature("Plan: look first.")}),
        (1, {"type": "text_delta", "text": "Checki"}),
        (1, {"type": "text_delta", "text": "ng."}),
        (2, {"type": "input_json_delta", "partial_json": ""}),
        (2, {"type": "input_json_delta", "partial_json": '{"city'}),
        (2, {"type": "input_json_delta", "partial_json": '":"Par'}),
        (2, {"type": "input_json_delta", "partial_json": 'is"}'}),
    ]
    stops = [data["index"] for name, data in events if name == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 8},
    }


@pytest.mark.anyio
async def test_non_streamed_blocks_and_tool_input_as_scripted(client: httpx.AsyncClient) -> None:
    arguments = '{"path": "/etc/\\u0070asswd", "n": 1}'
    response = await client.post(
        MESSAGES,
        json=body(),
        headers={
            "x-mock-thinking": "hm",
            "x-mock-tool-calls": tool_calls(
                [{"name": "read_file", "arguments": arguments}, {"name": "noop"}]
            ),
        },
    )
    # The input goes out byte for byte as scripted, escapes and spaces included.
    assert b'"input":{"path": "/etc/\\u0070asswd", "n": 1}}' in response.content
    data = response.json()
    assert data["content"] == [
        {"type": "thinking", "thinking": "hm", "signature": signature("hm")},
        {
            "type": "tool_use",
            "id": "toolu_mock_0",
            "name": "read_file",
            "input": {"path": "/etc/passwd", "n": 1},
        },
        {"type": "tool_use", "id": "toolu_mock_1", "name": "noop", "input": {}},
    ]
    assert data["stop_reason"] == "tool_use"
    # one thinking delta; fragments of 8 characters: 36 -> 5, 2 -> 1
    assert data["usage"] == usage(2, 7)


@pytest.mark.anyio
async def test_max_tokens_cuts_the_answer(client: httpx.AsyncClient) -> None:
    headers = {
        "x-mock-words": "5",
        "x-mock-tool-calls": tool_calls([{"name": "f", "arguments": {}}]),
    }
    cut = await client.post(MESSAGES, json={**body(), "max_tokens": 3}, headers=headers)
    assert cut.json()["content"] == [{"type": "text", "text": "word0 word1 word2"}]
    assert cut.json()["stop_reason"] == "max_tokens"
    assert cut.json()["usage"]["output_tokens"] == 3

    streamed = await client.post(
        MESSAGES, json={**body(stream=True), "max_tokens": 3}, headers=headers
    )
    events = sse_events(streamed.content)
    texts = [data["delta"]["text"] for name, data in events if name == "content_block_delta"]
    assert texts == ["word0", " word1", " word2"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"

    fits = await client.post(MESSAGES, json={**body(), "max_tokens": 6}, headers=headers)
    assert [block["type"] for block in fits.json()["content"]] == ["text", "tool_use"]
    assert fits.json()["stop_reason"] == "tool_use"


@pytest.mark.anyio
async def test_tool_result_is_answered_with_text(client: httpx.AsyncClient) -> None:
    history = [
        {"role": "user", "content": "List the files."},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_mock_0",
                    "name": "Bash",
                    "input": {"command": "ls"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_mock_0",
                    "content": [{"type": "text", "text": "a.txt b.txt"}],
                }
            ],
        },
    ]
    headers = {"x-mock-tool-calls": tool_calls(BASH_CALL)}
    response = await client.post(MESSAGES, json={**body(), "messages": history}, headers=headers)
    data = response.json()
    assert data["content"] == [{"type": "text", "text": GREETING + "a.txt b.txt"}]
    assert data["stop_reason"] == "end_turn"
    # 3 + 2 words of text; the assistant's tool call is not text
    assert data["usage"]["input_tokens"] == 5


@pytest.mark.anyio
async def test_a_claude_code_request_is_accepted(client: httpx.AsyncClient) -> None:
    tool = {
        "name": "Tool",
        "description": "does things " * 200,
        "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
    }
    request = {
        "model": "claude-opus-4-1-20250805",
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "temperature": 1,
        "metadata": {"user_id": "user_abc_account__session_123"},
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
        ],
        "tools": [{**tool, "name": f"Tool{index}"} for index in range(24)],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "say hi"}]},
            {"role": "system", "content": "a reminder in the middle"},
            {"role": "user", "content": [{"type": "text", "text": "please"}]},
        ],
    }
    assert len(orjson.dumps(request)) > 50_000
    response = await client.post(
        MESSAGES + "?beta=true",
        json=request,
        headers={"x-api-key": "anything", "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200
    events = sse_events(response.content)
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == GREETING + "please"
    # system 4 words, messages 2 + 5 + 1
    assert events[0][1]["message"]["usage"]["input_tokens"] == 12


@pytest.mark.anyio
async def test_count_tokens(client: httpx.AsyncClient) -> None:
    request = {
        "model": MODEL,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "one two three"}]}],
    }
    response = await client.post(MESSAGES + "/count_tokens?beta=true", json=request)
    assert response.status_code == 200
    assert response.json() == {"input_tokens": 5}
    missing = await client.post(MESSAGES + "/count_tokens", json={"model": MODEL})
    assert missing.status_code == 400
    assert missing.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages: Field required"},
    }


@pytest.mark.anyio
async def test_root_answers_head_and_get(client: httpx.AsyncClient) -> None:
    head = await client.head("/")
    assert head.status_code == 200
    assert head.content == b""
    get = await client.get("/")
    assert get.status_code == 200
    assert get.json() == {"status": "ok"}
    assert (await client.get("/_mock/requests")).json() == []


# --- in process: errors ------------------------------------------------------------------


def anthropic_error(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


@pytest.mark.anyio
async def test_unknown_model_is_anthropics_404(client: httpx.AsyncClient) -> None:
    response = await client.post(MESSAGES, json={**body(), "model": "gpt-nope"})
    assert response.status_code == 404
    assert response.json() == anthropic_error("not_found_error", "model: gpt-nope")


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"messages": [], "max_tokens": 5}, "model: Field required"),
        ({"model": MODEL, "max_tokens": 5}, "messages: Field required"),
        ({"model": MODEL, "messages": []}, "max_tokens: Field required"),
        ({"model": 4, "messages": [], "max_tokens": 5}, "model: Input should be a valid string"),
        (
            {"model": MODEL, "messages": "hi", "max_tokens": 5},
            "messages: Input should be a valid list",
        ),
        (
            {"model": MODEL, "messages": [], "max_tokens": "5"},
            "max_tokens: Input should be a valid integer",
        ),
        (
            {"model": MODEL, "messages": [], "max_tokens": 0},
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            {"model": MODEL, "messages": [], "max_tokens": 5, "stream": "yes"},
            "stream: Input should be a valid boolean",
        ),
        ([1, 2], "The request body is not a valid JSON object."),
    ],
)
@pytest.mark.anyio
async def test_invalid_request_is_a_400(
    client: httpx.AsyncClient, request_body: Any, message: str
) -> None:
    response = await client.post(MESSAGES, json=request_body)
    assert response.status_code == 400
    assert response.json() == anthropic_error("invalid_request_error", message)


@pytest.mark.anyio
async def test_bad_json_and_bad_directives_are_anthropic_400s(client: httpx.AsyncClient) -> None:
    bad_json = await client.post(MESSAGES, content=b"{not json")
    assert bad_json.status_code == 400
    assert bad_json.json() == anthropic_error(
        "invalid_request_error", "The request body is not a valid JSON object."
    )
    bad_header = await client.post(MESSAGES, json=body(), headers={"x-mock-words": "lots"})
    assert bad_header.status_code == 400
    assert bad_header.json() == anthropic_error(
        "invalid_request_error", "Invalid x-mock-words header: expected an integer, got 'lots'"
    )
    not_an_object = await client.post(
        MESSAGES,
        json=body(),
        headers={"x-mock-tool-calls": tool_calls([{"name": "f", "arguments": "[1]"}])},
    )
    assert not_an_object.status_code == 400
    assert not_an_object.json() == anthropic_error(
        "invalid_request_error",
        "Invalid x-mock-tool-calls header: "
        "the arguments of 'f' must be a JSON object on /v1/messages",
    )


@pytest.mark.anyio
async def test_api_key_from_x_api_key_or_bearer(keyed_client: httpx.AsyncClient) -> None:
    missing = await keyed_client.post(MESSAGES, json=body())
    wrong = await keyed_client.post(MESSAGES, json=body(), headers={"x-api-key": "sk-ant-wrong"})
    by_x_api_key = await keyed_client.post(MESSAGES, json=body(), headers={"x-api-key": API_KEY})
    by_bearer = await keyed_client.post(
        MESSAGES, json=body(), headers={"authorization": f"Bearer {API_KEY}"}
    )
    chat_by_x_api_key = await keyed_client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": API_KEY},
    )
    assert missing.status_code == 401
    assert missing.json() == anthropic_error("authentication_error", "x-api-key header is required")
    assert wrong.status_code == 401
    assert wrong.json() == anthropic_error("authentication_error", "invalid x-api-key")
    assert (by_x_api_key.status_code, by_bearer.status_code) == (200, 200)
    assert chat_by_x_api_key.status_code == 401  # OpenAI's routes take the bearer key only
    assert chat_by_x_api_key.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("status", "error_type", "message"),
    [
        (429, "rate_limit_error", None),
        (500, "api_error", "Internal server error"),
        (529, "overloaded_error", "Overloaded"),
        (403, "permission_error", "Injected mock failure (403)."),
        (503, "api_error", "Injected mock failure (503)."),
    ],
)
@pytest.mark.anyio
async def test_injected_status(
    client: httpx.AsyncClient, status: int, error_type: str, message: str | None
) -> None:
    response = await client.post(
        MESSAGES, json=body(stream=True), headers={"x-mock-fail": f"status:{status}"}
    )
    assert response.status_code == status
    error = response.json()
    assert list(error) == ["type", "error"]
    assert (error["type"], error["error"]["type"]) == ("error", error_type)
    if message is not None:
        assert error["error"]["message"] == message


@pytest.mark.anyio
async def test_injected_429_has_retry_after(client: httpx.AsyncClient) -> None:
    response = await client.post(
        MESSAGES, json=body(), headers={"x-mock-fail": "status:429", "x-mock-retry-after": "3"}
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.anyio
async def test_error_event_ends_the_stream(client: httpx.AsyncClient) -> None:
    response = await client.post(
        MESSAGES,
        json=body(stream=True),
        headers={"x-mock-content": "a b c", "x-mock-fail": "error:3", "x-mock-request-id": "err"},
    )
    assert response.status_code == 200
    events = sse_events(response.content)
    # message_start, then three more: the block's start, the ping and "a"
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "error",
    ]
    assert response.content.endswith(
        b'event: error\ndata: {"type":"error","error":'
        b'{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    record = (await client.get("/_mock/requests/err")).json()
    assert (record["outcome"], record["chunks_sent"]) == ("error_event", 5)

    not_streamed = await client.post(MESSAGES, json=body(), headers={"x-mock-fail": "error:0"})
    assert not_streamed.status_code == 529
    assert not_streamed.json() == anthropic_error("overloaded_error", "Overloaded")


@pytest.mark.anyio
async def test_error_event_on_the_openai_routes(client: httpx.AsyncClient) -> None:
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True},
        headers={"x-mock-content": "a b", "x-mock-fail": "error:1"},
    )
    assert chat.content.endswith(
        b'\n\ndata: {"error":{"message":"The server had an error while processing your request. '
        b'Sorry about that!","type":"server_error","param":null,"code":null}}\n\n'
    )
    assert b"[DONE]" not in chat.content
    responses = await client.post(
        "/v1/responses",
        json={"model": "gpt-4o", "input": "x", "stream": True},
        headers={"x-mock-fail": "error:0"},
    )
    last = responses.content.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ")
    assert orjson.loads(last.split(b"data: ")[1]) == {
        "type": "error",
        "code": "server_error",
        "message": "The server had an error while processing your request. Sorry about that!",
        "param": None,
        "sequence_number": 1,
    }


@pytest.mark.anyio
async def test_garbage_event(client: httpx.AsyncClient) -> None:
    response = await client.post(
        MESSAGES,
        json=body(stream=True),
        headers={"x-mock-content": "a", "x-mock-fail": "garbage:0"},
    )
    blocks = response.content.split(b"\n\n")
    assert blocks[1] == b"event: content_block_delta\ndata: this is not json"
    assert blocks[-2] == b'event: message_stop\ndata: {"type":"message_stop"}'


@pytest.mark.anyio
async def test_requests_are_recorded(client: httpx.AsyncClient) -> None:
    request = body(stream=True)
    response = await client.post(
        MESSAGES + "?beta=true",
        json=request,
        headers={"x-mock-request-id": "m-1", "x-mock-content": "a b", "x-api-key": "k"},
    )
    assert response.headers["x-mock-request-id"] == "m-1"
    record = (await client.get("/_mock/requests/m-1")).json()
    assert record["headers"]["x-api-key"] == "k"
    assert record == {
        **record,
        "method": "POST",
        "path": MESSAGES,
        "query": "beta=true",
        "body": request,
        "model": MODEL,
        "stream": True,
        "status": 200,
        "outcome": "completed",
        # message_start, block start, ping, a, b, block stop, message_delta, message_stop
        "chunks_sent": 8,
    }


@pytest.mark.anyio
async def test_disconnect_mid_stream_is_recorded_as_cancelled(backend: MockBackend) -> None:
    """Hand-written ASGI channels: the client goes away after three events."""
    sent: list[Message] = []
    three_events = anyio.Event()
    request = orjson.dumps(body(stream=True))

    async def receive() -> Message:
        if not sent:
            return {"type": "http.request", "body": request, "more_body": False}
        await three_events.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) == 4:  # the start and three events
            three_events.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": MESSAGES,
        "query_string": b"beta=true",
        "headers": [
            (b"x-mock-words", b"100"),
            (b"x-mock-delay-ms", b"5"),
            (b"x-mock-request-id", b"gone"),
        ],
    }
    with anyio.fail_after(5):
        await backend(scope, receive, send)
    record = backend.requests.get("gone")
    assert record is not None
    assert (record["outcome"], record["chunks_sent"], record["stream"]) == ("cancelled", 3, True)
    assert sent[1]["body"].startswith(b"event: message_start\n")


# --- the default scenario ----------------------------------------------------------------


def test_scenario_from_json() -> None:
    scenario = scenario_from_json(
        '{"x-mock-tool-calls": "[{\\"name\\":\\"Bash\\",\\"arguments\\":\\"{}\\"}]",'
        ' "X-Mock-Content": "Grüß 世界", "x-mock-words": 3, "x-mock-delay-ms": 1.5}'
    )
    assert scenario == Scenario(
        content="Grüß 世界",
        words=3,
        delay=0.0015,
        tool_calls=(ToolCall(name="Bash", arguments="{}"),),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{nope", "Invalid scenario: not JSON"),
        ("[]", "Invalid scenario: expected a JSON object of x-mock-* directives"),
        ('{"x-mock-tools": "[]"}', "'x-mock-tools' is not a directive a scenario can set"),
        ('{"x-mock-request-id": "a"}', "'x-mock-request-id' is not a directive"),
        ('{"x-mock-words": true}', "Invalid x-mock-words header: expected a string or a number"),
        ('{"x-mock-words": "many"}', "Invalid x-mock-words header: expected an integer"),
    ],
)
def test_scenario_from_json_refuses(text: str, message: str) -> None:
    with pytest.raises(DirectiveError) as caught:
        scenario_from_json(text)
    assert message in str(caught.value)


@pytest.mark.anyio
async def test_default_scenario_applies_to_requests_without_directives() -> None:
    backend = MockBackend(scenario=scenario_from_json(SCENARIO))
    transport = httpx.ASGITransport(app=backend)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        default = await client.post(MESSAGES, json=body(), headers={"x-mock-request-id": "d"})
        own = await client.post(MESSAGES, json=body(), headers={"x-mock-content": "mine"})
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "go"}]},
        )
        chat_follow_up = await client.post(
            "/v1/chat/completions",
            json={
                "model": "gpt-4o",
                "messages": [
                    {"role": "user", "content": "go"},
                    {"role": "tool", "tool_call_id": "call_mock_0", "content": "done"},
                ],
            },
        )
        responses_follow_up = await client.post(
            "/v1/responses",
            json={
                "model": "gpt-4o",
                "input": [
                    {"role": "user", "content": "go"},
                    {"type": "function_call_output", "call_id": "call_mock_0", "output": "ok"},
                ],
            },
        )
    assert default.json()["content"] == [
        {"type": "tool_use", "id": "toolu_mock_0", "name": "Bash", "input": {"command": "rm -rf /"}}
    ]
    assert default.json()["stop_reason"] == "tool_use"
    assert backend.requests.get("d") is not None
    assert own.json()["content"] == [{"type": "text", "text": "mine"}]
    assert chat.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert chat_follow_up.json()["choices"][0]["message"]["content"] == GREETING + "go"
    assert chat_follow_up.json()["choices"][0]["finish_reason"] == "stop"
    assert [item["type"] for item in responses_follow_up.json()["output"]] == ["message"]


# --- a real server and the official SDK --------------------------------------------------


@pytest.fixture
def sdk(mock_server: RunningMock) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=mock_server.url, api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def async_sdk(mock_server: RunningMock) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=mock_server.url, api_key="x", max_retries=0
    ) as client:
        yield client


@pytest.fixture
def http(mock_server: RunningMock) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock_server.url, timeout=10) as client:
        yield client


def wait_for_outcome(http: httpx.Client, request_id: str, outcome: str) -> dict[str, Any]:
    """Poll the request log until the record reaches ``outcome`` (or the time is up)."""
    deadline = time.monotonic() + POLL_SECONDS
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = http.get(f"/_mock/requests/{request_id}")
        if response.status_code == 200:
            record = response.json()
            if record["outcome"] == outcome:
                break
        time.sleep(0.02)
    assert record.get("outcome") == outcome, record
    return record


USER: list[Any] = [{"role": "user", "content": "Say hello"}]
WEATHER = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]


def test_sdk_create(sdk: anthropic.Anthropic) -> None:
    message = sdk.messages.create(model=MODEL, max_tokens=1024, messages=USER)
    assert message.content == [
        anthropic.types.TextBlock(type="text", text=GREETING + "Say hello", citations=None)
    ]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 10)
    assert message.usage.cache_read_input_tokens == 0


def test_sdk_stream_with_tool_use_and_thinking(sdk: anthropic.Anthropic) -> None:
    headers = {
        "x-mock-thinking": quote("Weather first."),
        "x-mock-content": quote("Héllo, checking"),
        "x-mock-tool-calls": tool_calls(WEATHER),
        "x-mock-chunk-size": "5",
    }
    with sdk.messages.stream(
        model=MODEL, max_tokens=1024, messages=USER, extra_headers=headers
    ) as stream:
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    assert texts == ["Héllo", ", che", "cking"]
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool_use = message.content
    assert isinstance(thinking, anthropic.types.ThinkingBlock)
    assert (thinking.thinking, thinking.signature) == (
        "Weather first.",
        signature("Weather first."),
    )
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "Héllo, checking"
    assert isinstance(tool_use, anthropic.types.ToolUseBlock)
    assert (tool_use.id, tool_use.name) == ("toolu_mock_0", "get_weather")
    assert tool_use.input == {"city": "Paris", "unit": "celsius"}
    assert message.stop_reason == "tool_use"
    # thinking 3 pieces, text 3, arguments (35 characters) 7
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 13)


def test_sdk_raw_stream_events(sdk: anthropic.Anthropic) -> None:
    stream = sdk.messages.create(
        model=MODEL,
        max_tokens=1024,
        messages=USER,
        stream=True,
        extra_headers={"x-mock-content": "one two"},
    )
    assert [event.type for event in stream] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.anyio
async def test_async_sdk_create_with_tool_use(async_sdk: anthropic.AsyncAnthropic) -> None:
    message = await async_sdk.messages.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        messages=USER,
        extra_headers={"x-mock-tool-calls": tool_calls(WEATHER)},
    )
    assert message.model == "claude-haiku-4-5"
    assert message.content == [
        anthropic.types.ToolUseBlock(
            type="tool_use",
            id="toolu_mock_0",
            name="get_weather",
            input={"city": "Paris", "unit": "celsius"},
        )
    ]
    assert message.stop_reason == "tool_use"


@pytest.mark.anyio
async def test_async_sdk_stream_final_message(async_sdk: anthropic.AsyncAnthropic) -> None:
    headers = {"x-mock-tool-calls": tool_calls(WEATHER), "x-mock-words": "3"}
    async with async_sdk.messages.stream(
        model=MODEL, max_tokens=1024, messages=USER, extra_headers=headers
    ) as stream:
        message = await stream.get_final_message()
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].type == "text" and message.content[0].text == "word0 word1 word2"
    assert message.content[1].type == "tool_use"
    assert message.content[1].input == {"city": "Paris", "unit": "celsius"}
    assert (message.stop_reason, message.usage.output_tokens) == ("tool_use", 8)


def test_sdk_errors(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as not_found:
        sdk.messages.create(model="gpt-nope", max_tokens=10, messages=USER)
    assert (not_found.value.type, not_found.value.api_message) == (
        "not_found_error",
        "model: gpt-nope",
    )
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk.messages.create(
            model=MODEL, max_tokens=10, messages=USER, extra_headers={"x-mock-fail": "status:429"}
        )
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.type == "rate_limit_error"
    with pytest.raises(anthropic.OverloadedError):
        sdk.messages.create(
            model=MODEL, max_tokens=10, messages=USER, extra_headers={"x-mock-fail": "status:529"}
        )


def test_sdk_raises_the_error_event(sdk: anthropic.Anthropic) -> None:
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        sdk.messages.stream(
            model=MODEL,
            max_tokens=1024,
            messages=USER,
            extra_headers={"x-mock-words": "5", "x-mock-fail": "error:4"},
        ) as stream,
    ):
        texts.extend(stream.text_stream)
    assert texts == ["word0", " word1"]
    assert (caught.value.type, caught.value.api_message) == ("overloaded_error", "Overloaded")


def test_sdk_count_tokens(sdk: anthropic.Anthropic) -> None:
    counted = sdk.messages.count_tokens(model=MODEL, system="be brief", messages=USER)
    assert counted.input_tokens == 4


def test_head_root(http: httpx.Client) -> None:
    response = http.head("/")
    assert response.status_code == 200
    assert response.content == b""


def test_client_disconnect_cancels_the_stream(http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    headers = {"x-mock-words": "100", "x-mock-delay-ms": "50", "x-mock-request-id": request_id}
    with http.stream(
        "POST", MESSAGES + "?beta=true", json=body(stream=True), headers=headers
    ) as response:
        # Keep the iterator alive: abandoning it would close the connection right away.
        lines = response.iter_lines()
        events: list[str] = []
        while len(events) < 3:
            line = next(lines)
            if line.startswith("event: "):
                events.append(line)
        assert events == ["event: message_start", "event: content_block_start", "event: ping"]
        assert http.get(f"/_mock/requests/{request_id}").json()["outcome"] == "in_progress"
    record = wait_for_outcome(http, request_id, "cancelled")
    assert record["stream"] is True
    assert 3 <= record["chunks_sent"] < 106


# --- a real server with a default scenario and a key -------------------------------------


@pytest.fixture(scope="module")
def scenario_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMock]:
    """``python -m luthien_control.mock_backend --scenario ... --api-key ...``."""
    log = tmp_path_factory.mktemp("mock_scenario") / "stderr.log"
    env = {
        k: v for k, v in os.environ.items() if k not in ("MOCK_BACKEND_API_KEY", "MOCK_SCENARIO")
    }
    command = [sys.executable, "-m", "luthien_control.mock_backend", "--port", "0"]
    command += ["--api-key", API_KEY, "--scenario", SCENARIO]
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env)
    assert process.stdout is not None
    try:
        banner = _read_banner(process, log)
        url = banner.removeprefix("mock backend listening on ").removesuffix("/v1")
        yield RunningMock(url=url, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def test_agent_loop_against_the_default_scenario(scenario_server: RunningMock) -> None:
    """A client that sends no directive gets the scripted Bash call, then, once it sends
    the tool's result, a plain answer: the loop ends."""
    with anthropic.Anthropic(
        base_url=scenario_server.url, api_key=API_KEY, max_retries=0
    ) as client:
        with client.messages.stream(model=MODEL, max_tokens=1024, messages=USER) as stream:
            first = stream.get_final_message()
        assert first.stop_reason == "tool_use"
        call = first.content[0]
        assert isinstance(call, anthropic.types.ToolUseBlock)
        assert (call.name, call.input) == ("Bash", {"command": "rm -rf /"})

        history: list[Any] = [
            *USER,
            {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "refused"}],
            },
        ]
        with client.messages.stream(model=MODEL, max_tokens=1024, messages=history) as stream:
            second = stream.get_final_message()
        assert second.stop_reason == "end_turn"
        assert [(block.type, getattr(block, "text", None)) for block in second.content] == [
            ("text", GREETING + "refused")
        ]

    with (
        anthropic.Anthropic(base_url=scenario_server.url, api_key="sk-wrong", max_retries=0) as bad,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        bad.messages.create(model=MODEL, max_tokens=10, messages=USER)
    assert caught.value.api_message == "invalid x-api-key"


def test_a_bad_mock_scenario_stops_the_start() -> None:
    env = {**os.environ, "MOCK_SCENARIO": '{"x-mock-wordz": 3}'}
    finished = subprocess.run(
        [sys.executable, "-m", "luthien_control.mock_backend", "--port", "0"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert finished.returncode == 2
    assert finished.stdout == b""
    assert finished.stderr.decode().splitlines()[-1] == (
        "python -m luthien_control.mock_backend: error: mock backend scenario: "
        "Invalid scenario: 'x-mock-wordz' is not a directive a scenario can set"
    )
