"""The seed's end-to-end streaming tests, against a real proxy process.

Each test runs on chat completions and on Anthropic's Messages API (``dialect`` is
parametrized, ``tests/e2e/dialects.py`` knows each one's shapes), against the proxy
configured from a policy file and from the database (``proxy`` is parametrized), unless
its name says which configuration. Against the built-in mock backend the tests know the
exact content to expect and can look at what the backend saw; against a real backend
(``E2E_REAL_BACKEND=1``) they check the shape only.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from luthien_control.mock_backend.content import words as words_text
from tests.conftest import ProxyServer
from tests.e2e.conftest import Backend
from tests.e2e.dialects import Dialect
from tests.e2e.sse import SSEResult, acollect_sse_events, collect_sse_events

pytestmark = pytest.mark.e2e

STREAM_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-accel-buffering": "no",
}


def client_for(proxy: ProxyServer, dialect: Dialect, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=proxy.api_base, headers=dialect.auth(proxy.key), timeout=timeout)


def assert_complete_stream(proxy: ProxyServer, dialect: Dialect, backend: Backend) -> None:
    request_id = backend.request_id()
    text = "Streaming through Luthien, chunk by chunk."
    headers = backend.directives(content=text, delay_ms=80, request_id=request_id)
    with (
        client_for(proxy, dialect) as client,
        client.stream("POST", dialect.path, json=dialect.body(), headers=headers) as response,
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

    assert dialect.complete(result)
    assert result.malformed == [] and result.errors == []
    dialect.check_stream(result)
    if backend.mock is not None:
        assert dialect.text(result) == text
        words = len(text.split(" "))
        assert len(dialect.pieces(result)) == words
        assert len(result.events) == words + dialect.framing_events
    else:
        assert dialect.text(result)


def test_streaming_chat_completion_file_based(
    dialect: Dialect, file_proxy: ProxyServer, backend: Backend
) -> None:
    assert_complete_stream(file_proxy, dialect, backend)


def test_streaming_chat_completion_db_based(
    dialect: Dialect, db_proxy: ProxyServer, backend: Backend
) -> None:
    assert_complete_stream(db_proxy, dialect, backend)


def test_non_streaming_still_works_file_based(
    dialect: Dialect, file_proxy: ProxyServer, backend: Backend
) -> None:
    text = "A plain, buffered answer."
    with client_for(file_proxy, dialect) as client:
        response = client.post(
            dialect.path,
            json=dialect.body(stream=False),
            headers=backend.directives(content=text),
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert len(response.headers["x-luthien-transaction-id"]) == 32
    answer = dialect.answer_text(response.json())
    if backend.mock is not None:
        assert answer == text
    else:
        assert answer


def test_streaming_with_early_client_disconnect(
    dialect: Dialect, proxy: ProxyServer, backend: Backend
) -> None:
    request_id = backend.request_id()
    headers = backend.directives(words=500, delay_ms=20, request_id=request_id)
    received = b""
    with (
        client_for(proxy, dialect) as client,
        client.stream("POST", dialect.path, json=dialect.body(), headers=headers) as response,
    ):
        assert response.status_code == 200
        for data in response.iter_bytes():
            received += data
            if received.count(b"\n\n") >= 3:
                break
    # Leaving the block closed the connection after three events.
    assert received.count(b"data: ") >= 3 and dialect.final_event not in received
    if backend.mock is not None:
        record = backend.mock.wait_for_record(request_id, lambda r: r["outcome"] != "in_progress")
        assert record is not None
        assert record["outcome"] == "cancelled"
        assert record["chunks_sent"] < 500
    # The proxy is unharmed: the next request is answered in full.
    with client_for(proxy, dialect) as client:
        response = client.post(dialect.path, json=dialect.body(stream=False))
    assert response.status_code == 200


def test_streaming_with_invalid_model(
    dialect: Dialect, proxy: ProxyServer, backend: Backend
) -> None:
    model = "no-such-model-e2e"
    request_id = backend.request_id()
    with (
        client_for(proxy, dialect) as client,
        client.stream(
            "POST",
            dialect.path,
            json=dialect.body(model=model),
            headers=backend.directives(request_id=request_id),
        ) as response,
    ):
        response.read()
    # An error before the first byte is a real HTTP error with a JSON body, not a stream:
    # the backend's own 404, passed through in the dialect's shape.
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    dialect.check_not_found(response.json(), model)
    if backend.mock is not None:
        record = backend.mock.wait_for_record(request_id, lambda r: r["outcome"] != "in_progress")
        assert record is not None
        assert (record["path"], record["status"]) == ("/v1" + dialect.path, 404)


def test_concurrent_streaming_requests(
    dialect: Dialect, proxy: ProxyServer, backend: Backend
) -> None:
    count = 12

    async def one(client: httpx.AsyncClient, n: int) -> tuple[str, SSEResult]:
        text = f"Stream number {n} says: " + " ".join(f"token{n}-{i}" for i in range(40))
        async with client.stream(
            "POST",
            dialect.path,
            json=dialect.body(f"request {n}"),
            headers=backend.directives(content=text, delay_ms=5),
        ) as response:
            assert response.status_code == 200
            result = await acollect_sse_events(response.aiter_bytes())
        return text, result

    async def run() -> list[tuple[str, SSEResult]]:
        async with httpx.AsyncClient(
            base_url=proxy.api_base, headers=dialect.auth(proxy.key), timeout=60
        ) as client:
            return await asyncio.gather(*(one(client, n) for n in range(count)))

    results = asyncio.run(run())
    assert len(results) == count
    for text, result in results:
        assert dialect.complete(result) and result.errors == [] and result.malformed == []
        if backend.mock is not None:
            assert dialect.text(result) == text
        else:
            assert dialect.text(result)


def test_streaming_with_large_response(
    dialect: Dialect, proxy: ProxyServer, backend: Backend
) -> None:
    words = 20_000
    headers = backend.directives(words=words, chunk_size=16)
    with (
        client_for(proxy, dialect, timeout=120) as client,
        client.stream("POST", dialect.path, json=dialect.body(), headers=headers) as response,
    ):
        assert response.status_code == 200
        result = collect_sse_events(response.iter_bytes())
    assert dialect.complete(result) and result.errors == [] and result.malformed == []
    if backend.mock is not None:
        expected = words_text(words)
        assert dialect.text(result) == expected  # every byte arrived, in order
        assert len(dialect.pieces(result)) == -(-len(expected) // 16)
    else:
        assert len(dialect.text(result)) > 100
