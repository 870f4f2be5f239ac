"""The proxy as a pure ASGI application.

Request in: the edge reads the body once, makes a ``Transaction`` and runs the policy
tree; the answer goes out through ``relay``. The whole transaction races a disconnect
listener, so a client that goes away cancels the backend request at once. Errors become
responses in one place (``responses``). No middleware, and ``receive`` is never replaced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import string
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import orjson
from sqlalchemy import text

from luthien_control import metrics
from luthien_control.admin import PREFIX as ADMIN_PREFIX
from luthien_control.admin import handle_admin
from luthien_control.app import Services
from luthien_control.decoding import decode_request
from luthien_control.dialects import dialect_for
from luthien_control.exceptions import (
    LuthienError,
    MalformedRequest,
    NotFound,
    PolicyBlocked,
    RequestTimeout,
    RequestTooLarge,
)
from luthien_control.protocol import CLIENT_STALLED
from luthien_control.relay import (
    CUT_BY_SHUTDOWN,
    note_usage,
    outcome_for,
    relay_stream,
    send_buffered,
    shutdown_error,
)
from luthien_control.responses import (
    STREAM_HEADERS,
    TRANSACTION_HEADER,
    json_headers,
    send_error,
    send_json,
)
from luthien_control.settings import DEFAULT_CLIENT_BODY_TIMEOUT, Settings
from luthien_control.transaction import ProxyRequest, Transaction, new_transaction_id
from luthien_control.upstream.client import DOT_SEGMENT_REFUSED, has_dot_segment

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API_PREFIXES = ("/v1", "/api/v1")
GC_THRESHOLD = 50_000  # allocations between two collections of the youngest generation
# At shutdown, after the grace period: how long the transactions cut then have to send
# their last bytes and queue their records before the recorder's last flush.
SETTLE_SECONDS = 5.0


def api_path(path: str) -> str | None:
    """``/v1/chat/completions`` and ``/api/v1/chat/completions`` → ``/chat/completions``.

    The path stays as written: one with a dot segment (``has_dot_segment``) is refused by
    the caller before any policy sees it, never resolved here."""
    for prefix in API_PREFIXES:
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            return path[len(prefix) :] or "/"
    return None


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SLASHES = re.compile(r"//+")


def _unescape_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def canonical_path(path: str) -> str:
    """The path as a backend's router reads it, written one way: percent escapes of
    unreserved characters decoded (``/chat/%63ompletions``), runs of slashes collapsed,
    no trailing slash. The dialect is chosen from it and the backend gets it, so that a
    path the backend serves as ``/messages`` is never read as another route here."""
    if "%" not in path and "//" not in path and not path.endswith("/"):
        return path
    path = _SLASHES.sub("/", _ESCAPE.sub(_unescape_unreserved, path))
    return path.rstrip("/") or "/"


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


_EXPIRED = -1.0  # in ``BodyDeadlines.waiting``: past the deadline, its task cancelled


class BodyDeadlines:
    """The requests still receiving their body, with the loop time each began.

    A sweep every ``period`` seconds (a quarter of the timeout, at most 1 s) cancels
    those that have waited longer than ``timeout`` (``CLIENT_BODY_TIMEOUT``), and
    ``read_body`` turns that cancellation into a 408. A request costs a dict entry, not a
    timer: a timer armed and cancelled per request cost some 4 µs on uvloop, a timeout
    scope (``asyncio.timeout``) twice that.
    """

    def __init__(self, timeout: float = DEFAULT_CLIENT_BODY_TIMEOUT) -> None:
        self.timeout = timeout
        self.period = min(1.0, timeout / 4)
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="luthien-body-deadlines")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period)
            if self.waiting:
                self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        """Cancel the body reads that began before ``now - timeout``."""
        began_by = now - self.timeout
        waiting = self.waiting
        late = [task for task, began in waiting.items() if 0 <= began <= began_by]
        for task in late:
            waiting[task] = _EXPIRED
            task.cancel()


async def read_body(receive: Receive, limit: int, deadlines: BodyDeadlines | None = None) -> bytes:
    """Read the whole request body (the only place the proxy calls ``receive`` for it),
    within ``deadlines.timeout`` seconds (else ``RequestTimeout``)."""
    if deadlines is None:
        return await _read_body(receive, limit)
    task = asyncio.current_task()
    assert task is not None
    waiting = deadlines.waiting
    waiting[task] = asyncio.get_running_loop().time()
    try:
        return await _read_body(receive, limit)
    except asyncio.CancelledError:
        if waiting[task] != _EXPIRED:
            raise  # not ours: the server is shutting down
        task.uncancel()
        raise RequestTimeout(
            f"the request body did not arrive within {deadlines.timeout:g} s"
        ) from None
    finally:
        del waiting[task]


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise RequestTooLarge(f"the request body is larger than {limit} bytes")
            parts.append(body)
        if not message.get("more_body", False):
            return b"".join(parts)


class LuthienProxy:
    """The ASGI app: ``/v1/*`` (and ``/api/v1/*``) through the policies; health and metrics."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.services: Services | None = None
        self._console: Any = None  # the operator console (console/), made on first use
        self.body_deadlines = BodyDeadlines(self.settings.client_body_timeout)
        self.in_flight = 0  # transactions between their start and their record
        self._settled: asyncio.Event | None = None  # set when ``in_flight`` drops to 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            relative = api_path(path)
            if relative is not None:
                raw = scope.get("raw_path")
                if raw:  # as the client wrote it: what the policies see, the backend gets
                    relative = api_path(raw.decode("latin-1")) or relative
                if has_dot_segment(relative):  # joined to the backend URL, it could climb out
                    refused = MalformedRequest(DOT_SEGMENT_REFUSED)
                    shape = dialect_for(canonical_path(relative))
                    transaction_id = new_transaction_id()
                    status, payload = shape.error_body(refused, transaction_id, dev=False)
                    await send_json(send, status, payload, transaction_id)
                    return
                await self.proxy(scope, receive, send, canonical_path(relative))
            elif path == "/health":
                await send_json(send, 200, {"status": "ok"}, new_transaction_id())
            elif path == "/ready":
                await self.ready(send)
            elif path == "/metrics":
                await metrics.send_metrics(send, new_transaction_id())
            elif path.startswith(ADMIN_PREFIX) and self.services is not None:
                await handle_admin(self.services, scope, receive, send)
            elif (path == "/admin" or path.startswith("/admin/")) and self.services is not None:
                if self._console is None:
                    from luthien_control.console import Console

                    self._console = Console(self.services)
                await self._console(scope, receive, send)
            else:
                await send_error(
                    send, NotFound(f"no route {path}"), new_transaction_id(), dev=False
                )
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.services = Services.create(self.settings)
                    await self.services.start()
                except LuthienError as exc:
                    logger.error("cannot start: %s", exc.message)
                    await send({"type": "lifespan.startup.failed", "message": exc.message})
                    return
                # Everything loaded so far (modules, pydantic and SQLAlchemy machinery)
                # lives as long as the process: out of the collector's sight, a full
                # collection no longer walks it, which cut the non-streamed latency
                # p99 from ~85 ms to ~29 ms under load (docs/performance.md).
                gc.collect()
                gc.freeze()
                # A transaction leaves no reference cycle behind (the relay breaks the one
                # a stream transform makes), so nearly everything is freed as soon as it
                # is dropped; a collection only walks what is still alive. At the default
                # threshold (700) it walked the requests in flight hundreds of times a
                # second: ~12 % of the CPU per non-streamed request (docs/performance.md).
                gc.set_threshold(GC_THRESHOLD, 10, 10)
                self.body_deadlines.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.body_deadlines.stop()
                await self._settle()
                if self.services is not None:
                    await self.services.stop()
                metrics.worker_stopped()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _settle(self) -> None:
        """Wait (at most ``SETTLE_SECONDS``) for the transactions still running: those the
        server cut at the end of the shutdown grace period send their last bytes and queue
        their records as they unwind, before the recorder's last flush."""
        if not self.in_flight:
            return
        self._settled = asyncio.Event()
        with anyio.move_on_after(SETTLE_SECONDS):
            await self._settled.wait()
        if self.in_flight:
            logger.error("%d transaction(s) still running at exit: not recorded", self.in_flight)

    async def ready(self, send: Send) -> None:
        services = self.services
        problems = []
        if services is None or services.policy is None or services.policy.current is None:
            problems.append("no policy loaded")
        if services is not None:
            try:
                with anyio.fail_after(2):
                    async with services.engine.connect() as connection:
                        await connection.execute(text("SELECT 1"))
            except Exception as exc:  # any failure to reach it means "not ready"
                problems.append(f"database unreachable: {type(exc).__name__}")
        status = 503 if problems else 200
        body = {"status": "not ready" if problems else "ready", "problems": problems}
        await send_json(send, status, body, new_transaction_id())

    async def proxy(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        services = self.services
        assert services is not None, "the lifespan startup has not run"
        dev = services.settings.dev
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            text_value = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text_value}" if key in headers else text_value
        recorder = services.recorder
        if recorder is not None and not recorder.paced.is_set():
            await recorder.pace()  # the audit trail's writer is behind: take its pace
        request = ProxyRequest(scope["method"], path, scope.get("query_string", b""), headers, b"")
        tx = Transaction(request=request, services=services)
        metrics.ACTIVE.inc()
        self.in_flight += 1
        try:
            await self._run(tx, receive, send, dev=dev)
        finally:
            # Synchronous bookkeeping first: it must happen even when the task is being
            # cancelled.
            tx.timings.end = time.perf_counter()
            if tx.outcome == "pending":
                tx.outcome = "client_disconnected"
            stalled = scope.get(CLIENT_STALLED)
            if stalled is not None and tx.outcome == "client_disconnected" and tx.error is None:
                tx.error = RequestTimeout(stalled)  # aborted by the protocol (protocol.py)
            metrics.ACTIVE.dec()
            metrics.observe(tx)
            if services.recorder is not None:
                services.recorder.record(tx)
            if tx.outcome == CUT_BY_SHUTDOWN:
                logger.warning(
                    "transaction %s (%s %s) cut by the shutdown: %s",
                    tx.id,
                    request.method,
                    path,
                    f"its stream ended with an error event after {tx.chunks_sent} event(s)"
                    if tx.chunks_sent
                    else f"answered {tx.status}",
                )
            try:
                await tx.resources.aclose()
            finally:
                self.in_flight -= 1
                if not self.in_flight and self._settled is not None:
                    self._settled.set()

    async def _run(self, tx: Transaction, receive: Receive, send: Send, *, dev: bool) -> None:
        """Read the body, run the policies and answer, racing the client's disconnect."""
        services = tx.services
        request = tx.request
        failure: Exception | None = None
        try:
            body = await read_body(
                receive, services.settings.max_request_bytes, self.body_deadlines
            )
            request.set_body(body)
            tx.trail.request_body = body
            # The handler races a disconnect listener: the listener cancels the handler's
            # task (an anyio task group does the same at several times the cost).
            handler = asyncio.current_task()
            assert handler is not None
            disconnected = False

            async def watch_disconnect() -> None:
                nonlocal disconnected
                # The body has been read: the next message is the disconnect, which also
                # arrives once the response is complete (then it is no news).
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not tx.response_complete:
                    disconnected = True
                    tx.outcome = "client_disconnected"
                    handler.cancel()

            watcher = asyncio.get_running_loop().create_task(watch_disconnect())
            try:
                await self.handle(tx, send, dev=dev)
            except asyncio.CancelledError:
                handler.uncancel()
                if not disconnected:  # by the server: its shutdown grace period is over
                    failure = shutdown_error()
            except Exception as exc:
                failure = exc
            finally:
                tx.response_complete = True
                watcher.cancel()
        except ClientDisconnected:
            tx.outcome = "client_disconnected"
        except asyncio.CancelledError:  # the shutdown, while the body was still coming
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()
            failure = shutdown_error()
        except Exception as exc:
            failure = exc
        if failure is not None:
            tx.error = failure
            if tx.outcome in ("pending", "ok"):
                tx.outcome = outcome_for(failure)
            if tx.status is None and not await _blocked_answer(tx, failure, send):
                status, payload = tx.dialect.error_body(failure, tx.id, dev=dev)
                tx.status = status
                body = orjson.dumps(payload, default=str)
                headers = json_headers(body, tx.id)
                if isinstance(failure, RequestTimeout):  # the rest of the body is not read
                    headers.append((b"connection", b"close"))
                tx.trail.client_body = body
                tx.trail.client_headers = headers
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})

    async def handle(self, tx: Transaction, send: Send, *, dev: bool) -> None:
        request = tx.request
        if tx.services.policy.current.tree_reads_content:
            tx.reads_content = True
            decode_request(tx)  # strictly, or 400 / 413 (decoding.py)
        elif (
            request.body
            and "content-encoding" not in request.headers  # relayed as it came
            and request.headers.get("content-type", "application/json").startswith(
                "application/json"
            )
            and request.payload is None
        ):
            raise MalformedRequest("the request body is not valid JSON")
        if request.method == "POST":
            tx.dialect.validate_request(request.payload)
        services = tx.services
        policy = services.policy.current
        tx.policy_name = policy.name
        await policy.apply(tx)
        response = tx.response
        if response is None:
            raise LuthienError(
                f"policy '{policy.name}' produced no response (does it include SendBackendRequest?)"
            )
        if response.stream is not None:
            await relay_stream(tx, send, dev=dev)
        else:
            await send_buffered(tx, send)
            note_usage(tx, response.payload if response.status < 400 else None)
        if tx.outcome == "pending":
            tx.outcome = "ok" if response.status < 400 else "backend_error_status"


async def _blocked_answer(tx: Transaction, failure: Exception, send: Send) -> bool:
    """A block with ``block_with: message``, before anything was sent: the client gets
    a complete, normal answer in its dialect (streamed if it asked for a stream) that
    says what was blocked and why. False when that does not apply."""
    if not (isinstance(failure, PolicyBlocked) and failure.as_message):
        return False
    stream = tx.request.wants_stream
    make = tx.dialect.blocked_stream if stream else tx.dialect.blocked_answer
    body = make(failure.message, tx)
    if body is None:
        return False
    if stream:
        headers = [*STREAM_HEADERS, (TRANSACTION_HEADER, tx.id.encode())]
    else:
        headers = json_headers(body, tx.id)
    tx.status = 200
    tx.trail.client_body = body
    tx.trail.client_headers = headers
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return True


def create_app(settings: Settings | None = None) -> LuthienProxy:
    """The ASGI application (``uvicorn --factory luthien_control.server:create_app``)."""
    return LuthienProxy(settings)


__all__ = ["LuthienProxy", "create_app"]
