"""The mock backend in process: response shapes, errors, directives and the request log."""

from __future__ import annotations

import base64
import struct
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import orjson
import pytest
from starlette.types import Message

from luthien_control.mock_backend import ConnectionDropped, MockBackend
from luthien_control.mock_backend.content import embedding_vector

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
GREETING = "Hello from the Luthien mock backend! You said: "


def chat_body(text: str = "hi there", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


def sse_payloads(body: bytes) -> list[bytes]:
    events = body.split(b"\n\n")
    assert events[-1] == b""
    assert all(event.startswith(b"data: ") for event in events[:-1])
    return [event[len(b"data: ") :] for event in events[:-1]]


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_chat_completion_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=chat_body("what is  up?"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["id"].startswith("chatcmpl-mock-")
    assert isinstance(data["created"], int)
    assert data == {
        "id": data["id"],
        "object": "chat.completion",
        "created": data["created"],
        "model": "gpt-4o",
        "system_fingerprint": "fp_mock",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": GREETING + "what is  up?",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        # 3 prompt words; 11 words in the reply, one delta each
        "usage": {"prompt_tokens": 3, "completion_tokens": 11, "total_tokens": 14},
    }
    assert list(data) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    ]


async def test_scripted_content_is_percent_decoded_utf8(client: httpx.AsyncClient) -> None:
    text = "Grüß dich, 世界! 100% sure"
    response = await client.post(CHAT, json=chat_body(), headers={"x-mock-content": quote(text)})
    message = response.json()["choices"][0]["message"]
    assert message["content"] == text
    assert response.json()["usage"]["completion_tokens"] == 5


async def test_words_and_chunks_set_the_completion_tokens(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json=chat_body(), headers={"x-mock-words": "4", "x-mock-chunks": "7"}
    )
    data = response.json()
    assert data["choices"][0]["message"]["content"] == "word0 word1 word2 word3"
    assert data["usage"]["completion_tokens"] == 7


async def test_tool_calls_non_streamed(client: httpx.AsyncClient) -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "lookup", "arguments": '{"q": "x"}'},
    ]
    response = await client.post(
        CHAT, json=chat_body(), headers={"x-mock-tool-calls": quote(orjson.dumps(calls).decode())}
    )
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_mock_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_mock_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": "x"}'},
            },
        ],
        "refusal": None,
    }
    # fragments of 8 characters: 16 -> 2, 10 -> 2
    assert response.json()["usage"]["completion_tokens"] == 4


async def test_tool_calls_with_content(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT,
        json=chat_body(),
        headers={"x-mock-tool-calls": '[{"name": "f", "arguments": {}}]', "x-mock-content": "ok"},
    )
    message = response.json()["choices"][0]["message"]
    assert message["content"] == "ok"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


async def test_stream_wire_format(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json=chat_body(stream=True), headers={"x-mock-content": "Hello from the"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    payloads = sse_payloads(response.content)
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(payload) for payload in payloads[:-1]]
    first = chunks[0]
    assert first["id"].startswith("chatcmpl-mock-")
    for chunk in chunks:
        assert list(chunk) == [
            "id",
            "object",
            "created",
            "model",
            "system_fingerprint",
            "choices",
        ]
        assert (chunk["id"], chunk["created"], chunk["model"]) == (
            first["id"],
            first["created"],
            "gpt-4o",
        )
        assert chunk["object"] == "chat.completion.chunk"
    assert [chunk["choices"] for chunk in chunks] == [
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " from"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " the"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    ]


async def test_stream_include_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT,
        json=chat_body("a b c", stream=True, stream_options={"include_usage": True}),
        headers={"x-mock-content": "abcdef", "x-mock-chunk-size": "4"},
    )
    payloads = sse_payloads(response.content)
    assert payloads[-1] == b"[DONE]"
    assert all(payload.endswith(b',"usage":null}') for payload in payloads[:-2])
    chunks = [orjson.loads(payload) for payload in payloads[:-1]]
    assert [chunk["choices"][0]["delta"] for chunk in chunks[1:3]] == [
        {"content": "abcd"},
        {"content": "ef"},
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_stream_tool_calls_like_openai(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT,
        json=chat_body(stream=True),
        headers={
            "x-mock-tool-calls": quote('[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
            "x-mock-chunk-size": "6",
        },
    )
    chunks = [orjson.loads(payload) for payload in sse_payloads(response.content)[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas == [
        {"role": "assistant", "content": None, "refusal": None},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_mock_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '":"Par'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_garbage_event_then_the_rest(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT,
        json=chat_body(stream=True),
        headers={"x-mock-content": "a b c", "x-mock-fail": "garbage:1"},
    )
    payloads = sse_payloads(response.content)
    assert payloads[2] == b"this is not json"
    assert len(payloads) == 7  # role, a, garbage, b, c, finish, [DONE]
    assert payloads[-1] == b"[DONE]"


async def test_unknown_model_is_openais_404(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={**chat_body(), "model": "gpt-nope"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `gpt-nope` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


async def test_any_mock_prefixed_model_is_known(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={**chat_body(), "model": "mock-anything"})
    assert response.status_code == 200
    assert response.json()["model"] == "mock-anything"


async def test_bad_json_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, content=b"{not json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith("We could not parse the JSON body of your request.")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "gpt-4o"}, "messages", "missing_required_parameter"),
        ({"messages": []}, "model", "missing_required_parameter"),
        ({"model": "gpt-4o", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": 4, "messages": []}, "model", "invalid_type"),
        ({"model": "gpt-4o", "messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"model": "gpt-4o", "messages": [], "stream": "yes"}, "stream", "invalid_type"),
    ],
)
async def test_invalid_request_names_the_param(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, code: str
) -> None:
    response = await client.post(CHAT, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert param in error["message"]


async def test_bad_directive_is_a_400_naming_the_header(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=chat_body(), headers={"x-mock-words": "lots"})
    assert response.status_code == 400
    assert "x-mock-words" in response.json()["error"]["message"]


async def test_api_key_is_required_when_configured() -> None:
    transport = httpx.ASGITransport(app=MockBackend(api_key="sk-mock-secret-1234"))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        missing = await client.post(CHAT, json=chat_body())
        wrong = await client.post(
            CHAT, json=chat_body(), headers={"authorization": "Bearer sk-wrong-key-9876"}
        )
        right = await client.post(
            CHAT, json=chat_body(), headers={"authorization": "Bearer sk-mock-secret-1234"}
        )
        health = await client.get("/health")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert wrong.json()["error"] == {
        "message": "Incorrect API key provided: sk-**********9876. "
        "You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert right.status_code == 200
    assert health.status_code == 200


async def test_injected_500(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json=chat_body(stream=True), headers={"x-mock-fail": "status:500"}
    )
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


async def test_injected_429_has_retry_after(client: httpx.AsyncClient) -> None:
    default = await client.post(CHAT, json=chat_body(), headers={"x-mock-fail": "status:429"})
    custom = await client.post(
        CHAT, json=chat_body(), headers={"x-mock-fail": "status:429", "x-mock-retry-after": "2"}
    )
    assert default.status_code == 429
    assert default.headers["retry-after"] == "7"
    assert default.json()["error"]["code"] == "rate_limit_exceeded"
    assert custom.headers["retry-after"] == "2"


async def test_injected_other_status(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=chat_body(), headers={"x-mock-fail": "status:418"})
    assert response.status_code == 418
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_non_streamed_drop_cuts_the_body(client: httpx.AsyncClient) -> None:
    # In process the deliberate abort reaches the caller as the exception itself.
    with pytest.raises(ConnectionDropped):
        await client.post(CHAT, json=chat_body(), headers={"x-mock-fail": "drop:0"})


async def test_models(client: httpx.AsyncClient) -> None:
    listing = await client.get("/v1/models")
    ids = [model["id"] for model in listing.json()["data"]]
    assert {"gpt-3.5-turbo", "gpt-4", "gpt-4o", "gpt-4o-mini", "mock-model"} <= set(ids)
    one = await client.get("/v1/models/mock-custom")
    assert one.json() == {
        "id": "mock-custom",
        "object": "model",
        "created": 1700000000,
        "owned_by": "luthien-mock",
    }
    unknown = await client.get("/v1/models/gpt-nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


async def test_embeddings(client: httpx.AsyncClient) -> None:
    floats = await client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["hi there", "x"]}
    )
    data = floats.json()
    assert data["object"] == "list"
    assert [item["index"] for item in data["data"]] == [0, 1]
    assert data["data"][0]["embedding"] == list(embedding_vector("hi there"))
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

    packed = await client.post(
        "/v1/embeddings",
        json={"model": "mock-model", "input": "hi there", "encoding_format": "base64"},
    )
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert struct.unpack("<8f", raw) == embedding_vector("hi there")


async def test_legacy_completions(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "gpt-4o", "prompt": "say hi"})
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["choices"] == [
        {"text": GREETING + "say hi", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12}

    streamed = await client.post(
        "/v1/completions",
        json={"model": "gpt-4o", "prompt": "say hi", "stream": True},
        headers={"x-mock-content": "one two"},
    )
    payloads = sse_payloads(streamed.content)
    chunks = [orjson.loads(payload) for payload in payloads[:-1]]
    assert payloads[-1] == b"[DONE]"
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert [chunk["choices"][0]["text"] for chunk in chunks] == ["one", " two", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_unknown_routes_are_openai_404s(client: httpx.AsyncClient) -> None:
    for method, path in [("GET", "/v1/nothing"), ("GET", CHAT), ("GET", "/chat/completions")]:
        response = await client.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["message"] == f"Invalid URL ({method} {path})"


async def test_requests_are_recorded(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT + "?trace=1",
        json=chat_body(stream=True),
        headers={"x-mock-request-id": "rec-1", "X-Custom": "yes", "x-mock-content": "a b"},
    )
    assert response.headers["x-mock-request-id"] == "rec-1"
    record = (await client.get("/_mock/requests/rec-1")).json()
    assert record["started_at"] <= record["ended_at"]
    assert record["headers"]["x-custom"] == "yes"
    assert record == {
        **record,
        "id": "rec-1",
        "method": "POST",
        "path": CHAT,
        "query": "trace=1",
        "body": chat_body(stream=True),
        "model": "gpt-4o",
        "stream": True,
        "status": 200,
        "outcome": "completed",
        "chunks_sent": 5,  # role, a, b, finish, [DONE]
    }


async def test_request_ids_are_generated_and_errors_recorded(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={**chat_body(), "model": "gpt-nope"})
    request_id = response.headers["x-mock-request-id"]
    assert len(request_id) == 32
    record = (await client.get(f"/_mock/requests/{request_id}")).json()
    assert (record["outcome"], record["status"], record["model"]) == (
        "error_response",
        404,
        "gpt-nope",
    )


async def test_request_log_listing_clearing_and_unknown_ids(client: httpx.AsyncClient) -> None:
    for request_id in ("one", "two"):
        await client.post(CHAT, json=chat_body(), headers={"x-mock-request-id": request_id})
    await client.get("/health")
    listing = (await client.get("/_mock/requests")).json()
    assert [record["id"] for record in listing] == ["one", "two"]
    assert (await client.delete("/_mock/requests")).status_code == 200
    assert (await client.get("/_mock/requests")).json() == []
    missing = await client.get("/_mock/requests/one")
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


async def test_request_log_is_bounded() -> None:
    backend = MockBackend(max_records=3)
    transport = httpx.ASGITransport(app=backend)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        for index in range(5):
            await client.get("/v1/models", headers={"x-mock-request-id": f"r{index}"})
    assert [record["id"] for record in backend.requests.all()] == ["r2", "r3", "r4"]


async def test_disconnect_mid_stream_cancels_generation(backend: MockBackend) -> None:
    """Hand-written ASGI channels: the client goes away after three events."""
    sent: list[Message] = []
    three_events = anyio.Event()
    body = orjson.dumps(chat_body(stream=True))

    async def receive() -> Message:
        if not sent:
            return {"type": "http.request", "body": body, "more_body": False}
        await three_events.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) == 4:  # the start and three events
            three_events.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "query_string": b"",
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
    assert record["outcome"] == "cancelled"
    assert record["chunks_sent"] == 3
    assert len(sent) == 4
    assert sent[-1]["more_body"] is True


async def test_disconnect_during_first_byte_delay(backend: MockBackend) -> None:
    sent: list[Message] = []
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": orjson.dumps(chat_body()), "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "query_string": b"",
        "headers": [(b"x-mock-first-byte-delay-ms", b"60000"), (b"x-mock-request-id", b"slow")],
    }
    with anyio.fail_after(5):
        await backend(scope, receive, send)
    record = backend.requests.get("slow")
    assert record is not None
    assert record["outcome"] == "cancelled"
    assert sent == []


async def test_request_log_serves_a_body_nested_deeper_than_orjson_writes(
    client: httpx.AsyncClient,
) -> None:
    # orjson reads 1024 levels and writes 254: such a body was recorded, and then every
    # read of the request log was a 500 (the hardening suite's fuzzer found it).
    depth = 600
    deep = '{"model":"gpt-4o","messages":[],"metadata":' + '{"a":' * depth + "1" + "}" * depth + "}"
    await client.post(
        CHAT,
        content=deep,
        headers={"content-type": "application/json", "x-mock-request-id": "deep"},
    )
    listing = await client.get("/_mock/requests")
    assert listing.status_code == 200
    (record,) = [r for r in listing.json() if r["id"] == "deep"]
    one = await client.get("/_mock/requests/deep")
    assert one.status_code == 200
    assert one.json() == record
    level = record["body"]["metadata"]
    for _ in range(depth - 1):
        level = level["a"]
    assert level == {"a": 1}


async def test_embeddings_of_an_input_nested_deeper_than_orjson_writes(
    client: httpx.AsyncClient,
) -> None:
    # An input item that is not a string is embedded as its JSON text; at 300 levels
    # orjson could not write it, and the mock answered a plain 500 (found by the
    # hardening fuzzer).
    depth = 300
    body = '{"model":"text-embedding-3-small","input":[' + "[" * depth + "1" + "]" * depth + "]}"
    response = await client.post(
        "/v1/embeddings", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert [item["index"] for item in response.json()["data"]] == [0]
