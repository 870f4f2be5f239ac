"""The backend client against scripted HTTP servers on loopback ports: the exact bytes it
sends, keep-alive reuse, and every way an answer can go wrong."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from luthien_control.exceptions import BackendBroken, BackendTimeout, BackendUnreachable
from luthien_control.settings import Limits, Timeouts
from luthien_control.upstream import BackendClient
from luthien_control.upstream import client as client_module
from luthien_control.upstream.client import HIGH_WATER, display_url, has_dot_segment

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent
CERT = HERE / "localhost-cert.pem"  # self-signed for localhost and 127.0.0.1, until 2126
KEY = HERE / "localhost-key.pem"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Backend:
    """A scripted HTTP server: ``script`` handles each connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.open_now = 0
        self.most_open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """One whole request (head and content-length body), as it came."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        raw = head + await reader.readexactly(length)
        self.requests.append(raw)
        return raw


@asynccontextmanager
async def backend(
    script: Script, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Backend, str]]:
    server_side = Backend(script)
    server = await asyncio.start_server(server_side.handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    try:
        yield server_side, f"{scheme}://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def client(
    *,
    read: float = 5.0,
    connect: float = 5.0,
    pool_size: int = 10,
    pool_setting: str = "BACKEND_POOL_SIZE",
) -> AsyncIterator[BackendClient]:
    backend_client = BackendClient(
        Timeouts(connect=connect, read=read), Limits(pool_size), pool_setting=pool_setting
    )
    await backend_client.start()
    try:
        yield backend_client
    finally:
        await backend_client.close()


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body


async def keep_answering(
    backend_side: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while True:
        try:
            await backend_side.request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(answer(b'{"ok":true}', "content-type: application/json"))
        await writer.drain()


async def open_fails(
    c: BackendClient,
    url: str,
    error: type[Exception],
    match: str,
    *,
    headers: dict[str, str] | None = None,
) -> None:
    """A GET to ``url`` fails with ``error`` (its message matching ``match``)."""
    with pytest.raises(error, match=match):
        async with c.open("GET", url, headers or {}, None):
            pass


async def body_cut_short(script: Script) -> None:
    """Reading the answer ``script`` gives to a GET fails: its body was cut short."""
    async with backend(script) as (_, url), client() as c, c.open("GET", url, {}, None) as r:
        with pytest.raises(BackendBroken, match="cut short"):
            await r.read()


@asynccontextmanager
async def answering(*, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Backend, str]]:
    """A backend that answers every request ``{"ok":true}`` on a kept-alive connection."""
    sides: list[Backend] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_answering(sides[0], reader, writer)

    async with backend(script, tls=tls) as (side, url):
        sides.append(side)
        yield side, url


async def test_the_request_goes_out_as_exact_bytes() -> None:
    async with answering() as (side, url), client() as c:
        headers = {"content-type": "application/json", "x-mock-words": "3", "host": "ignored"}
        async with c.open("POST", f"{url}/v1/chat/completions?a=1#frag", headers, b'{"m":1}') as r:
            assert (r.status, await r.read()) == (200, b'{"ok":true}')
            assert r.headers == {"content-length": "11", "content-type": "application/json"}
        async with c.open("GET", f"{url}/v1/models", {}, None) as r:
            assert await r.read() == b'{"ok":true}'
    host = url.removeprefix("http://")
    assert side.requests == [
        f"POST /v1/chat/completions?a=1 HTTP/1.1\r\nhost: {host}\r\n"
        "content-type: application/json\r\nx-mock-words: 3\r\ncontent-length: 7\r\n\r\n"
        '{"m":1}'.encode(),
        f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\n\r\n".encode(),
    ]
    assert side.connections == 1  # the second request reused the first connection


async def test_credentials_in_the_url_become_basic_auth() -> None:
    async with answering() as (side, url), client() as c:
        authed = url.replace("http://", "http://user%40x:p%3Ass@")
        async with c.open("POST", f"{authed}/v1/x", {}, None) as r:
            await r.read()
    # base64("user@x:p:ss")
    assert b"authorization: Basic dXNlckB4OnA6c3M=\r\ncontent-length: 0\r\n" in side.requests[0]


async def test_repeated_headers_are_joined_and_names_lower_cased() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"x", "X-Thing: a", "x-thing: b", "Content-Type: text/plain"))

    async with backend(script) as (_, url), client() as c, c.open("GET", url, {}, None) as r:
        assert r.headers == {"content-length": "1", "x-thing": "a, b", "content-type": "text/plain"}
        assert await r.read() == b"x"


async def test_a_chunked_body_comes_piece_by_piece_as_it_arrives() -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    gate = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await gate.wait()  # the next piece only once the client has read this one
            gate.clear()
        writer.write(b"0\r\n\r\n")

    received = []
    async with backend(script) as (_, url), client() as c, c.open("GET", url, {}, None) as r:
        assert r.is_event_stream
        async for data in r.iter_bytes():
            received.append(data)
            gate.set()
    assert received == pieces


async def test_an_idle_connection_the_backend_closed_is_replaced() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"ok"))  # keep-alive by HTTP/1.1 default, then closes anyway
        await writer.drain()

    async with backend(script) as (side, url), client() as c:
        for _ in range(3):
            async with c.open("GET", url, {}, None) as r:
                assert await r.read() == b"ok"
            await asyncio.sleep(0.05)  # the close may or may not have reached the pool
    assert side.connections == 3


async def test_a_close_racing_the_reuse_is_retried_once_on_a_new_connection() -> None:
    count = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        if count == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(b"first"))
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the second request comes on this one...
            return  # ...and the connection closes without an answer
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"second"))

    async with backend(script) as (side, url), client() as c:
        async with c.open("GET", url, {}, None) as r:
            assert await r.read() == b"first"
        async with c.open("GET", url, {}, None) as r:
            assert await r.read() == b"second"
    assert side.connections == 2


async def test_a_new_connection_closed_without_an_answer_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async with backend(script) as (side, url), client() as c:
        await open_fails(c, url, BackendBroken, r"the backend closed the connection \(http://")
    assert side.connections == 1  # not retried: the request may have been acted on


async def test_a_body_cut_short_is_an_error_after_what_came() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()

    async with backend(script) as (_, url), client() as c, c.open("GET", url, {}, None) as r:
        assert await r.iter_bytes().__anext__() == b"0123456789"
        with pytest.raises(BackendBroken, match=r"the backend's response was cut short"):
            await r.read()


async def test_a_body_that_ends_with_the_connection_is_complete() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")

    async with backend(script) as (side, url), client() as c:
        for _ in range(2):
            async with c.open("GET", url, {}, None) as r:
                assert await r.read() == b"all of it"
    assert side.connections == 2  # such a connection is never reused


async def test_garbage_instead_of_http_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x00\x01garbage that is not HTTP\r\n\r\n")
        await asyncio.sleep(1)

    async with backend(script) as (_, url), client() as c:
        await open_fails(c, url, BackendBroken, r"invalid HTTP answer")


async def test_informational_answers_are_skipped() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"final", status="201 Created"))

    async with backend(script) as (_, url), client() as c, c.open("POST", url, {}, b"x") as r:
        assert (r.status, await r.read()) == (201, b"final")


async def test_a_head_answer_has_no_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        await asyncio.sleep(1)

    async with backend(script) as (_, url), client() as c, c.open("HEAD", url, {}, None) as r:
        assert (r.status, r.headers["content-length"], await r.read()) == (200, "5", b"")


async def test_a_silent_backend_times_out_between_reads() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
        await writer.drain()
        await asyncio.sleep(5)

    async with (
        backend(script) as (_, url),
        client(read=0.3) as c,
        c.open("GET", url, {}, None) as r,
    ):
        assert await r.iter_bytes().__anext__() == b"01234"
        with pytest.raises(BackendTimeout, match=r"did not answer in time \(http://"):
            await r.read()
    async with backend(keep_answering_never) as (_, url), client(read=0.3) as c:
        with pytest.raises(BackendTimeout, match=r"did not answer in time"):
            async with c.open("GET", url, {}, None):
                pass  # no answer at all: the same


async def test_nothing_listening_is_unreachable() -> None:
    async with backend(keep_answering_never) as (_, url):
        pass  # closed again: the port is free now
    async with client() as c:
        await open_fails(
            c, f"{url}/v1/models", BackendUnreachable, r"cannot connect to the backend at http://"
        )


async def keep_answering_never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(10)


@pytest.mark.parametrize("url", ["ftp://x/v1", "http:///v1", "http://host:port/v1", "nonsense"])
async def test_an_invalid_url_is_unreachable(url: str) -> None:
    async with client() as c:
        await open_fails(c, url, BackendUnreachable, "invalid backend URL")


# --- what the messages show of a URL ----------------------------------------------------

PASSWORD = "hunter2-url-password"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"http://user:{PASSWORD}@host/v1", "http://host/v1"),
        (f"https://{PASSWORD}@host:8443/v1/x#frag", "https://host:8443/v1/x"),
        (
            "http://host/v1?api-version=2&api_key=k1&Token=k2&sig=k3&x-Api-Key=k4&password=k5",
            "http://host/v1?api-version=2&api_key=[REDACTED]&Token=[REDACTED]&sig=[REDACTED]"
            "&x-Api-Key=[REDACTED]&password=[REDACTED]",
        ),
        ("http://host/v1?access%5Ftoken=k&flag", "http://host/v1?access%5Ftoken=[REDACTED]&flag"),
        (f"http://[::1]:8000/v1?secret={PASSWORD}", "http://[::1]:8000/v1?secret=[REDACTED]"),
        # Passwords that hold "/", "?" or "#" unescaped: the URL does not parse, and
        # everything up to the last "@" goes.
        (f"http://user:{PASSWORD}/x@host/v1", "http://host/v1"),
        (f"http://user:{PASSWORD}?x@host/v1", "http://host/v1"),
        (f"http://user:{PASSWORD}#x@host/v1", "http://host/v1"),
        (f"user:{PASSWORD}@host/v1", "host/v1"),
        ("http://host/v1/models/a@b", "http://host/v1/models/a@b"),  # "@" in a path stays
        ("nonsense", "nonsense"),
    ],
)
def test_display_url_drops_userinfo_and_masks_credentials_in_the_query(
    url: str, shown: str
) -> None:
    assert display_url(url) == shown


async def test_credentials_in_the_url_are_never_in_an_error_message() -> None:
    async with backend(keep_answering_never) as (_, url):
        pass  # closed again: the port is free now
    port = url.rpartition(":")[2]
    authed = url.replace("http://", f"http://user:{PASSWORD}@")
    async with client() as c:
        with pytest.raises(BackendUnreachable) as caught:
            async with c.open("GET", f"{authed}/v1/models?token={PASSWORD}&a=1", {}, None):
                pass
    assert caught.value.message == (
        f"cannot connect to the backend at http://127.0.0.1:{port}/v1/models"
        "?token=[REDACTED]&a=1: Connection refused"
    )
    assert PASSWORD not in repr(caught.value.__cause__)


async def test_a_timeout_message_shows_the_url_without_its_credentials() -> None:
    async with backend(keep_answering_never) as (_, url), client(read=0.3) as c:
        authed = url.replace("http://", f"http://user:{PASSWORD}@")
        with pytest.raises(BackendTimeout) as caught:
            async with c.open("GET", f"{authed}/v1/models?api_key={PASSWORD}", {}, None):
                pass
    assert caught.value.message == (
        f"the backend did not answer in time ({url}/v1/models?api_key=[REDACTED])"
    )


@pytest.mark.parametrize(
    "url", [f"http://user:{PASSWORD}/x@host/v1", f"http://user:{PASSWORD}@host:port/v1"]
)
async def test_an_invalid_url_with_credentials_is_shown_without_them(url: str) -> None:
    async with client() as c:
        with pytest.raises(BackendUnreachable) as caught:
            async with c.open("GET", url, {}, None):
                pass
    assert PASSWORD not in caught.value.message
    assert caught.value.message.startswith("invalid backend URL: http://host")
    # urlsplit's own error quotes the text it took for a port: not kept as the cause.
    assert caught.value.__cause__ is None


# --- dot segments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        ("/chat/completions", False),
        ("/models/gpt-4.1", False),
        ("/files/a..b/..c/.d", False),
        ("/models/org%2Fname", False),  # an encoded slash alone is no dot segment
        ("/%25%25", False),
        ("/..", True),
        ("/../internal", True),
        ("/./x", True),
        ("/x/.", True),
        ("/%2e%2e/x", True),
        ("/foo/%2E%2E/%2e%2e/admin", True),
        ("/.%2e/x", True),
        ("/..%2finternal", True),
        ("/x%2F%2e%2e%2Fadmin", True),
        ("/x\\..\\admin", True),
        ("/x%5c..%5cadmin", True),
        ("/%252e%252e/x", True),  # encoded twice
        ("/%25252525252e%25252525252e/x", True),  # still changing after four decodings
        ("/..;/admin", True),  # Tomcat reads "..;" as ".."
    ],
)
def test_dot_segments_are_found_in_every_reading(path: str, dotted: bool) -> None:
    assert has_dot_segment(path) is dotted


@pytest.mark.parametrize(
    "headers", [{"x-a": "1\r\nx-injected: 1"}, {"x-a\r\nx-b": "1"}, {"x-a:b": "1"}]
)
async def test_a_header_that_would_split_the_request_is_refused(headers: dict[str, str]) -> None:
    async with client() as c:
        with pytest.raises(BackendBroken, match="cannot send header"):
            async with c.open("GET", "http://127.0.0.1:9/v1", headers, None):
                pass


async def test_a_response_left_unread_closes_its_connection() -> None:
    eof = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # returns b"" once the client has closed the connection
        eof.set()

    async with backend(script) as (_, url), client() as c:
        async with c.open("GET", url, {}, None) as r:
            assert await r.iter_bytes().__anext__() == b"first"
        await asyncio.wait_for(eof.wait(), 5)  # the backend sees the cancellation


async def test_the_pool_size_bounds_requests_in_flight() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.1)
        writer.write(answer(b"ok", "connection: close"))

    async def one(c: BackendClient, url: str) -> bytes:
        async with c.open("GET", url, {}, None) as r:
            return await r.read()

    async with backend(script) as (side, url), client(pool_size=2) as c:
        results = await asyncio.gather(*(one(c, url) for _ in range(6)))
    assert results == [b"ok"] * 6
    assert (side.connections, side.most_open) == (6, 2)


async def test_a_large_body_read_slowly_arrives_whole() -> None:
    body = bytes(range(256)) * (8 * HIGH_WATER // 256)  # 8 x the buffer that pauses reading

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(body))
        await writer.drain()

    received = bytearray()
    async with backend(script) as (_, url), client() as c, c.open("GET", url, {}, None) as r:
        async for data in r.iter_bytes():
            assert len(data) <= HIGH_WATER + 256 * 1024  # paused: never much more than that
            received += data
            await asyncio.sleep(0.01)
    assert received == body


def tls_server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERT, KEY)
    return context


async def test_https_to_a_trusted_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))  # trusted the way a user would do it
    async with answering(tls=tls_server_context()) as (side, url), client() as c:
        for _ in range(2):
            async with c.open("POST", f"{url}/v1/chat/completions", {}, b"{}") as r:
                assert (r.status, await r.read()) == (200, b'{"ok":true}')
    assert side.connections == 1


async def test_https_to_an_untrusted_backend_is_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with backend(keep_answering_never, tls=tls_server_context()) as (_, url), client() as c:
        await open_fails(c, url, BackendUnreachable, "certificate verify failed")


async def test_a_body_read_to_its_end_frees_its_slot_at_once() -> None:
    async with (
        answering() as (side, url),
        client(pool_size=1, connect=0.5) as c,
        c.open("GET", url, {}, None) as first,
    ):
        assert await first.read() == b'{"ok":true}'
        # Still inside the first block (the proxy keeps it open until the client has
        # its answer): the one slot and the connection are free again already.
        async with c.open("GET", url, {}, None) as second:
            assert await second.read() == b'{"ok":true}'
        assert await first.read() == b""  # read to its end: nothing more
    assert side.connections == 1


async def test_waiting_for_a_free_slot_is_bounded() -> None:
    async with (
        answering() as (_, url),
        client(pool_size=1, connect=0.3) as c,
        c.open("GET", url, {}, None),  # holds the only slot, body unread
    ):
        await open_fails(c, url, BackendTimeout, r"no free backend connection within 0.3 s")


async def test_two_clients_never_share_slots_and_each_names_its_own_setting() -> None:
    """The proxy's own calls (judges) have a client of their own (``app.Services``): with
    every slot of the clients' pool held, they still get a connection."""
    async with (
        answering() as (_, url),
        client(pool_size=1, connect=0.3) as requests,
        client(pool_size=1, connect=0.3, pool_setting="JUDGE_POOL_SIZE") as judges,
        requests.open("GET", url, {}, None),  # holds the clients' only slot
    ):
        async with judges.open("GET", url, {}, None) as r:
            assert r.status == 200
            await open_fails(
                judges, url, BackendTimeout, r"1 requests in flight \(JUDGE_POOL_SIZE\)"
            )
        await open_fails(
            requests, url, BackendTimeout, r"1 requests in flight \(BACKEND_POOL_SIZE\)"
        )


async def test_bytes_after_a_complete_answer_are_never_taken_for_it() -> None:
    count = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        await reader.readuntil(b"\r\n\r\n")
        if count == 1:  # a second answer nobody asked for, in the same segment
            writer.write(answer(b"ok", "x-a: 1") + answer(b"EVIL", "x-a: 2", status="500 No"))
        else:
            writer.write(answer(b"fresh"))
        await writer.drain()
        await asyncio.sleep(1)

    async with backend(script) as (side, url), client() as c:
        async with c.open("GET", url, {}, None) as r:
            assert (r.status, r.headers, await r.read()) == (
                200,
                {"content-length": "2", "x-a": "1"},
                b"ok",
            )
        async with c.open("GET", url, {}, None) as r:
            assert await r.read() == b"fresh"
    assert side.connections == 2  # the first connection was not reused


async def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not an orderly end."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_body_ended_by_the_connection_but_reset_is_cut_short() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\npart of the bo")
        await writer.drain()
        await asyncio.sleep(0.1)
        await reset(writer)

    await body_cut_short(script)


async def test_a_chunked_body_cut_short_is_an_error_whatever_the_case_of_the_header() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()

    await body_cut_short(script)


async def test_an_upgrade_answer_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"
        )
        await asyncio.sleep(1)

    async with backend(script) as (_, url), client() as c:
        await open_fails(c, url, BackendBroken, "invalid HTTP answer")


async def test_line_ends_and_spaces_in_the_path_are_percent_encoded() -> None:
    async with (
        answering() as (side, url),
        client() as c,
        c.open("GET", f"{url}/v1/a b\r\nDELETE /x?q=caf\xc3\xa9", {}, None) as r,
    ):
        await r.read()
    # The path is the client's bytes as latin-1 text: they go out as those bytes.
    assert side.requests[0].startswith(b"GET /v1/a%20b%0D%0ADELETE%20/x?q=caf%C3%A9 HTTP/1.1\r\n")
    assert len(side.requests) == 1
    async with answering() as (side, url), client() as c, c.open("GET", f"{url}/☕", {}, None) as r:
        await r.read()  # beyond latin-1: only a policy can write that, in UTF-8
    assert side.requests[0].startswith(b"GET /%E2%98%95 HTTP/1.1\r\n")


async def test_a_header_with_a_nul_is_refused_and_a_latin1_value_goes_as_it_came() -> None:
    async with client() as c:
        await open_fails(
            c,
            "http://127.0.0.1:9/v1",
            BackendBroken,
            "cannot send header",
            headers={"x-a": "1\x002"},
        )
    async with (
        answering() as (side, url),
        client() as c,
        c.open("GET", url, {"x-latin": "café", "x-emoji": "☕"}, None) as r,
    ):
        await r.read()
    assert b"x-latin: caf\xe9\r\nx-emoji: \xe2\x98\x95\r\n" in side.requests[0]


async def test_a_host_name_that_cannot_be_encoded_is_unreachable() -> None:
    async with client() as c:
        with pytest.raises(BackendUnreachable):
            async with c.open("GET", f"http://{'a' * 64}.example/v1", {}, None):
                pass


async def test_a_host_name_is_resolved_once_for_many_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"ok", "connection: close"))  # every request: a new connection

    loop = asyncio.get_running_loop()
    asked: list[str] = []
    resolve = loop.getaddrinfo

    async def counting(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return await resolve(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    async with backend(script) as (side, url), client() as c:
        named = url.replace("127.0.0.1", "localhost")
        for _ in range(3):
            async with c.open("GET", named, {}, None) as r:
                assert await r.read() == b"ok"
    assert (asked, side.connections) == (["localhost"], 3)


async def test_a_burst_s_idle_connections_are_closed_once_demand_falls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reuse takes the newest idle connection, so a burst's surplus would never be reached
    again: the pool closes what the last windows' demand did not need."""
    monkeypatch.setattr(client_module, "DEMAND_WINDOW", 0.05)
    gate, all_in = asyncio.Event(), asyncio.Event()
    sides: list[Backend] = []
    waiting = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal waiting
        while True:
            try:
                raw = await sides[0].request(reader)
            except asyncio.IncompleteReadError:
                return
            if raw.startswith(b"GET /burst "):
                waiting += 1
                if waiting == 8:
                    all_in.set()
                await gate.wait()
            writer.write(answer(b"ok"))
            await writer.drain()

    async def one(c: BackendClient, url: str) -> bytes:
        async with c.open("GET", url, {}, None) as r:
            return await r.read()

    async with backend(script) as (side, url), client(pool_size=10) as c:
        sides.append(side)
        burst = [asyncio.create_task(one(c, f"{url}/burst")) for _ in range(8)]
        await asyncio.wait_for(all_in.wait(), 5)  # eight connections at once
        gate.set()
        assert await asyncio.gather(*burst) == [b"ok"] * 8
        assert side.open_now == 8  # all kept while demand was recent
        for _ in range(40):  # one at a time, across windows, until the surplus is gone
            assert await one(c, f"{url}/one") == b"ok"
            if side.open_now == 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        assert (side.open_now, side.connections) == (1, 8)  # closed, none opened anew
