"""The backend client: HTTP/1.1 on asyncio transports, parsed by httptools (llhttp), with
one keep-alive pool per client.

The proxy holds two clients (``app.Services``): one for its clients' requests
(``BACKEND_POOL_SIZE``), one for the calls it makes for itself, such as a judge's
(``JUDGE_POOL_SIZE``). A request holds its slot while its policies wait for a judge: a
judge call that needed a slot of the same pool would wait on the very requests it
serves (a full pool, and every judge call timed out); with a pool of its own it never
waits on their capacity.

A proxy's backend client does one thing: send one request on a warm connection and hand
the answer back as it arrives. aiohttp's ``ClientSession`` does it in about 160 µs of CPU
per request on the development machine; this client, about 30 µs (docs/performance.md,
"what each change bought"): the difference was a third of the proxy's whole cost per
request. What it does:

- one request at a time per connection; idle connections are kept per origin (LIFO, at
  most ``IDLE_TIMEOUT`` seconds, and no more than recent demand needs: the most requests
  in flight at once over the last ``DEMAND_WINDOW`` to two windows) and reused; a reused
  connection that turns out to have been closed by the backend before any byte of the
  answer came back is replaced once, by a new connection, whatever the method: a
  backend closes an idle connection without reading what came on it (the rare backend
  that read the request and then closed without a byte of answer gets it twice; the
  alternative was a 502 whenever a keep-alive timeout crossed a request);
- a body read to its end gives its connection back to the pool and frees its slot at
  once; the path goes out as the client wrote it, with anything that could end the
  request line percent-encoded, and a header that could end a line is refused;
- a new connection is opened by ``connect.py``: a host name's addresses kept
  ``BACKEND_DNS_TTL`` seconds and raced (RFC 8305, 250 ms apart), through the egress
  proxy of ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` unless ``NO_PROXY`` says otherwise
  (``CONNECT`` and TLS inside the tunnel for an ``https://`` backend, absolute-form
  requests for an ``http://`` one), TLS trusting the system store or
  ``BACKEND_CA_BUNDLE`` and showing ``BACKEND_CLIENT_CERT`` when asked;
- at most ``pool_size`` requests in flight (``BACKEND_POOL_SIZE`` or ``JUDGE_POOL_SIZE``),
  the rest wait, each at most the connect timeout;
- ``connect`` bounds opening a connection (TLS included), ``read`` the wait for each
  piece of the answer (``BACKEND_CONNECT_TIMEOUT``, ``BACKEND_READ_TIMEOUT``);
- an answer's head (status line and headers, informational answers included) larger
  than ``MAX_HEAD_BYTES`` (64 KiB) is a ``BackendBroken``: nothing is buffered without
  bound before the body, and a chunked body's trailers are read and dropped;
- the body comes as the network delivers it (chunked encoding undone, nothing
  decompressed: the backend's bytes pass through untouched); reading pauses while more
  than ``HIGH_WATER`` bytes wait for a slow consumer;
- a response that is not read to its end is closed, not returned to the pool, so the
  backend sees the cancellation and stops generating.

Every failure is one of the proxy's ``BackendError`` kinds, with the URL in its message as
``display_url`` (``urls.py``) renders it: never its userinfo, never a credential in its
query, never a proxy's credentials.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import quote, unquote, urlsplit

import httptools

from luthien_control.exceptions import BackendBroken, BackendTimeout, BackendUnreachable
from luthien_control.settings import Limits, Network, Timeouts
from luthien_control.upstream.connect import MAX_HEAD_BYTES, Connector, literal_address
from luthien_control.upstream.urls import (
    DOT_SEGMENT_REFUSED,
    REDACTED,
    display_url,
    has_dot_segment,
)

IDLE_TIMEOUT = 15.0  # seconds an idle keep-alive connection is kept for reuse
# Idle connections kept per origin: at most the most requests in flight at once during
# the current and the previous window of this many seconds (see ``_finish``).
DEMAND_WINDOW = 2.0
TRIM_PER_FINISH = 4  # surplus idle connections closed per connection given back, at most
HIGH_WATER = 256 * 1024  # buffered answer bytes at which reading pauses
_NOT_SENT = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "proxy-authorization"}
)
logger = logging.getLogger(__name__)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods, field names
_HEADER_LINE = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\r\n\x00]*\r\n"
_HEADER_BLOCK = re.compile(f"(?:{_HEADER_LINE})*")
_VISIBLE = "".join(map(chr, range(0x21, 0x7F)))
_TARGET = re.compile(r"/[\x21-\x7e]*")  # a path and query, visible ASCII only


class _Origin:
    """Where requests for one ``scheme://host:port`` go."""

    __slots__ = (
        "address",
        "authorization",
        "host",
        "host_header",
        "key",
        "port",
        "proxy",
        "proxy_header",
        "target_prefix",
        "tls",
    )

    def __init__(self, prefix: str, url: str, connector: Connector) -> None:
        """``prefix``: ``scheme://authority`` of ``url``, the whole URL (for messages: a
        password holding a ``/`` ends the prefix early, and only the whole URL shows it)."""
        try:
            parts = urlsplit(prefix)
            port = parts.port
        except ValueError:  # its text may quote part of the password: not kept as the cause
            raise BackendUnreachable(f"invalid backend URL: {display_url(url)}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendUnreachable(f"invalid backend URL: {display_url(url)}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.tls else 80)
        netloc = parts.netloc.rpartition("@")[2]
        if not netloc.isascii():  # an international name goes out as punycode
            try:
                netloc = netloc.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise BackendUnreachable(f"invalid backend URL: {display_url(url)}") from exc
        self.host_header = netloc
        self.key = (self.tls, self.host, self.port)
        self.address = literal_address(self.host, self.port)  # an IP literal: no DNS
        self.proxy = connector.proxies.for_origin(self.tls, self.host, self.port)
        # Through a proxy, a plain-HTTP request names its origin (absolute form) and
        # carries the proxy's credentials; over TLS the proxy only sees CONNECT.
        self.target_prefix = ""
        self.proxy_header = ""
        if self.proxy is not None and not self.tls:
            self.target_prefix = f"http://{netloc}"
            self.proxy_header = self.proxy.header()
        self.authorization: str | None = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(credentials.encode()).decode()


class _Connection(asyncio.Protocol):
    """One connection to a backend; it carries one request and its answer at a time."""

    def __init__(self, origin: _Origin, read_timeout: float) -> None:
        self.origin = origin
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._begin("", head_only=False)

    def _begin(self, url: str, *, head_only: bool) -> None:
        self.url = url
        self.head_only = head_only  # a HEAD request: the answer has no body
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.framed = False  # the body's end is known (length or chunked), not the close
        self.received = False  # some byte of the answer has come
        self.done = False  # the answer is complete
        self.keep_alive = False
        self.head_bytes = 0  # bytes received before the head was complete
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.informational = False
        self.waiter: asyncio.Future[None] | None = None

    def begin(self, url: str, *, head_only: bool) -> None:
        """Start a new exchange on this (idle) connection."""
        self._begin(url, head_only=head_only)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.url or self.done:  # bytes nobody asked for: this connection is done
            self._fail(
                BackendBroken(f"the backend sent an unexpected answer ({display_url(self.url)})")
            )
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(
                BackendBroken(
                    f"backend error ({display_url(self.url)}): invalid HTTP answer: {exc}"
                )
            )
            return
        if not self.head_done:  # a head that never ends is not buffered without bound
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(
                    BackendBroken(
                        f"backend error ({display_url(self.url)}): the answer's head is "
                        f"larger than {MAX_HEAD_BYTES} bytes"
                    )
                )

    def eof_received(self) -> bool:
        return False  # close our side as well

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.url or self.done or self.error is not None:
            self._wake()
            return
        if not self.head_done:
            self.error = _Closed(self.received)
        elif self.framed or exc is not None:
            self.error = BackendBroken(
                f"the backend's response was cut short ({display_url(self.url)})"
            )
        else:
            self.done = True  # a body that ends with the connection, as HTTP/1.0 allows
        self._wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.done or self.head_done:
            # More bytes after a complete answer, in the same read: never parse them into
            # this answer, never pool a parser left in the middle of a message.
            raise RuntimeError("the backend sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # a chunked body's trailers are not kept: no bound on them
            self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # "100 Continue" and the like: the answer follows
            self.informational = True
            self.raw_headers = []
            return
        self.status = status
        headers = self.headers
        for raw_name, raw_value in self.raw_headers:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.head_done = True
        self.framed = "content-length" in headers or (
            "chunked" in headers.get("transfer-encoding", "").lower()
        )
        if self.head_only:
            self.done = True  # llhttp would wait for the body a HEAD answer never has
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # the exchange

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self) -> None:
        self._fail(BackendTimeout(f"the backend did not answer in time ({display_url(self.url)})"))

    async def _wait(self) -> None:
        self.waiter = waiter = self._loop.create_future()
        timer = self._loop.call_later(self.read_timeout, self._timed_out)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    async def wait_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_chunk(self) -> bytes:
        """What has arrived of the body (waiting for some), or b"" at its end."""
        while not self.chunks:
            if self.done:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return (
            self.done
            and self.keep_alive
            and not self.head_only
            and not self.lost
            and self.error is None
            and not self.chunks
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Closed(Exception):
    """The connection closed before the answer's status line and headers were complete."""

    def __init__(self, received: bool) -> None:
        super().__init__()
        self.received = received


class BackendResponse:
    """An open backend response: status and headers now, the body as it arrives.

    Once the body has been read to its end, the connection goes back to the pool and the
    slot is free at once (not when the block exits: the rest of the policy tree and the
    client's answer may take a while); reading again then gives ``b""``.
    """

    __slots__ = ("_exchange", "headers", "status")

    def __init__(self, exchange: _Exchange, connection: _Connection) -> None:
        self._exchange = exchange
        self.status = connection.status
        # Names in lower case; a repeated header's values joined with ", ".
        self.headers: dict[str, str] = connection.headers

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("content-type", "").lower().startswith("text/event-stream")

    async def read(self) -> bytes:
        parts = [data async for data in self.iter_bytes()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive from the network (never waits to fill a buffer)."""
        exchange = self._exchange
        connection = exchange.connection
        if connection is None:
            return  # read to its end already, or closed
        while data := await connection.read_chunk():  # once per network read: kept direct
            yield data
        exchange.finish()

    def close(self) -> None:
        """Drop the connection: the backend sees the request cancelled."""
        connection = self._exchange.connection
        if connection is not None:
            connection.close()


class BackendClient:
    """Sends requests to backends over one keep-alive pool.

    ``pool_setting`` names the setting that sizes the pool, for the message of a request
    that found no free slot.
    """

    def __init__(
        self,
        timeouts: Timeouts,
        limits: Limits,
        network: Network | None = None,
        *,
        pool_setting: str = "BACKEND_POOL_SIZE",
    ) -> None:
        """``network``: DNS, TLS and proxies (``Settings.network``); by default none of
        the environment's proxies, the system trust store, DNS answers kept 300 s. A TLS
        file that cannot be loaded, or a proxy URL that cannot be used, is a
        ``ConfigurationError`` here."""
        self._timeouts = timeouts
        self._limits = limits
        self._pool_setting = pool_setting
        self._connector = Connector(network or Network())
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[tuple[bool, str, int], deque[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._in_flight = 0  # requests holding a slot
        self._peak = 0  # the most in flight at once in the current demand window
        self._previous_peak = 0  # the same, in the window before
        self._window_end = 0.0

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self._limits.pool_size)
        proxies = self._connector.proxies
        if proxies:
            logger.info("egress proxy (%s): %s", self._pool_setting, proxies.describe())

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._slots = None

    def open(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> _Exchange:
        """Send a request: ``async with client.open(...) as response``. The response
        stays open inside the block and is closed after it; one whose body was not read
        to the end (a client disconnect, an error, a policy that blocked mid-stream) is
        closed, which cancels it at the backend."""
        return _Exchange(self, method, url, headers, body)

    async def _acquire(self, slots: asyncio.Semaphore, url: str) -> None:
        """A slot for one request in flight; waiting for one is bounded by the connect
        timeout, as waiting for a connection would be."""
        if not slots.locked():
            await slots.acquire()  # free: no timer to set up
        else:
            try:
                async with asyncio.timeout(self._timeouts.connect):
                    await slots.acquire()
            except TimeoutError as exc:
                raise BackendTimeout(
                    f"no free backend connection within {self._timeouts.connect:g} s: "
                    f"{self._limits.pool_size} requests in flight ({self._pool_setting}) "
                    f"({display_url(url)})"
                ) from exc
        self._in_flight += 1
        if self._in_flight > self._peak:
            self._peak = self._in_flight

    def _release(self, slots: asyncio.Semaphore) -> None:
        slots.release()
        self._in_flight -= 1

    def _split(self, url: str) -> tuple[_Origin, str]:
        """The origin of ``url`` (parsed once per origin) and the request target."""
        start = url.find("://") + 3
        end = len(url)
        for separator in "/?#":
            found = url.find(separator, start)
            if 0 <= found < end:
                end = found
        prefix = url[:end]
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._origins[prefix] = _Origin(prefix, url, self._connector)
        target = url[end:].partition("#")[0]
        if not target.startswith("/"):
            target = "/" + target
        return origin, target

    async def _send(
        self, origin: _Origin, request: bytes, url: str, *, head_only: bool
    ) -> _Connection:
        for attempt in (1, 2):
            # The second attempt always opens a new connection: another pooled one may be
            # just as stale.
            connection = self._take_idle(origin) if attempt == 1 else None
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin, url)
            connection.begin(url, head_only=head_only)
            assert connection.transport is not None
            connection.transport.write(request)
            try:
                await connection.wait_head()
            except _Closed as closed:
                connection.close()
                if reused and not closed.received and attempt == 1:
                    continue  # the backend had closed the idle connection: once more
                raise BackendBroken(
                    f"the backend closed the connection ({display_url(url)})"
                ) from None
            except BaseException:
                connection.close()
                raise
            return connection
        raise AssertionError("unreachable")

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if (
                not connection.lost
                and connection.error is None
                and transport is not None
                and not transport.is_closing()
                and now - connection.idle_since < IDLE_TIMEOUT
            ):
                return connection
            connection.close()
        return None

    def _finish(self, connection: _Connection) -> None:
        """Back to the pool when the answer was read to its end; closed otherwise.

        The pool keeps what recent demand needs, not what a burst once opened: at most
        as many idle connections per origin as there were requests in flight at once
        during the last ``DEMAND_WINDOW`` to two windows, none idle longer than
        ``IDLE_TIMEOUT``. Reuse takes the newest (LIFO), so the oldest are the surplus:
        they are closed from the bottom, a few per connection given back, without a
        timer or a scan. Kept, a burst's connections were held for good (reuse never
        reached them, the idle timeout was checked only on reuse), as were those the
        backend had closed meanwhile."""
        if not connection.reusable:
            connection.close()
            return
        connection.begin("", head_only=False)
        now = asyncio.get_running_loop().time()
        connection.idle_since = now
        idle = self._idle.get(connection.origin.key)
        if idle is None:
            idle = self._idle[connection.origin.key] = deque()
        idle.append(connection)
        if now >= self._window_end:
            self._previous_peak = self._peak
            self._peak = self._in_flight + 1  # this one, just given back, counts
            self._window_end = now + DEMAND_WINDOW
        keep = min(max(self._peak, self._previous_peak), self._limits.pool_size)
        for _ in range(TRIM_PER_FINISH):
            if len(idle) > keep or now - idle[0].idle_since >= IDLE_TIMEOUT:
                idle.popleft().close()
            else:
                break

    async def _connect(self, origin: _Origin, url: str) -> _Connection:
        """A new connection (``connect.py``: addresses raced, through the egress proxy if
        any, TLS), the whole within the connect timeout."""
        try:
            async with asyncio.timeout(self._timeouts.connect):
                connection: _Connection = await self._connector.connect(
                    lambda: _Connection(origin, self._timeouts.read),
                    host=origin.host,
                    port=origin.port,
                    tls=origin.tls,
                    literal=origin.address,
                    proxy=origin.proxy,
                    url=url,
                )
                return connection
        except TimeoutError as exc:
            raise BackendTimeout(
                f"the backend did not answer in time ({display_url(url)})"
            ) from exc
        except (OSError, UnicodeError) as exc:  # refused, unknown host, TLS, bad name, ...
            reason = (isinstance(exc, OSError) and exc.strerror) or str(exc) or type(exc).__name__
            raise BackendUnreachable(
                f"cannot connect to the backend at {display_url(url)}: {reason}"
            ) from exc


class _Exchange:
    """One request and its answer, as an async context manager (cheaper than a
    generator-based one, and this is once per request)."""

    __slots__ = ("_body", "_client", "_headers", "_method", "_slots", "_url", "connection")

    def __init__(
        self,
        client: BackendClient,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
    ) -> None:
        self._client = client
        self._method = method
        self._url = url
        self._headers = headers
        self._body = body
        self.connection: _Connection | None = None
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> BackendResponse:
        client = self._client
        slots = client._slots
        if slots is None:
            raise RuntimeError("BackendClient.start() was not called")
        url = self._url
        origin, target = client._split(url)
        request = _request_bytes(self._method, target, origin, self._headers, self._body, url)
        await client._acquire(slots, url)
        try:
            connection = await client._send(origin, request, url, head_only=self._method == "HEAD")
        except BaseException:
            client._release(slots)
            raise
        self._slots = slots
        self.connection = connection
        return BackendResponse(self, connection)

    def finish(self) -> None:
        """The slot back, and the connection to the pool (read to its end) or closed;
        once, whichever comes first: the end of the body or the end of the block."""
        if self._slots is not None:
            self._client._release(self._slots)
            self._slots = None
        if self.connection is not None:
            self._client._finish(self.connection)
            self.connection = None

    async def __aexit__(self, *exc_info: object) -> None:
        self.finish()


def _request_bytes(
    method: str,
    target: str,
    origin: _Origin,
    headers: dict[str, str],
    body: bytes | None,
    url: str,
) -> bytes:
    """The request head and body, as one write. Nothing that could end a line or the
    request line goes out: such characters in the path are percent-encoded, and a
    header that holds one is refused."""
    if not _TOKEN.fullmatch(method):
        raise BackendBroken(
            f"cannot send the method {method!r} to the backend ({display_url(url)})"
        )
    if not _TARGET.fullmatch(target):
        # Spaces, line ends, controls and non-ASCII characters are percent-encoded, as
        # every HTTP client does: none of them can end the request line. Paths are
        # latin-1 text here (the client's raw bytes, one character each), so latin-1
        # gives the bytes back; a character beyond it can only come from a policy.
        try:
            target = quote(target, safe=_VISIBLE, encoding="latin-1")
        except UnicodeEncodeError:
            target = quote(target, safe=_VISIBLE, encoding="utf-8")
    lines = [f"{name}: {value}\r\n" for name, value in headers.items() if name not in _NOT_SENT]
    block = "".join(lines)
    # One C pass instead of checks per header; a value holding a line end would make
    # more lines than headers.
    if not _HEADER_BLOCK.fullmatch(block) or block.count("\n") != len(lines):
        for line in lines:
            if not _HEADER_BLOCK.fullmatch(line) or line.count("\n") != 1:
                name = line.partition(":")[0]
                raise BackendBroken(
                    f"cannot send header {name!r} to the backend ({display_url(url)})"
                )
    if origin.authorization is not None and "authorization" not in headers:
        block += f"authorization: {origin.authorization}\r\n"
    if body is not None:
        block += f"content-length: {len(body)}\r\n"
    elif method in _BODY_METHODS:
        block += "content-length: 0\r\n"
    head = (
        f"{method} {origin.target_prefix}{target} HTTP/1.1\r\nhost: {origin.host_header}\r\n"
        f"{origin.proxy_header}{block}\r\n"
    )
    try:
        encoded = head.encode("latin-1")  # as the client's headers were decoded
    except UnicodeEncodeError:  # a value set by a policy: that value in UTF-8
        encoded = b"".join(
            line.encode("latin-1") if line.isascii() else _encode_line(line)
            for line in head.splitlines(keepends=True)
        )
    return encoded + body if body else encoded


def _encode_line(line: str) -> bytes:
    try:
        return line.encode("latin-1")
    except UnicodeEncodeError:
        return line.encode()


__all__ = [
    "DOT_SEGMENT_REFUSED",
    "REDACTED",
    "BackendClient",
    "BackendResponse",
    "display_url",
    "has_dot_segment",
]
