"""Anthropic's Messages API through a real proxy process: the official SDK (sync, async,
``messages.stream()`` with tool use), the raw bytes relayed as they came, Anthropic's
error shapes, secrets held back across events, and usage recorded."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anthropic
import httpx
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter

MODEL = "claude-sonnet-4-5"
SECRET = "sk-ant-api03-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8Oo9Pp0AaSsDdFfGg"
ANTHROPIC_BACKEND_KEY = "anthropic-backend-key"


def policy(backend: str, *after: dict[str, Any], name: str = "messages") -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": name,
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                *after,
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    redact = {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}}
    return start_proxy(
        policy=policy(mock_backend.api_base, redact),
        env={"ANTHROPIC_API_KEY": ANTHROPIC_BACKEND_KEY},
    )


@pytest.fixture(scope="module")
def blocking(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    block = {"type": "LeakedApiKeyDetection", "config": {}}
    return start_proxy(
        policy=policy(mock_backend.api_base, block, name="messages-block"),
        env={"ANTHROPIC_API_KEY": ANTHROPIC_BACKEND_KEY},
    )


def directives(**values: Any) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): quote(str(v), safe=":") for k, v in values.items()}


def sdk(proxy: ProxyServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


def body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: "), block
        out.append((name[7:].decode(), json.loads(data[6:])))
    return out


def test_sdk_create_answers_and_records_usage(
    proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    with sdk(proxy) as client:
        raw = client.messages.with_raw_response.create(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "two words"}],
            extra_headers=directives(content="Hello from Claude", request_id="msg-create"),
        )
    message = raw.parse()
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello from Claude"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    # The backend got the backend key as x-api-key, never the client's key.
    sent = mock_backend.record("msg-create")
    assert sent is not None
    assert sent["headers"]["x-api-key"] == ANTHROPIC_BACKEND_KEY
    assert CLIENT_KEY not in json.dumps(sent["headers"])
    record = proxy.record(raw.headers["x-luthien-transaction-id"])
    assert record["endpoint"] == "/messages"
    assert record["outcome"] == "ok"
    assert record["prompt_tokens"] == message.usage.input_tokens
    assert record["completion_tokens"] == message.usage.output_tokens


def test_sdk_stream_with_tool_use_is_relayed_byte_for_byte(
    proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    calls = [{"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}]
    headers = directives(
        content="Let me look.", chunk_size=4, tool_calls=json.dumps(calls), thinking="Hmm."
    )
    with (
        sdk(proxy) as client,
        client.messages.stream(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
            extra_headers=headers,
        ) as stream,
    ):
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[1].text == "Let me look."  # type: ignore[union-attr]
    assert final.content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    # The same request straight to the mock and through the proxy: the same bytes.
    request = body("weather?", stream=True)
    direct = httpx.post(mock_backend.api_base + "/messages", json=request, headers=headers)
    proxied = httpx.post(
        proxy.api_base + "/messages",
        json=request,
        headers={**headers, "x-api-key": CLIENT_KEY},
    )
    assert proxied.status_code == 200
    assert proxied.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert _without_ids(proxied.content) == _without_ids(direct.content)
    names = [name for name, _ in events(proxied.content)]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "ping" in names


def _without_ids(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, data in events(raw):
        if name == "message_start":
            data["message"].pop("id")
        if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
            data["content_block"].pop("id")
        out.append((name, data))
    return out


@pytest.mark.anyio
async def test_async_sdk_stream(proxy: ProxyServer) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=30
    ) as client:
        stream = await client.messages.create(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=directives(content="async words here", chunk_size=3),
        )
        texts = [
            event.delta.text  # type: ignore[union-attr]
            async for event in stream
            if event.type == "content_block_delta" and event.delta.type == "text_delta"
        ]
    assert "".join(texts) == "async words here"


def test_secret_split_across_text_deltas_is_redacted(proxy: ProxyServer) -> None:
    text = f"the key is {SECRET} ok"
    with (
        sdk(proxy) as client,
        client.messages.stream(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "key?"}],
            extra_headers=directives(content=text, chunk_size=5),
        ) as stream,
    ):
        final = stream.get_final_message()
        transaction = stream.response.headers["x-luthien-transaction-id"]
    assert final.content[0].text == "the key is [REDACTED] ok"  # type: ignore[union-attr]
    record = proxy.record(transaction)
    assert SECRET not in json.dumps(record)
    assert record["decisions"][0]["action"] == "redacted"


def test_secret_in_tool_input_and_thinking_is_redacted(proxy: ProxyServer) -> None:
    calls = [{"name": "send", "arguments": json.dumps({"token": SECRET})}]
    with (
        sdk(proxy) as client,
        client.messages.stream(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "go"}],
            extra_headers=directives(
                content="ok", tool_calls=json.dumps(calls), thinking=f"use {SECRET}", chunk_size=4
            ),
        ) as stream,
    ):
        final = stream.get_final_message()
    dumped = final.model_dump_json()
    assert SECRET not in dumped
    assert final.content[0].thinking == "use [REDACTED]"  # type: ignore[union-attr]
    assert final.content[2].input == {"token": "[REDACTED]"}  # type: ignore[union-attr]


def test_secret_mid_stream_in_block_mode_ends_with_an_error_event(blocking: ProxyServer) -> None:
    response = httpx.post(
        blocking.api_base + "/messages",
        json=body("key?", stream=True),
        headers={
            "x-api-key": CLIENT_KEY,
            **directives(content="a long enough prefix to stream first " + SECRET, chunk_size=6),
        },
    )
    assert response.status_code == 200
    got = events(response.content)
    assert SECRET not in response.text
    assert got[-1][0] == "error"
    assert got[-1][1]["type"] == "error"
    assert got[-1][1]["error"]["type"] == "permission_error"
    assert "message_stop" not in [name for name, _ in got]
    client = sdk(blocking)
    stream = client.messages.stream(
        model=MODEL,
        max_tokens=256,
        messages=[{"role": "user", "content": "key?"}],
        extra_headers=directives(content="prefix words to go first " + SECRET, chunk_size=6),
    )
    with client, pytest.raises(anthropic.APIStatusError), stream as events_in:
        events_in.get_final_message()


def test_errors_have_anthropics_shape(proxy: ProxyServer) -> None:
    no_key = httpx.post(proxy.api_base + "/messages", json=body())
    assert no_key.status_code == 401
    assert no_key.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": no_key.json()["error"]["message"]},
    }
    headers = {"x-api-key": CLIENT_KEY}
    bad = httpx.post(proxy.api_base + "/messages", content=b"{not json", headers=headers)
    assert bad.status_code == 400
    assert bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(proxy.api_base + "/messages", json={"model": MODEL}, headers=headers)
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "invalid_request_error"
    with sdk(proxy) as client, pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(
            model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 404  # the backend's own answer, passed through
    assert caught.value.response.headers["x-luthien-transaction-id"]


def test_bearer_key_works_too_and_count_tokens_passes_through(proxy: ProxyServer) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    response = httpx.post(proxy.api_base + "/messages", json=body(), headers=headers)
    assert response.status_code == 200
    counted = httpx.post(
        proxy.api_base + "/messages/count_tokens",
        json={"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]},
        headers=headers,
    )
    assert counted.status_code == 200
    assert counted.json() == {"input_tokens": 3}


def test_claude_code_shaped_request_is_not_refused(proxy: ProxyServer) -> None:
    """A system message inside ``messages``, ``system`` as blocks, thinking, metadata."""
    request = {
        "model": MODEL,
        "max_tokens": 32000,
        "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "system", "content": "a reminder in the middle"},
        ],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "user_abc"},
        "tools": [{"name": f"tool{i}", "input_schema": {"type": "object"}} for i in range(24)],
    }
    response = httpx.post(
        proxy.url + "/v1/messages?beta=true",
        json=request,
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200
    assert events(response.content)[-1][0] == "message_stop"


def test_increment_integers_rewrites_numbers_split_across_deltas(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    increment = {"type": "IncrementIntegers", "config": {}}
    proxy = start_proxy(policy=policy(mock_backend.api_base, increment, name="increment"))
    text = "I have 41 apples and 1999 pears"
    with sdk(proxy) as client:
        with client.messages.stream(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "count"}],
            extra_headers=directives(content=text, chunk_size=2),
        ) as stream:
            final = stream.get_final_message()
        message = client.messages.create(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "count"}],
            extra_headers=directives(content=text),
        )
    assert final.content[0].text == "I have 42 apples and 2000 pears"  # type: ignore[union-attr]
    assert message.content[0].text == "I have 42 apples and 2000 pears"  # type: ignore[union-attr]


def test_the_judge_reads_a_messages_conversation_and_stream() -> None:
    from luthien_control.dialects import MESSAGES

    request = {
        "system": "be brief",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "list files"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {"c": "ls"}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a"}],
            },
        ],
    }
    assert MESSAGES.request_text(request) == (
        "system: be brief\n\nuser: list files\n\n"
        'assistant: [tool call] Bash: {"c":"ls"}\n\nuser: [tool result] a'
    )
    state: dict[object, object] = {}
    pieces = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "t", "name": "Bash", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"c":1}'},
        },
    ]
    text = "".join(t for event in pieces for _, t in MESSAGES.stream_text(event, state))
    assert text == 'Hi\n[tool call] Bash: {"c":1}'


def tool_policy(backend: str, *, action: str) -> dict[str, Any]:
    tools = {"type": "ToolCallPolicy", "config": {"denied_tools": ["Bash"], "action": action}}
    checked = policy(backend, tools, name=f"messages-tools-{action}")
    checked["config"]["policies"].insert(1, tools)  # the history too, before the backend
    return checked


@pytest.fixture(scope="module")
def dropping(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(policy=tool_policy(mock_backend.api_base, action="drop_call"))


@pytest.fixture(scope="module")
def tool_blocking(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(policy=tool_policy(mock_backend.api_base, action="block"))


TWO_CALLS = json.dumps(
    [
        {"name": "Bash", "arguments": json.dumps({"command": "rm -rf /"})},
        {"name": "Read", "arguments": json.dumps({"path": "a.txt"})},
    ]
)


def test_drop_call_removes_the_block_and_renumbers_the_rest(dropping: ProxyServer) -> None:
    headers = {"x-api-key": CLIENT_KEY, **directives(content="Sure.", tool_calls=TWO_CALLS)}
    response = httpx.post(dropping.api_base + "/messages", json=body(stream=True), headers=headers)
    got = events(response.content)
    starts = [data for name, data in got if name == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
    ]
    assert starts[1]["content_block"]["name"] == "Read"
    assert {data["index"] for name, data in got if name.startswith("content_block")} == {0, 1}
    assert "Bash" not in response.text
    stop = next(data for name, data in got if name == "message_delta")
    assert stop["delta"]["stop_reason"] == "tool_use"  # Read is still there
    with sdk(dropping) as client:
        message = client.messages.create(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "go"}],
            extra_headers=directives(
                content="Sure.",
                tool_calls=json.dumps([{"name": "\uff42\uff41\uff53\uff48", "arguments": "{}"}]),
            ),
        )
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason == "end_turn"  # no tool_use left


def test_drop_call_in_a_stream_with_only_the_denied_call_ends_the_turn(
    dropping: ProxyServer,
) -> None:
    calls = json.dumps([{"name": "Bash", "arguments": json.dumps({"command": "id"})}])
    with (
        sdk(dropping) as client,
        client.messages.stream(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "go"}],
            extra_headers=directives(content="Running it.", tool_calls=calls, chunk_size=3),
        ) as stream,
    ):
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text == "Running it."  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"


def test_block_before_the_stream_starts_is_a_403_in_anthropics_shape(
    tool_blocking: ProxyServer,
) -> None:
    calls = json.dumps([{"name": "Bash", "arguments": json.dumps({"command": "id"})}])
    with sdk(tool_blocking) as client, pytest.raises(anthropic.PermissionDeniedError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=256,
            messages=[{"role": "user", "content": "go"}],
            extra_headers=directives(tool_calls=calls),
        )
    assert caught.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    history = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "BASH", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]},
    ]
    refused = httpx.post(
        tool_blocking.api_base + "/messages",
        json=body(messages=history) | {"messages": history},
        headers={"x-api-key": CLIENT_KEY},
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"


ESCAPED = "".join(f"\\u{ord(c):04x}" for c in SECRET[:6]) + SECRET[6:]  # \u0073\u006b...


@pytest.mark.parametrize("dialect", ["messages", "chat"])
def test_a_key_spelled_with_json_escapes_in_streamed_tool_input_is_redacted(
    proxy: ProxyServer, dialect: str
) -> None:
    arguments = '{"token": "' + ESCAPED + '", "n": 1}'
    headers = {
        "x-api-key": CLIENT_KEY,
        "authorization": f"Bearer {CLIENT_KEY}",
        **directives(
            content="ok",
            tool_calls=json.dumps([{"name": "send", "arguments": arguments}]),
            chunk_size=5,
        ),
    }
    if dialect == "messages":
        url, request = proxy.api_base + "/messages", body("go", stream=True)
    else:
        url = proxy.api_base + "/chat/completions"
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "go"}]}
        request["stream"] = True
    response = httpx.post(url, json=request, headers=headers)
    assert response.status_code == 200
    assert ESCAPED[:20] not in response.text
    assert SECRET[6:] not in response.text
    if dialect == "messages":
        pieces = [
            data["delta"]["partial_json"]
            for name, data in events(response.content)
            if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
        ]
    else:
        pieces = [
            call["function"].get("arguments") or ""
            for line in response.text.splitlines()
            if line.startswith("data: {")
            for choice in json.loads(line[6:])["choices"]
            for call in choice["delta"].get("tool_calls") or ()
        ]
    assert json.loads("".join(pieces)) == {"token": "[REDACTED]", "n": 1}


def test_a_key_spelled_with_json_escapes_blocks_in_block_mode(blocking: ProxyServer) -> None:
    arguments = '{"token": "' + ESCAPED + '"}'
    response = httpx.post(
        blocking.api_base + "/messages",
        json=body("go", stream=True),
        headers={
            "x-api-key": CLIENT_KEY,
            **directives(
                content="a few words first",
                tool_calls=json.dumps([{"name": "send", "arguments": arguments}]),
                chunk_size=5,
            ),
        },
    )
    assert ESCAPED[:20] not in response.text and SECRET[6:] not in response.text
    assert events(response.content)[-1][0] == "error"
