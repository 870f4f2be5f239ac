"""The seed's end-to-end streaming tests, against a real proxy process.

Each test runs against the proxy configured from a policy file and from the database
(``proxy`` is parametrized), unless its name says which one. Against the built-in mock
backend the tests know the exact content to expect and can look at what the backend
saw; against a real backend (``E2E_REAL_BACKEND=1``) they check the shape only.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from luthien_control.mock_backend.content import words as words_text
from tests.conftest import ProxyServer
from tests.e2e.conftest import Backend
from tests.e2e.sse import acollect_sse_events, collect_sse_events

pytestmark = pytest.mark.e2e

STREAM_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-accel-buffering": "no",
}


def chat(model: str, content: str = "Say hello.", *, stream: bool = True) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}


def client_for(proxy: ProxyServer, timeout: float = 60) -> httpx.Client:
    return httpx.Client(
        base_url=proxy.api_base,
        headers={"Authorization": f"Bearer {proxy.key}"},
        timeout=timeout,
    )


def assert_complete_stream(proxy: ProxyServer, backend: Backend) -> None:
    request_id = backend.request_id()
    text = "Streaming through Luthien, chunk by chunk."
    headers = backend.directives(content=text, delay_ms=80, request_id=request_id)
    with (
        client_for(proxy) as client,
        client.stream(
            "POST", "/chat/completions", json=chat(backend.model), headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        for name, value in STREAM_HEADERS.items():
            assert response.headers[name] == value
        assert "content-encoding" not in response.headers
        assert len(response.headers["x-luthien-transaction-id"]) == 32
        chunks = response.iter_bytes()
        first = next(chunks)
        if backend.mock is not None:
            # The first event reached the client while the backend was still generating.
            record = backend.mock.record(request_id)
            assert record is not None and record["outcome"] == "in_progress"
        result = collect_sse_events([first, *chunks])

    assert result.done and result.after_done == 0
    assert result.malformed == [] and result.errors == []
    assert result.raw.endswith(b"data: [DONE]\n\n")
    assert all(event["object"] == "chat.completion.chunk" for event in result.events)
    assert result.events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert result.events[-1]["choices"][0]["finish_reason"] == "stop"
    # The client did not ask for usage: no usage chunk and no "usage" key anywhere.
    assert all("usage" not in event for event in result.events)
    if backend.mock is not None:
        assert result.content == text
        assert len(result.events) == len(text.split(" ")) + 2  # role, words, finish
    else:
        assert result.content


def test_streaming_chat_completion_file_based(file_proxy: ProxyServer, backend: Backend) -> None:
    assert_complete_stream(file_proxy, backend)


def test_streaming_chat_completion_db_based(db_proxy: ProxyServer, backend: Backend) -> None:
    assert_complete_stream(db_proxy, backend)


def test_non_streaming_still_works_file_based(file_proxy: ProxyServer, backend: Backend) -> None:
    text = "A plain, buffered answer."
    with client_for(file_proxy) as client:
        response = client.post(
            "/chat/completions",
            json=chat(backend.model, stream=False),
            headers=backend.directives(content=text),
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert len(response.headers["x-luthien-transaction-id"]) == 32
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    if backend.mock is not None:
        assert body["choices"][0]["message"]["content"] == text


def test_streaming_with_early_client_disconnect(proxy: ProxyServer, backend: Backend) -> None:
    request_id = backend.request_id()
    headers = backend.directives(words=500, delay_ms=20, request_id=request_id)
    received = b""
    with (
        client_for(proxy) as client,
        client.stream(
            "POST", "/chat/completions", json=chat(backend.model), headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        for data in response.iter_bytes():
            received += data
            if received.count(b"\n\n") >= 3:
                break
    # Leaving the block closed the connection after three events.
    assert received.count(b"data: ") >= 3 and b"[DONE]" not in received
    if backend.mock is not None:
        record = backend.mock.wait_for_record(request_id, lambda r: r["outcome"] != "in_progress")
        assert record is not None
        assert record["outcome"] == "cancelled"
        assert record["chunks_sent"] < 500
    # The proxy is unharmed: the next request is answered in full.
    with client_for(proxy) as client:
        response = client.post("/chat/completions", json=chat(backend.model, stream=False))
    assert response.status_code == 200


def test_streaming_with_invalid_model(proxy: ProxyServer, backend: Backend) -> None:
    with (
        client_for(proxy) as client,
        client.stream("POST", "/chat/completions", json=chat("no-such-model-e2e")) as response,
    ):
        response.read()
    # An error before the first byte is a real HTTP error with a JSON body, not a stream.
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found"
    assert "no-such-model-e2e" in error["message"]


def test_concurrent_streaming_requests(proxy: ProxyServer, backend: Backend) -> None:
    count = 12

    async def one(client: httpx.AsyncClient, n: int) -> tuple[int, str, object]:
        text = f"Stream number {n} says: " + " ".join(f"token{n}-{i}" for i in range(40))
        async with client.stream(
            "POST",
            "/chat/completions",
            json=chat(backend.model, f"request {n}"),
            headers=backend.directives(content=text, delay_ms=5),
        ) as response:
            assert response.status_code == 200
            result = await acollect_sse_events(response.aiter_bytes())
        return n, text, result

    async def run() -> list[tuple[int, str, object]]:
        async with httpx.AsyncClient(
            base_url=proxy.api_base,
            headers={"Authorization": f"Bearer {proxy.key}"},
            timeout=60,
        ) as client:
            return await asyncio.gather(*(one(client, n) for n in range(count)))

    results = asyncio.run(run())
    assert len(results) == count
    for _n, text, result in results:
        assert result.done and result.errors == [] and result.malformed == []  # type: ignore[attr-defined]
        if backend.mock is not None:
            assert result.content == text  # type: ignore[attr-defined]
        else:
            assert result.content  # type: ignore[attr-defined]


def test_streaming_with_large_response(proxy: ProxyServer, backend: Backend) -> None:
    words = 20_000
    headers = backend.directives(words=words, chunk_size=16)
    with (
        client_for(proxy, timeout=120) as client,
        client.stream(
            "POST", "/chat/completions", json=chat(backend.model), headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        result = collect_sse_events(response.iter_bytes())
    assert result.done and result.errors == [] and result.malformed == []
    if backend.mock is not None:
        expected = words_text(words)
        assert result.content == expected  # every byte arrived, in order
        content_events = [e for e in result.events if e["choices"][0]["delta"].get("content")]
        assert len(content_events) == -(-len(expected) // 16)
    else:
        assert len(result.content) > 100
