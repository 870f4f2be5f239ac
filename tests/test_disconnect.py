"""A client that goes away cancels the backend request at once, over real sockets.

SPEC: "When the client disconnects, the backend request is cancelled and its connection
closed at once (before the first token too, and for non-streamed requests), and the
transaction is recorded as disconnected". The mock backend records ``cancelled`` only
when it sees its own client (the proxy) go away while it is still waiting, so its
records prove that the disconnect travelled through the proxy to the backend.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import MockBackendServer, ProxyServer, ProxyStarter, e2e_policy

MODEL = "gpt-4o-mini"
GIVE_UP = 0.5  # the client's read timeout when it abandons a slow request
POLL = 10.0  # bound on every wait for the proxy or the mock to catch up


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    # LOG_LEVEL=DEBUG: the one-line summary of each transaction is a DEBUG line.
    return start_proxy(policy=e2e_policy(mock_backend.api_base), env={"LOG_LEVEL": "DEBUG"})


@pytest.fixture
def impatient(proxy: ProxyServer) -> Iterator[httpx.Client]:
    """A client that gives up after ``GIVE_UP`` seconds without a byte."""
    with httpx.Client(
        base_url=proxy.api_base,
        headers={"Authorization": f"Bearer {proxy.key}"},
        timeout=httpx.Timeout(10.0, read=GIVE_UP),
    ) as client:
        yield client


def directives(**values: Any) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): quote(str(v), safe=":") for k, v in values.items()}


def chat(*, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def request_id() -> str:
    return uuid.uuid4().hex


def finished(record: dict[str, Any]) -> bool:
    return record["outcome"] != "in_progress"


def poll(read: Any, until: Any, timeout: float = POLL) -> Any:
    """``read()`` until ``until(value)`` holds or ``timeout`` passes; the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def metrics(proxy: ProxyServer) -> str:
    return httpx.get(f"{proxy.url}/metrics", timeout=10).text


def disconnected_count(proxy: ProxyServer) -> float:
    """Transactions the proxy has counted as ended by a client disconnect."""
    pattern = re.compile(
        r'^luthien_requests_total\{[^}]*outcome="client_disconnected"[^}]*\} (\S+)$'
    )
    return sum(
        float(match.group(1))
        for line in metrics(proxy).splitlines()
        if (match := pattern.match(line))
    )


def transaction_line(proxy: ProxyServer, tx_id: str) -> str | None:
    """The proxy's one-line log of transaction ``tx_id``, once it is written."""
    server = proxy.server
    assert server is not None

    def read() -> str | None:
        for line in server.log().splitlines():
            if f"tx={tx_id} " in line:
                return line
        return None

    line: str | None = poll(read, lambda found: found is not None)
    return line


def test_stream_closed_after_two_events_cancels_the_backend(
    proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    rid = request_id()
    before = disconnected_count(proxy)
    received = b""
    with (
        httpx.Client(headers={"Authorization": f"Bearer {proxy.key}"}, timeout=30) as client,
        client.stream(
            "POST",
            f"{proxy.api_base}/chat/completions",
            json=chat(stream=True),
            headers=directives(words=200, delay_ms=50, request_id=rid),
        ) as response,
    ):
        assert response.status_code == 200
        tx_id = response.headers["x-luthien-transaction-id"]
        for data in response.iter_bytes():
            received += data
            if received.count(b"\n\n") >= 2:
                break
    assert b"[DONE]" not in received

    record = mock_backend.wait_for_record(rid, finished)
    assert record is not None
    assert record["outcome"] == "cancelled"
    assert 2 <= record["chunks_sent"] < 200

    line = transaction_line(proxy, tx_id)
    assert line is not None
    assert "POST /chat/completions outcome=client_disconnected " in line
    chunks = re.search(r" chunks=(\d+) ", line)
    assert chunks is not None and 2 <= int(chunks.group(1)) < 200  # what had been sent
    assert poll(lambda: disconnected_count(proxy), lambda n: n > before) == before + 1


def test_stream_abandoned_before_the_first_token_cancels_the_backend(
    proxy: ProxyServer, mock_backend: MockBackendServer, impatient: httpx.Client
) -> None:
    rid = request_id()
    before = disconnected_count(proxy)
    with (
        pytest.raises(httpx.ReadTimeout),
        impatient.stream(
            "POST",
            "/chat/completions",
            json=chat(stream=True),
            headers=directives(first_byte_delay_ms=3000, request_id=rid),
        ) as response,
    ):
        response.read()
    impatient.close()  # the abandoned connection goes now, not at teardown

    record = mock_backend.wait_for_record(rid, finished)
    assert record is not None
    assert record["outcome"] == "cancelled"  # "completed" had the backend kept going
    assert record["chunks_sent"] == 0
    assert poll(lambda: disconnected_count(proxy), lambda n: n > before) == before + 1


def test_non_streamed_request_abandoned_cancels_the_backend(
    proxy: ProxyServer, mock_backend: MockBackendServer, impatient: httpx.Client
) -> None:
    rid = request_id()
    before = disconnected_count(proxy)
    with pytest.raises(httpx.ReadTimeout):
        impatient.post(
            "/chat/completions",
            json=chat(stream=False),
            headers=directives(first_byte_delay_ms=3000, request_id=rid),
        )
    impatient.close()

    record = mock_backend.wait_for_record(rid, finished)
    assert record is not None
    assert record["stream"] is False
    assert record["outcome"] == "cancelled"
    assert poll(lambda: disconnected_count(proxy), lambda n: n > before) == before + 1


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "non-streamed"])
def test_hanging_backend_is_cancelled_when_the_client_gives_up(
    proxy: ProxyServer, mock_backend: MockBackendServer, impatient: httpx.Client, stream: bool
) -> None:
    rid = request_id()
    with (
        pytest.raises(httpx.ReadTimeout),
        impatient.stream(
            "POST",
            "/chat/completions",
            json=chat(stream=stream),
            headers=directives(fail="hang", request_id=rid),
        ) as response,
    ):
        response.read()
    impatient.close()

    record = mock_backend.wait_for_record(rid, finished)
    assert record is not None
    assert record["outcome"] == "cancelled"


def test_proxy_is_healthy_after_disconnects(
    proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    with httpx.Client(
        base_url=proxy.api_base, headers={"Authorization": f"Bearer {proxy.key}"}, timeout=30
    ) as client:
        plain = client.post(
            "/chat/completions", json=chat(stream=False), headers=directives(content="still here")
        )
        with client.stream(
            "POST",
            "/chat/completions",
            json=chat(stream=True),
            headers=directives(content="and streaming"),
        ) as streamed:
            body = streamed.read()
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"] == "still here"
    assert streamed.status_code == 200 and body.endswith(b"data: [DONE]\n\n")

    idle = "luthien_active_transactions 0.0"
    text = poll(lambda: metrics(proxy), lambda t: idle in t.splitlines())
    assert idle in text.splitlines()


def test_no_stream_counted_active_after_a_disconnect(
    proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    rid = request_id()
    with (
        httpx.Client(headers={"Authorization": f"Bearer {proxy.key}"}, timeout=30) as client,
        client.stream(
            "POST",
            f"{proxy.api_base}/chat/completions",
            json=chat(stream=True),
            headers=directives(words=200, delay_ms=50, request_id=rid),
        ) as response,
    ):
        assert response.status_code == 200
        next(response.iter_bytes())
    record = mock_backend.wait_for_record(rid, finished)
    assert record is not None and record["outcome"] == "cancelled"

    idle = "luthien_active_streams 0.0"
    text = poll(lambda: metrics(proxy), lambda t: idle in t.splitlines(), timeout=2.0)
    assert idle in text.splitlines()
