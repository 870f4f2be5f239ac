"""What a hostile backend's stream cannot do while a content policy reads it: fold text
where the policies did not look (after its channel ended, out of order, outside an
object), hide a secret in an event the dialect wrote itself, or in the headers.

Each case runs the real relay with the real policies in process."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import openai
import orjson
import pytest

from luthien_control.exceptions import BackendBroken
from luthien_control.policies.loader import load_policy
from luthien_control.relay import relay_stream
from luthien_control.server import canonical_path
from luthien_control.transaction import ProxyRequest, ProxyResponse, ResponseStream, Transaction
from tests.conftest import (
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    serve_in_thread,
)

KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
HALF = 12
MESSAGE = {
    "id": "m",
    "type": "message",
    "role": "assistant",
    "model": "c",
    "content": [],
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def a(data: dict[str, Any]) -> bytes:
    return sse(data, data["type"])


def chat(delta: dict[str, Any], finish: str | None = None, index: Any = 0) -> bytes:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    return sse({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]})


def text_delta(text: str, index: int = 0) -> bytes:
    return a(
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "text_delta", "text": text},
        }
    )


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return a({"type": "content_block_start", "index": index, "content_block": block})


def stop(index: int) -> bytes:
    return a({"type": "content_block_stop", "index": index})


MESSAGE_END = [
    a(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 3},
        }
    ),
    a({"type": "message_stop"}),
]


def relay(
    events: list[bytes],
    *policies: dict[str, Any],
    path: str = "/chat/completions",
    headers: dict[str, str] | None = None,
) -> tuple[Transaction, bytes, BaseException | None]:
    async def source() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    async def go() -> tuple[Transaction, bytes, BaseException | None]:
        tx = Transaction(request=ProxyRequest("POST", path, b"", {}, b"{}"), services=None)
        tx.reads_content = True
        tx.response = ProxyResponse(200, headers or {}, stream=ResponseStream(source()))
        sent: list[bytes] = []

        async def send(message: Any) -> None:
            sent.append(message.get("body", b""))

        error: BaseException | None = None
        try:
            for spec in policies:
                await load_policy(spec).apply(tx)
            await relay_stream(tx, send, dev=False)
        except Exception as exc:  # raised before the first byte: a real HTTP error
            error = exc
        return tx, b"".join(sent), error

    return asyncio.run(go())


def leak(action: str = "block") -> dict[str, Any]:
    return {"type": "LeakedApiKeyDetection", "config": {"action": action}}


def tools(**config: Any) -> dict[str, Any]:
    return {"type": "ToolCallPolicy", "config": {"denied_tools": ["bash"], **config}}


# --- text folded after its channel ended, or out of place: refused ------------------------


@pytest.mark.parametrize("action", ["block", "redact"])
def test_messages_text_after_its_block_stopped_is_refused(action: str) -> None:
    events = [
        a({"type": "message_start", "message": MESSAGE}),
        block_start(0, {"type": "text", "text": ""}),
        text_delta("key: " + KEY[:HALF]),
        stop(0),
        text_delta(KEY[HALF:]),
        *MESSAGE_END,
    ]
    tx, wire, error = relay(events, leak(action), path="/messages")
    assert KEY[HALF:] not in wire.decode()
    assert wire.endswith(b"\n\n") and b"event: error" in wire
    assert isinstance(tx.error, BackendBroken) or isinstance(error, BackendBroken)


@pytest.mark.parametrize(
    ("name", "events"),
    [
        (
            "message_start with content",
            [
                a(
                    {
                        "type": "message_start",
                        "message": {**MESSAGE, "content": [{"type": "text", "text": "x"}]},
                    }
                ),
                *MESSAGE_END,
            ],
        ),
        (
            "a block numbered out of order",
            [
                a({"type": "message_start", "message": MESSAGE}),
                block_start(5, {"type": "text", "text": ""}),
            ],
        ),
        (
            "a delta for another block",
            [
                a({"type": "message_start", "message": MESSAGE}),
                block_start(0, {"type": "text", "text": ""}),
                text_delta("x", index=1),
            ],
        ),
        (
            "an event after message_stop",
            [a({"type": "message_start", "message": MESSAGE}), *MESSAGE_END, text_delta("x")],
        ),
        ("no message_start first", [block_start(0, {"type": "text", "text": ""})]),
    ],
)
def test_a_messages_stream_out_of_order_is_refused(name: str, events: list[bytes]) -> None:
    tx, _, error = relay(events, leak(), path="/messages")
    assert isinstance(tx.error or error, BackendBroken), name


def test_a_tool_input_sent_after_its_block_stopped_is_refused() -> None:
    def json_delta(text: str) -> bytes:
        return a(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": text},
            }
        )

    events = [
        a({"type": "message_start", "message": MESSAGE}),
        block_start(0, {"type": "tool_use", "id": "t", "name": "run", "input": {}}),
        json_delta('{"command": "ls'),
        stop(0),
        json_delta(' ; rm -rf /"}'),
        *MESSAGE_END,
    ]
    tx, wire, error = relay(events, tools(argument_patterns=["rm -rf"]), path="/messages")
    assert isinstance(tx.error or error, BackendBroken)
    assert b"rm -rf" not in wire and wire.split(b"\n\n")[-2].startswith(b"event: error\n")


@pytest.mark.parametrize("action", ["block", "redact"])
def test_chat_content_after_finish_reason_is_refused(action: str) -> None:
    events = [
        chat({"role": "assistant", "content": "key: " + KEY[:HALF]}, "stop"),
        chat({"content": KEY[HALF:]}),
        b"data: [DONE]\n\n",
    ]
    tx, wire, error = relay(events, leak(action))
    assert KEY[HALF:] not in wire.decode()
    assert isinstance(tx.error or error, BackendBroken)


@pytest.mark.parametrize("action", ["block", "redact"])
def test_responses_delta_after_its_done_is_refused(action: str) -> None:
    def delta(text: str) -> bytes:
        return a(
            {
                "type": "response.output_text.delta",
                "output_index": 0,
                "content_index": 0,
                "delta": text,
            }
        )

    events = [
        delta("key: " + KEY[:HALF]),
        a(
            {
                "type": "response.output_text.done",
                "output_index": 0,
                "content_index": 0,
                "text": "x",
            }
        ),
        delta(KEY[HALF:]),
        a({"type": "response.completed", "response": {"status": "completed", "output": []}}),
    ]
    tx, wire, error = relay(events, leak(action), path="/responses")
    assert KEY[HALF:] not in wire.decode()
    assert isinstance(tx.error or error, BackendBroken)


@pytest.mark.parametrize("indexes", [(1, 0), (0, -1), (0, 2)], ids=["1-0", "0-neg", "0-2"])
@pytest.mark.parametrize("action", ["block", "redact"])
def test_a_choice_index_that_is_not_the_next_position_is_refused(
    action: str, indexes: tuple[int, int]
) -> None:
    """The SDK finds a choice at ``choices[index]`` (a list position, negatives too, and
    appends when there is none): ``1`` then ``0`` lands both halves in its first choice,
    ``-1`` in the last one, where the proxy read two choices apart."""
    first, second = indexes
    events = [
        chat({"role": "assistant", "content": "key: " + KEY[:HALF]}, index=first),
        chat({"content": KEY[HALF:]}, index=second),
        chat({}, "stop", index=first),
        b"data: [DONE]\n\n",
    ]
    tx, wire, error = relay(events, leak(action))
    assert KEY[HALF:] not in wire.decode()
    assert isinstance(tx.error or error, BackendBroken)


def test_choices_in_their_order_pass_the_rules() -> None:
    events = [
        chat({"role": "assistant", "content": "a"}, index=0),
        chat({"role": "assistant", "content": "b"}, index=1),
        chat({"content": "c"}, index=0),
        chat({}, "stop", index=1),
        chat({}, "stop", index=0),
        b"data: [DONE]\n\n",
    ]
    tx, wire, error = relay(events, leak())
    assert error is None and tx.error is None
    assert wire == b"".join(events)


def test_an_unhashable_index_is_refused_not_a_crash() -> None:
    _, _, error = relay([chat({"content": "x"}, index=[1])], leak())
    assert isinstance(error, BackendBroken)


def test_without_a_content_policy_an_odd_stream_is_relayed_as_it_came() -> None:
    events = [
        chat({"content": "a"}, "stop", index=[1]),
        chat({"content": "b"}),
        b"data: [DONE]\n\n",
    ]

    async def source() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    async def go() -> bytes:
        tx = Transaction(
            request=ProxyRequest("POST", "/chat/completions", b"", {}, b"{}"), services=None
        )
        tx.response = ProxyResponse(200, {}, stream=ResponseStream(source()))
        sent: list[bytes] = []

        async def send(message: Any) -> None:
            sent.append(message.get("body", b""))

        await relay_stream(tx, send, dev=False)
        return b"".join(sent)

    assert asyncio.run(go()) == b"".join(events)


# --- events the dialect writes, events that are no objects, headers: all scanned --------


def test_a_released_delta_copying_an_item_id_is_scanned() -> None:
    held = {"type": "response.output_text.delta", "output_index": 0, "content_index": 0}
    events = [
        a({**held, "item_id": "i", "delta": "text sk-"}),
        a(
            {
                "type": "response.output_text.done",
                "output_index": 0,
                "content_index": 0,
                "item_id": KEY,
                "text": "text sk-",
            }
        ),
        a({"type": "response.completed", "response": {"status": "completed", "output": []}}),
    ]
    _, wire, _ = relay(events, leak("redact"), path="/responses")
    assert KEY not in wire.decode()


def test_the_last_chunk_built_from_the_first_events_model_is_scanned() -> None:
    first = sse(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": KEY,
            "choices": [{"index": 0, "delta": {"content": "sk-"}, "finish_reason": None}],
        }
    )
    _, wire, _ = relay([first, b"data: [DONE]\n\n"], leak("redact"))
    assert KEY not in wire.decode()


@pytest.mark.parametrize("action", ["block", "redact"])
@pytest.mark.parametrize("payload", [[KEY], KEY, {"nested": [[KEY]]}])
def test_events_that_are_no_objects_are_scanned(action: str, payload: Any) -> None:
    events = [chat({"content": "hello"}), sse(payload), chat({}, "stop"), b"data: [DONE]\n\n"]
    _, wire, _ = relay(events, leak(action))
    assert KEY not in wire.decode()


def test_a_streamed_answers_headers_are_checked_before_the_first_byte() -> None:
    events = [chat({"content": "hi"}, "stop"), b"data: [DONE]\n\n"]
    _, wire, error = relay(events, leak(), headers={"x-debug-echo": KEY})
    assert wire == b""
    assert error is not None and "response headers" in str(error)


# --- block_with: message never leaves a tool call half-sent ---------------------------


def test_block_with_message_ends_with_an_error_when_a_tool_call_is_half_sent() -> None:
    events = [
        a({"type": "message_start", "message": MESSAGE}),
        block_start(0, {"type": "tool_use", "id": "t", "name": "bash", "input": {}}),
        a(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"command": "rm -rf /'},
            }
        ),
        a(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": " " + KEY + '"}'},
            }
        ),
        stop(0),
        *MESSAGE_END,
    ]
    policy = {"type": "LeakedApiKeyDetection", "config": {"block_with": "message"}}
    _, wire, _ = relay(events, policy, path="/messages")
    assert wire.split(b"\n\n")[-2].startswith(b"event: error\n")
    assert b"message_stop" not in wire and KEY not in wire.decode()


# --- the path the backend routes is the path the dialect is chosen from --------------


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("/chat/%63ompletions", "/chat/completions"),
        ("/chat/completions/", "/chat/completions"),
        ("//chat//completions", "/chat/completions"),
        ("/%6Dessages", "/messages"),
        ("/messages/", "/messages"),
        ("/files/a%2Fb", "/files/a%2Fb"),
        ("/files/a%2fb", "/files/a%2Fb"),
        ("/models/gpt-4o", "/models/gpt-4o"),
    ],
)
def test_canonical_path(written: str, canonical: str) -> None:
    assert canonical_path(written) == canonical


@pytest.mark.parametrize("name", ["ping", None], ids=["ping", "unnamed"])
@pytest.mark.parametrize("action", ["block", "redact"])
def test_a_messages_event_the_sdk_leaves_out_is_refused(action: str, name: str | None) -> None:
    """The anthropic SDK skips an event named ``ping`` or not named at all, whatever its
    data: a text delta so named puts a space between the halves of a key where the
    policies read, while the client folds them together."""
    hidden = sse(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " "}},
        name,
    )
    events = [
        a({"type": "message_start", "message": MESSAGE}),
        block_start(0, {"type": "text", "text": ""}),
        text_delta("key: " + KEY[:HALF]),
        hidden,
        text_delta(KEY[HALF:]),
        stop(0),
        *MESSAGE_END,
    ]
    tx, wire, error = relay(events, leak(action), path="/messages")
    assert KEY[HALF:] not in wire.decode()
    assert isinstance(tx.error or error, BackendBroken)


def test_a_clean_messages_stream_passes_the_rules() -> None:
    events = [
        a({"type": "message_start", "message": MESSAGE}),
        block_start(0, {"type": "text", "text": ""}),
        a({"type": "ping"}),
        text_delta("hello"),
        stop(0),
        block_start(1, {"type": "tool_use", "id": "t", "name": "read", "input": {}}),
        stop(1),
        *MESSAGE_END,
    ]
    tx, wire, error = relay(events, leak(), tools(), path="/messages")
    assert (error, tx.error) == (None, None)
    assert wire == b"".join(events)


# --- through a real proxy: what the backend routes and how the client parses -----------


class MislabelledStream:
    """A backend that streams a chat answer with a key split across two events, under a
    content type other than text/event-stream (an SDK parses it as a stream anyway)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        body = chat({"content": "key: " + KEY[:HALF]}) + chat({"content": KEY[HALF:]}, "stop")
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body + b"data: [DONE]\n\n"})


def guarded(backend: str) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                leak("redact"),
                tools(),
            ]
        },
    }


def test_a_stream_request_is_read_as_a_stream_whatever_the_content_type(
    start_proxy: ProxyStarter,
) -> None:
    with serve_in_thread(MislabelledStream()) as backend:
        proxy = start_proxy(policy=guarded(backend))
        client = openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "key: [REDACTED]"


@pytest.fixture(scope="module")
def guarded_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(policy=guarded(mock_backend.api_base))


@pytest.mark.parametrize("path", ["/v1/%6Dessages", "/v1/messages/", "/v1//messages"])
def test_a_path_written_another_way_gets_the_same_policies(
    path: str, guarded_proxy: ProxyServer
) -> None:
    proxy = guarded_proxy
    host, port = proxy.url.removeprefix("http://").split(":")
    body = orjson.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "x"}],
        }
    )
    calls = orjson.dumps([{"name": "bash", "arguments": '{"command": "id"}'}]).decode()
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request(
        "POST",
        path,
        body,
        {
            "x-api-key": CLIENT_KEY,
            "content-type": "application/json",
            "x-mock-tool-calls": quote(calls),
        },
    )
    answer = connection.getresponse()
    data = orjson.loads(answer.read())
    connection.close()
    assert answer.status == 403
    assert data["type"] == "error" and data["error"]["type"] == "permission_error"
