"""The mock backend as a real uvicorn process: the OpenAI SDK, streaming, drops, cancellation."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from .conftest import RunningMock

POLL_SECONDS = 5.0
CHAT = "/v1/chat/completions"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def sdk(mock_server: RunningMock) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=mock_server.api_url, api_key="x", max_retries=0) as client:
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


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": MESSAGES, "stream": True, **extra}


def test_health(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}


def test_sdk_non_streamed(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == (
        "Hello from the Luthien mock backend! You said: Say hello"
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2


def test_sdk_streamed(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-content": quote("Héllo there, world")},
    )
    deltas = [chunk.choices[0].delta.content for chunk in stream]
    assert deltas == ["", "Héllo", " there,", " world", None]


def test_sdk_streamed_tool_calls(sdk: openai.OpenAI) -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"zone": "CET"}},
    ]
    stream = sdk.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-tool-calls": quote(json.dumps(calls))},
    )
    assembled: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in stream:
        choice = chunk.choices[0]
        finish_reasons.append(choice.finish_reason)
        for call in choice.delta.tool_calls or []:
            entry = assembled.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            if call.function is not None:
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    assert finish_reasons[-1] == "tool_calls"
    assert [assembled[index]["id"] for index in sorted(assembled)] == [
        "call_mock_0",
        "call_mock_1",
    ]
    assert [assembled[0]["name"], assembled[1]["name"]] == ["get_weather", "get_time"]
    assert json.loads(assembled[0]["arguments"]) == calls[0]["arguments"]
    assert json.loads(assembled[1]["arguments"]) == calls[1]["arguments"]


def test_sdk_include_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-words": "6"},
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": 2,
        "completion_tokens": 6,
    }


def test_sdk_unknown_model(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-unknown", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_sdk_rate_limit_carries_retry_after(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-fail": "status:429"}
        )
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"


def test_sdk_embeddings_and_models(sdk: openai.OpenAI) -> None:
    embedding = sdk.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(embedding.data[0].embedding) == 8
    assert "mock-model" in {model.id for model in sdk.models.list()}


def test_events_arrive_one_by_one(http: httpx.Client) -> None:
    """Each event is its own chunk on the wire: read them as they come."""
    headers = {"x-mock-chunks": "4", "x-mock-delay-ms": "1"}
    with http.stream("POST", CHAT, json=stream_body(), headers=headers) as response:
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) == 7  # role, four deltas, finish, [DONE]
    assert lines[-1] == "data: [DONE]"


def test_drop_leaves_an_incomplete_body(mock_server: RunningMock, http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    headers = {"x-mock-fail": "drop:2", "x-mock-request-id": request_id}
    events = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", CHAT, json=stream_body(), headers=headers) as response,
    ):
        for line in response.iter_lines():
            if line:
                events.append(line)
    assert len(events) == 3  # the role chunk and two more
    assert "data: [DONE]" not in events
    record = wait_for_outcome(http, request_id, "dropped")
    assert record["chunks_sent"] == 3
    assert "Traceback" not in mock_server.log.read_text()


def test_client_disconnect_cancels_the_stream(http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    headers = {
        "x-mock-words": "100",
        "x-mock-delay-ms": "50",
        "x-mock-request-id": request_id,
    }
    with http.stream("POST", CHAT, json=stream_body(), headers=headers) as response:
        # Keep the iterator alive: abandoning it would close the connection right away.
        lines = response.iter_lines()
        events: list[str] = []
        while len(events) < 3:
            line = next(lines)
            if line:
                events.append(line)
        assert http.get(f"/_mock/requests/{request_id}").json()["outcome"] == "in_progress"
    record = wait_for_outcome(http, request_id, "cancelled")
    assert 3 <= record["chunks_sent"] < 103
    assert record["ended_at"] is not None


def test_client_timeout_during_first_byte_delay_cancels(
    mock_server: RunningMock, http: httpx.Client
) -> None:
    request_id = uuid.uuid4().hex
    headers = {"x-mock-first-byte-delay-ms": "60000", "x-mock-request-id": request_id}
    with (
        httpx.Client(base_url=mock_server.url, timeout=0.3) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post(CHAT, json={"model": "gpt-4o", "messages": MESSAGES}, headers=headers)
    record = wait_for_outcome(http, request_id, "cancelled")
    assert record["status"] is None
    assert record["chunks_sent"] == 0


def test_hang_sends_headers_then_nothing(mock_server: RunningMock, http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    headers = {"x-mock-fail": "hang", "x-mock-request-id": request_id}
    timeout = httpx.Timeout(10, read=0.3)
    with (
        httpx.Client(base_url=mock_server.url, timeout=timeout) as impatient,
        impatient.stream("POST", CHAT, json=stream_body(), headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        with pytest.raises(httpx.ReadTimeout):
            response.read()
    record = wait_for_outcome(http, request_id, "cancelled")
    assert record["chunks_sent"] == 0
