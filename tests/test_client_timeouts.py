"""Silent and slow clients, and the connection cap, against a real proxy process over raw
loopback sockets: a request's head and body must arrive in time (``CLIENT_HEADER_TIMEOUT``,
``CLIENT_BODY_TIMEOUT``, set short here), and a worker holds at most ``MAX_CONNECTIONS``
connections. Outcomes are asserted, never durations."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from typing import Any

import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter, e2e_policy

# Bounds on how long a test waits for the proxy's answer (never asserted on).
WAIT = 20.0
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(
        policy=e2e_policy(mock_backend.api_base),
        env={"CLIENT_HEADER_TIMEOUT": "1", "CLIENT_BODY_TIMEOUT": "1"},
    )


CAP = 4


@pytest.fixture(scope="module")
def capped(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """A proxy that holds at most ``CAP`` connections (and waits long for heads)."""
    return start_proxy(policy=e2e_policy(mock_backend.api_base), env={"MAX_CONNECTIONS": str(CAP)})


def connect(proxy: ProxyServer) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (bounded by ``WAIT``)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(body)


def head(path: str, *, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


def openai_error(message: str, code: str, transaction_id: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error" if code.startswith("request") else "server_error",
            "param": None,
            "code": code,
            "transaction_id": transaction_id,
        }
    }


def anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


# --- the head -----------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(proxy: ProxyServer) -> None:
    with closing(connect(proxy)) as sock:
        assert read_to_end(sock) == b""
    assert "no request within 1 s (CLIENT_HEADER_TIMEOUT); connection closed" in proxy_log(proxy)


def test_a_partial_head_is_answered_408_and_closed(proxy: ProxyServer) -> None:
    with closing(connect(proxy)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Le")
        status, headers, body = parse(read_to_end(sock))
    message = "the request head did not arrive within 1 s"
    assert status == 408
    assert headers["connection"] == "close"
    assert body == openai_error(message, "request_timeout", headers["x-luthien-transaction-id"])
    assert f"{message} (CLIENT_HEADER_TIMEOUT): 408, connection closed" in proxy_log(proxy)


def test_a_partial_head_on_the_messages_api_gets_anthropics_shape(proxy: ProxyServer) -> None:
    with closing(connect(proxy)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\n")
        status, _, body = parse(read_to_end(sock))
    assert status == 408
    assert body == anthropic_error(
        "invalid_request_error", "the request head did not arrive within 1 s"
    )


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_timeout(proxy: ProxyServer) -> None:
    """Bytes keep coming, the head never completes: the deadline is for the whole head."""
    padding = b"".join(b"X-Pad-%d: a\r\n" % number for number in range(1000))
    request = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + padding
    with closing(connect(proxy)) as sock:
        sock.settimeout(0.2)
        answer = b""
        for byte in request:  # bounded: 0.2 s per byte at most
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if answer:
                break
        sock.settimeout(WAIT)
        answer += read_to_end(sock)
    assert parse(answer)[0] == 408


def test_a_head_larger_than_the_limit_is_answered_431(proxy: ProxyServer) -> None:
    with closing(connect(proxy)) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n")
        sock.sendall(b"X-Big: " + b"a" * (100 * 1024))  # never finished
        status, headers, body = parse(read_to_end(sock))
    assert status == 431
    assert body == openai_error(
        "the request head is larger than 65536 bytes",
        "request_header_fields_too_large",
        headers["x-luthien-transaction-id"],
    )


def test_a_keep_alive_connection_gets_a_fresh_head_deadline(proxy: ProxyServer) -> None:
    """After a first request, a second head left unfinished is still cut."""
    with closing(connect(proxy)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n")
        first = b""
        while b'"ok"}' not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert parse(read_to_end(sock))[0] == 408


# --- the body -----------------------------------------------------------------------------


def test_a_head_without_its_body_is_answered_408_and_recorded(proxy: ProxyServer) -> None:
    with closing(connect(proxy)) as sock:
        sock.sendall(head(CHAT, length=100))
        status, headers, body = parse(read_to_end(sock))
    transaction_id = headers["x-luthien-transaction-id"]
    message = "the request body did not arrive within 1 s"
    assert status == 408
    assert headers["connection"] == "close"
    assert body == openai_error(message, "request_timeout", transaction_id)
    record = proxy.record(transaction_id)
    assert (record["status"], record["outcome"]) == (408, "rejected")
    assert message in record["error"]


def test_a_body_cut_short_on_the_messages_api_gets_anthropics_shape(proxy: ProxyServer) -> None:
    with closing(connect(proxy)) as sock:
        sock.sendall(head(MESSAGES, length=100) + b'{"model": "claude')
        status, headers, body = parse(read_to_end(sock))
    assert status == 408
    assert body == anthropic_error(
        "invalid_request_error", "the request body did not arrive within 1 s"
    )
    record = proxy.record(headers["x-luthien-transaction-id"])
    assert (record["status"], record["outcome"]) == (408, "rejected")


def test_a_body_that_trickles_in_forever_is_cut_at_the_timeout(proxy: ProxyServer) -> None:
    """A byte every 50 ms keeps the connection busy, but the body never ends in time."""
    with closing(connect(proxy)) as sock:
        sock.sendall(head(CHAT, length=10_000))
        sock.settimeout(0.05)
        answer = b""
        for _ in range(2000):  # bounded: 10,000 bytes would end the body
            try:
                sock.sendall(b" ")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if answer:
                break
        sock.settimeout(WAIT)
        answer += read_to_end(sock)
    status, headers, _ = parse(answer)
    assert status == 408
    assert proxy.record(headers["x-luthien-transaction-id"])["outcome"] == "rejected"


def test_a_body_that_arrives_in_pieces_in_time_is_answered(proxy: ProxyServer) -> None:
    payload = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "pieces"}]}
    ).encode()
    with closing(connect(proxy)) as sock:
        sock.sendall(head(CHAT, length=len(payload), extra="Connection: close\r\n"))
        sock.sendall(payload[:10])
        sock.sendall(payload[10:])
        status, _, body = parse(read_to_end(sock))
    assert status == 200
    assert body["choices"][0]["message"]["content"].endswith("pieces")


# --- a client that stops reading ---------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """A proxy with one backend connection, which gives up on a client that reads nothing
    of its answer for a second."""
    return start_proxy(
        policy=e2e_policy(mock_backend.api_base),
        env={"CLIENT_SEND_TIMEOUT": "1", "BACKEND_POOL_SIZE": "1"},
    )


def test_a_client_that_stops_reading_a_stream_is_cut_and_frees_its_backend_slot(
    one_slot: ProxyServer, mock_backend: MockBackendServer
) -> None:
    """The client reads the answer's head and then nothing: once the proxy's buffers are
    full, the stream waits on it; after ``CLIENT_SEND_TIMEOUT`` the connection is aborted,
    the backend stream closed, the pool slot freed and the transaction recorded."""
    marker = f"stalled-{uuid.uuid4().hex}"
    payload = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "a long answer"}],
            "stream": True,
        }
    ).encode()
    directives = (
        f"x-mock-request-id: {marker}\r\n"
        "x-mock-words: 2000000\r\n"  # some 16 MB: more than the buffers on the way hold
        "x-mock-chunk-size: 16384\r\n"
        "x-mock-delay-ms: 10\r\n"  # over some 10 s: still running when the client is cut
    )
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        sock.settimeout(WAIT)
        host, port = one_slot.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        sock.sendall(head(CHAT, length=len(payload), extra=directives) + payload)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(1024)
        headers = dict(
            line.split(": ", 1)
            for line in received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
        )
        transaction_id = headers["x-luthien-transaction-id"]
        # Read nothing more: the proxy gives up on this client and aborts the connection.
        record = one_slot.record(transaction_id, timeout=WAIT)
        with contextlib.suppress(ConnectionResetError):  # or an end: what was buffered
            while sock.recv(65536):  # is dropped, the connection ends (not a timeout)
                pass
    message = (
        "the client stopped reading: nothing of the answer could be sent for 1 s "
        "(CLIENT_SEND_TIMEOUT)"
    )
    assert (record["status"], record["outcome"], record["error"]) == (
        200,
        "client_disconnected",
        message,
    )
    assert record["streamed"] is True
    assert record["chunks_sent"] > 0
    backend = mock_backend.wait_for_record(marker, lambda r: r["outcome"] != "in_progress")
    assert backend is not None and backend["outcome"] == "cancelled"
    # The one backend connection is free again: the next request gets it.
    with closing(connect(one_slot)) as sock:
        sock.sendall(chat_request())
        assert parse(read_to_end(sock))[0] == 200
    lines = [line for line in proxy_log(one_slot).splitlines() if "CLIENT_SEND_TIMEOUT" in line]
    assert len(lines) == 1
    assert lines[0].endswith(f"(POST {CHAT}): {message}; connection aborted")


# --- the connection cap -------------------------------------------------------------------


def chat_request(path: str = CHAT) -> bytes:
    payload = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    return head(path, length=len(payload), extra="Connection: close\r\n") + payload


def test_one_connection_beyond_the_cap_is_answered_503(capped: ProxyServer) -> None:
    with ExitStack() as held:
        for _ in range(CAP):  # idle: accepted, nothing sent
            held.enter_context(closing(connect(capped)))
        for path, shape in ((CHAT, "openai"), (MESSAGES, "anthropic")):
            with closing(connect(capped)) as sock:
                sock.sendall(chat_request(path))
                status, headers, body = parse(read_to_end(sock))
            message = (
                f"the proxy holds its maximum of {CAP} connections (MAX_CONNECTIONS); retry in 1 s"
            )
            assert status == 503
            assert headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            if shape == "openai":
                assert body == openai_error(
                    message, "over_capacity", headers["x-luthien-transaction-id"]
                )
            else:
                assert body == anthropic_error("api_error", message)
    assert "connection cap reached (MAX_CONNECTIONS=4): 1 request(s) answered 503" in (
        proxy_log(capped)
    )
    # The held connections are closed: new requests are served again.
    assert eventually_answered(capped) == 200


def eventually_answered(proxy: ProxyServer) -> int:
    """The status of a chat request, retried (bounded) while the proxy has not yet seen
    the closed connections go."""
    status = 0
    for _ in range(100):
        with closing(connect(proxy)) as sock:
            sock.sendall(chat_request())
            status = parse(read_to_end(sock))[0]
        if status != 503:
            break
        time.sleep(0.05)
    return status


def test_connections_under_the_cap_are_served(capped: ProxyServer) -> None:
    with ExitStack() as held:
        for _ in range(CAP - 1):
            held.enter_context(closing(connect(capped)))
        assert eventually_answered(capped) == 200


def proxy_log(proxy: ProxyServer) -> str:
    assert proxy.server is not None
    return proxy.server.log()


@pytest.fixture(autouse=True)
def _no_traceback(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("proxy", "capped", "one_slot"):
        if name in request.fixturenames:
            assert "Traceback" not in proxy_log(request.getfixturevalue(name))
