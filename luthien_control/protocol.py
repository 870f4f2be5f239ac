"""The HTTP/1.1 connection: uvicorn's httptools protocol, with the bounds a proxy facing
untrusted clients needs and uvicorn lacks (``serve`` runs uvicorn with it).

- **The request head** must arrive within ``CLIENT_HEADER_TIMEOUT`` seconds, from the
  moment the connection is accepted (its first request) or its first byte came (a later
  one), and within ``MAX_HEAD_BYTES``. A connection that sent nothing is closed; one that
  sent part of a head gets a 408 (431 when too large) and is closed. One log line each.
- **Connections**: a worker holds at most ``MAX_CONNECTIONS``. A request on one more is
  answered at once, without reaching the application, with a 503 in its API's error
  shape, ``Retry-After`` and ``Connection: close``.
- **A client that stops reading** its answer: once the connection's write buffer is full
  (the transport pauses writing; uvicorn's ``FlowControl`` then holds every ``send``),
  the client must take some of it within ``CLIENT_SEND_TIMEOUT`` seconds, else the
  connection is aborted. The application sees the client gone (``http.disconnect``): it
  closes the backend stream, which frees its pool slot, and records the transaction as
  ``client_disconnected``, with the reason it finds in the scope (``CLIENT_STALLED``).
  One log line.

The body's deadline (``CLIENT_BODY_TIMEOUT``) is kept by the application
(``server.BodyDeadlines``), which answers in the request's dialect and records it.

The hot path pays nothing here: a head that arrives in one read (nearly every one)
arms no timer; a timer is armed once per connection (for its first head) and when a read
leaves a head incomplete, and cancelled as soon as the head is complete or the connection
is lost. The send timer is armed only while writing is paused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any

import httptools
import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from luthien_control.dialects import RAW, Dialect, dialect_for
from luthien_control.exceptions import HeadTooLarge, LuthienError, OverCapacity, RequestTimeout
from luthien_control.responses import json_headers
from luthien_control.settings import Settings, load_settings
from luthien_control.transaction import new_transaction_id

logger = logging.getLogger(__name__)

# The largest request head (request line and headers) read over several network reads;
# larger: 431 and the connection is closed. uvicorn's httptools protocol has no bound.
MAX_HEAD_BYTES = 64 * 1024
# What an over-capacity answer tells the client to wait: streams end and connections are
# let go all the time, and the SDKs back off further on each retry.
RETRY_AFTER_SECONDS = 1
# At most one "connection cap reached" line per this many seconds (a flood is one line).
CAP_LOG_INTERVAL = 10.0
# The scope key under which a request learns that its client stopped reading its answer
# (the error text), for its record.
CLIENT_STALLED = "luthien.client_stalled"


@functools.cache
def _settings() -> Settings:
    return load_settings()  # once per worker process, as the application does


def _dialect(url: bytes) -> Dialect:
    """The dialect of a request target (``/v1/messages?beta=true``), as the app reads it."""
    from luthien_control.server import api_path, canonical_path  # the app imports much

    try:
        path = httptools.parse_url(url).path.decode("latin-1")
    except (httptools.HttpParserInvalidURLError, AttributeError):
        return RAW
    relative = api_path(path)
    return dialect_for(canonical_path(relative)) if relative is not None else RAW


def error_response(
    dialect: Dialect, exc: LuthienError, extra: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of ``exc`` in ``dialect``'s shape, the connection closed."""
    transaction_id = new_transaction_id()
    status, payload = dialect.error_body(exc, transaction_id, dev=False)
    body = orjson.dumps(payload)
    headers = [*json_headers(body, transaction_id), *extra, (b"connection", b"close")]
    return status, headers, body


class _CapLog:
    """Connections refused for the cap, logged at most once per ``CAP_LOG_INTERVAL``."""

    refused = 0
    logged_at: float | None = None

    @classmethod
    def note(cls, now: float, cap: int) -> None:
        cls.refused += 1
        if cls.logged_at is None or now - cls.logged_at >= CAP_LOG_INTERVAL:
            logger.warning(
                "connection cap reached (MAX_CONNECTIONS=%d): %d request(s) answered 503",
                cap,
                cls.refused,
            )
            cls.logged_at, cls.refused = now, 0


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI answer to a request on a connection beyond ``MAX_CONNECTIONS``."""
    cap = _settings().max_connections
    exc = OverCapacity(
        f"the proxy holds its maximum of {cap} connections (MAX_CONNECTIONS); "
        f"retry in {RETRY_AFTER_SECONDS} s"
    )
    retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
    status, headers, body = error_response(_dialect(scope.get("raw_path") or b"/"), exc, retry)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ProxyProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` with a head timeout, a head size bound and a cap on
    the worker's connections (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = _settings()
        self.header_timeout = settings.client_header_timeout
        self.send_timeout = settings.client_send_timeout
        self.max_connections = settings.max_connections
        self.head_timer: asyncio.TimerHandle | None = None
        self.in_head = False  # part of a request head came, not all of it
        self.head_bytes = 0  # bytes read while a head was incomplete
        self.send_timer: asyncio.TimerHandle | None = None
        self.unsent = 0  # the write buffer's size when the send timer was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # its first request must come in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timeout and self.send_timer is None:
            self._arm_send_timer()

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _arm_send_timer(self) -> None:
        self.unsent = self.transport.get_write_buffer_size()
        self.send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def _cancel_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_timed_out(self) -> None:
        self.send_timer = None
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() < self.unsent:
            self._arm_send_timer()  # the client reads, slowly: it has another period
            return
        reason = (
            f"the client stopped reading: nothing of the answer could be sent for "
            f"{self.send_timeout:g} s (CLIENT_SEND_TIMEOUT)"
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CLIENT_STALLED] = reason  # type: ignore[literal-required]
            request = f" ({cycle.scope['method']} {cycle.scope['path']})"
        else:
            request = ""
        logger.warning("%s%s: %s; connection aborted", self._peer(), request, reason)
        self.transport.abort()  # what is buffered is dropped: nobody reads it

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.in_head and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                reason = f"the request head is larger than {MAX_HEAD_BYTES} bytes"
                self._refuse_head(HeadTooLarge(reason), "MAX_HEAD_BYTES")
            elif self.head_timer is None:
                self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        if self.head_timer is not None:
            self._cancel_head_timer()
        if len(self.connections) > self.max_connections:
            _CapLog.note(self.loop.time(), self.max_connections)
            self.app = _over_capacity  # this connection's requests only: it is closed after
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.in_head:
            reason = f"the request head did not arrive within {self.header_timeout:g} s"
            self._refuse_head(RequestTimeout(reason), "CLIENT_HEADER_TIMEOUT")
        else:
            logger.info(
                "%s: no request within %g s (CLIENT_HEADER_TIMEOUT); connection closed",
                self._peer(),
                self.header_timeout,
            )
            self.transport.close()

    def _refuse_head(self, exc: LuthienError, setting: str) -> None:
        """Answer a head that came too slowly or too large, and close the connection."""
        status = exc.status_code
        logger.info(
            "%s: %s (%s): %d, connection closed", self._peer(), exc.message, setting, status
        )
        # The target may be cut short: a prefix of a route has the error shape of the
        # route (``/v1/messa`` aside, which has OpenAI's).
        dialect = _dialect(self.url) if self.in_head else RAW
        _, headers, body = error_response(dialect, exc)
        content = [STATUS_LINE[status]]
        content.extend(b"%s: %s\r\n" % header for header in headers)
        content.append(b"\r\n")
        content.append(body)
        self._cancel_head_timer()
        self.in_head = False
        self.transport.write(b"".join(content))
        self.transport.close()

    def _peer(self) -> str:
        return f"client {self.client[0]}:{self.client[1]}" if self.client else "a client"


__all__ = ["CLIENT_STALLED", "MAX_HEAD_BYTES", "ProxyProtocol"]
