"""Out to the client: the streaming relay and the buffered response.

The relay reads the backend's bytes as they arrive, cuts them into events, lets the
dialect's usage book (``Dialect.usage_book``) and then every policy transform see each
event, and sends
whatever comes out at once, one ``send`` per network read. It sends no headers until the
first event is ready, so a failure before that is still a real HTTP error; after that a
failure ends the stream with an error event and no ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from luthien_control import metrics
from luthien_control.decoding import check_stream_start, strict_event_data
from luthien_control.dialects import StreamAssembler
from luthien_control.exceptions import (
    BackendBroken,
    BackendError,
    ClientError,
    PolicyBlocked,
    ShuttingDown,
)
from luthien_control.responses import HOP_BY_HOP, STREAM_HEADERS, TRANSACTION_HEADER
from luthien_control.sse import DONE_EVENT, Chunk, SSEDecoder
from luthien_control.transaction import UNREAD, StreamTransform, Transaction

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Response headers that describe one hop or that the proxy sets itself.
_NOT_FORWARDED = HOP_BY_HOP | {"date", "server", "x-luthien-transaction-id"}
_STREAM_OWN = frozenset(name.decode() for name, _ in STREAM_HEADERS) | {"content-encoding"}
# The recorded outcome of a transaction the shutdown cut (its grace period over).
CUT_BY_SHUTDOWN = "cut_by_shutdown"
# How long a stream cut by the shutdown waits for its client to take the error event.
CUT_SEND_TIMEOUT = 1.0
# The events of a stream kept for its record (a replay needs them); beyond, the record
# says the stream was longer (``events_cut``) and holds its assembled answer only.
RECORDED_EVENTS = 10_000


def response_headers(
    headers: dict[str, str], transaction_id: str, *, stream: bool
) -> list[tuple[bytes, bytes]]:
    skip = _NOT_FORWARDED | _STREAM_OWN if stream else _NOT_FORWARDED
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if k not in skip]
    if stream:
        out.extend(STREAM_HEADERS)
    out.append((TRANSACTION_HEADER, transaction_id.encode()))
    return out


async def send_buffered(tx: Transaction, send: Send) -> None:
    """Send a buffered response: the backend's (as changed by policies) or a policy's own."""
    response = tx.response
    assert response is not None
    body = tx.trail.client_body = response.body
    headers = response_headers(response.headers, tx.id, stream=False)
    headers.append((b"content-length", str(len(body)).encode()))
    tx.trail.client_headers = headers
    tx.timings.client_first_byte = time.perf_counter()
    tx.status = response.status
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    tx.response_complete = True
    await send({"type": "http.response.body", "body": body, "more_body": False})


def note_usage(tx: Transaction, payload: Any) -> None:
    """Take the token usage from a response body or a stream's usage chunk, if it has one."""
    usage = tx.dialect.answer_usage(payload)
    if usage is not None:
        tx.usage = tx.dialect.usage(usage)


async def _through(transform: StreamTransform, chunks: list[Chunk]) -> list[Chunk]:
    if not chunks:
        return chunks
    out: list[Chunk] = []
    for chunk in chunks:
        out.extend(await transform.on_chunk(chunk))
    return out


async def relay_stream(tx: Transaction, send: Send, *, dev: bool) -> None:
    """Relay a streamed response to the client, chunk by chunk, as it arrives."""
    relay = _StreamRelay(tx, send)
    metrics.ACTIVE_STREAMS.inc()
    try:
        async for data in relay.source:
            if await relay.read(data):
                break
        await relay.finish()
    except asyncio.CancelledError:
        # By the client's disconnect (server.py notes it first), or by the server once
        # its shutdown grace period is over: then the client gets the error event.
        if not relay.started or tx.outcome == "client_disconnected":
            raise
        await relay.cut_by_shutdown(dev=dev)
    except Exception as exc:
        if not relay.started:
            raise  # nothing sent yet: a real HTTP error (responses.py)
        await relay.fail(exc, dev=dev)
    finally:
        metrics.ACTIVE_STREAMS.dec()
        relay.close()


class _StreamRelay:
    """One streamed response on its way: decoded event by event (strictly, and in its
    dialect's order, while a policy reads content), shown to the dialect's usage book
    and then to every transform, sent one ``send`` per network read, and folded into the
    record as received and as sent."""

    def __init__(self, tx: Transaction, send: Send) -> None:
        response = tx.response
        assert response is not None and response.stream is not None
        self.tx, self.send, self.response = tx, send, response
        self.source = response.stream.source
        self.transforms = response.stream.transforms
        self.dialect = dialect = tx.dialect
        self.usage = dialect.usage_book(tx)
        self.decoder = SSEDecoder()
        # A policy reads the content: every event must be strict JSON, as the client
        # reads it (decoding.py), in its dialect's order; else events go out unread.
        self.strict = tx.reads_content
        self.rules = dialect.stream_rules() if self.strict else None
        # The stream as received, and as sent. They are one assembler for as long as
        # every event goes out as it came in (the usual case: one fold per event, not
        # two); the first network read with an event a policy changed, dropped or added
        # splits them. Each read's events are folded in once their fate is known: sent,
        # failed on, or cut off by a disconnect.
        received = dialect.new_assembler()
        self.received = tx.trail.stream_received = tx.trail.stream_sent = received
        self.events: list[bytes] = []
        tx.trail.events_received = self.events
        # Each recorded event's JSON as read here, for its record (no second parse);
        # ``UNREAD`` where a policy or the usage book may have changed the parsed copy.
        self.parsed: list[Any] = []
        tx.trail.events_parsed = self.parsed
        self.sent: StreamAssembler | None = None  # None: still the same as ``received``
        self.started = False
        self.done = False  # the backend sent [DONE]

    async def read(self, data: bytes, *, last: bool = False) -> bool:
        """One network read: its events through the policies and out. True at [DONE].
        ``last``: the stream has ended, the decoder gives what it still held."""
        tx = self.tx
        if tx.timings.backend_ready is None:
            tx.timings.backend_ready = time.perf_counter()
            tx.trail.events_named = data.startswith(b"event:")
            if self.strict:
                check_stream_start(data)
        usage, transforms, strict, rules = self.usage, self.transforms, self.strict, self.rules
        ready: list[Chunk] = []
        arrived: list[Any] = []
        same = True  # every event of this read so far went out as it came in
        unfed: bytes | None = None  # the event in the policies' hands
        events, parsed = self.events, self.parsed
        try:
            for event in self.decoder.close() if last else self.decoder.feed(data):
                raw = unfed = event.raw
                if b"[DONE]" in raw and event.is_done:
                    unfed = None
                    self.done = tx.trail.events_done = True
                    break
                kept = len(events) < RECORDED_EVENTS
                if kept:  # its bytes, as they came: no copy
                    events.append(raw)
                else:
                    tx.trail.events_cut = True
                if strict:
                    payload = strict_event_data(event.payload)
                    event.set_parsed(payload)
                    if rules is not None:
                        rules.check(payload, event)
                else:
                    payload = event.data
                if kept:
                    parsed.append(payload)
                # "usage" in the bytes, or a \u escape that may spell it (as the client's
                # JSON reader would read it)
                if usage is not None and (b'"usage"' in raw or b"\\u" in raw):
                    seen = usage.see(event, raw)
                    if kept and event.changed:
                        parsed[-1] = UNREAD  # the book took its usage out of ``payload``
                else:
                    seen = event
                if seen is None:  # the usage the client did not ask for
                    unfed = None
                    arrived.append(payload)
                    same = False
                    continue
                seen_raw = seen.raw  # to tell a changed event once it is serialized
                chunks = [seen]
                for transform in transforms:
                    if len(chunks) == 1:
                        chunks = await transform.on_chunk(chunks[0])
                    else:
                        chunks = await _through(transform, chunks)
                unfed = None
                if (
                    len(chunks) == 1
                    and chunks[0] is event
                    and not event.changed
                    and event.raw is seen_raw
                ):
                    arrived.append(payload)  # went out as it came in
                else:
                    arrived.append(_parsed(raw))  # as it came, before any policy
                    same = False
                    if kept:
                        parsed[-1] = UNREAD  # a policy may have changed ``payload``
                ready.extend(chunks)
        except BaseException as exc:
            if unfed is not None:  # a policy failed on it: received, never sent
                arrived.append(_parsed(unfed))
                if len(parsed) == len(events):
                    parsed[-1] = UNREAD
            if not isinstance(exc, Exception):  # cancelled (a disconnect): none sent
                self.fold(arrived, [], same=not arrived)
                raise
            self.fold(arrived, ready, same=False)
            await self.emit(ready)  # what passed every policy before the failure goes out
            raise
        self.fold(arrived, ready, same=same)
        await self.emit(ready)
        return self.done

    async def finish(self) -> None:
        """The backend's stream ended: if complete, what the transforms held goes out."""
        if not self.done and self.decoder.pending:
            await self.read(b"", last=True)
        pending = self.decoder.pending
        if not self.dialect.stream_complete(self.received, done=self.done, pending=pending):
            raise BackendBroken("the backend's stream ended before it was complete")
        tail: list[Chunk] = []
        for transform in self.transforms:
            tail = await _through(transform, tail)
            tail.extend(await transform.on_end())
        self.fold([], tail, same=not tail)
        await self.emit(tail, last=DONE_EVENT if self.done else b"")

    async def fail(self, exc: Exception, *, dev: bool) -> None:
        """A failure after the stream began: the dialect's ending, built from the stream
        as the client got it (what the backend sent may hold what a policy refused)."""
        tx, dialect = self.tx, self.dialect
        tx.outcome = outcome_for(exc)
        tx.error = exc
        tx.response_complete = True
        sent = self.sent or self.received
        last = None
        if isinstance(exc, PolicyBlocked) and exc.as_message:  # block_with: message
            last = dialect.blocked_ending(exc.message, tx, sent)
        if last is None:
            last = dialect.error_event(exc, tx, sent, dev=dev)
        await self.send({"type": "http.response.body", "body": last, "more_body": False})

    async def cut_by_shutdown(self, *, dev: bool) -> None:
        """The server cancelled the stream at the end of its shutdown grace period: end it
        with the error event, so that the client's SDK raises instead of waiting on half
        an answer; a client that does not read it within ``CUT_SEND_TIMEOUT`` is left."""
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
        try:
            async with asyncio.timeout(CUT_SEND_TIMEOUT):
                await self.fail(shutdown_error(), dev=dev)
        except TimeoutError:
            pass

    def close(self) -> None:
        tx = self.tx
        if tx.usage is None and self.received.usage is not None:  # a stream cut short too
            tx.usage = self.dialect.usage(self.received.usage)
        # A transform that keeps the transaction (to record what it did) makes a cycle
        # through it; broken here, the transaction is freed without the collector.
        self.transforms.clear()

    async def emit(self, chunks: list[Chunk], *, last: bytes | None = None) -> None:
        """Send what one read let out: headers with the first bytes; ``last``: the end."""
        body = b"".join([chunk.raw for chunk in chunks])
        if last is not None:
            body += last
        if not body and last is None:
            return
        tx = self.tx
        if not self.started:
            response = self.response
            headers = tx.trail.client_headers = response_headers(
                response.headers, tx.id, stream=True
            )
            tx.status = response.status
            await self.send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            self.started = True
            tx.timings.client_first_byte = time.perf_counter()
        tx.chunks_sent += len(chunks)
        if last is not None:
            tx.response_complete = True
        await self.send({"type": "http.response.body", "body": body, "more_body": last is None})

    def fold(self, arrived: list[Any], out: list[Chunk], *, same: bool) -> None:
        """Fold one read into the record: ``arrived``, its events as they came; ``out``,
        what goes to the client; ``same``: ``out`` is exactly ``arrived``."""
        sent = self.sent
        if sent is None and not same:
            sent = self.sent = self.tx.trail.stream_sent = self.received.copy()
        received = self.received
        for payload in arrived:
            received.feed(payload)
        if sent is not None:
            for chunk in out:
                sent.feed(chunk.data)


def _parsed(raw: bytes) -> Any:
    """An event's JSON as its bytes spell it (a policy may have changed the parsed one)."""
    return Chunk(raw).data


def shutdown_error() -> ShuttingDown:
    """What a request still running at the end of the shutdown grace period is told."""
    return ShuttingDown("the proxy is shutting down and its grace period is over; retry")


def outcome_for(exc: BaseException) -> str:
    """The recorded outcome of a transaction that ended with ``exc``."""
    if isinstance(exc, PolicyBlocked):
        return "blocked"
    if isinstance(exc, ShuttingDown):
        return CUT_BY_SHUTDOWN
    if isinstance(exc, BackendError):
        return "backend_error"
    if isinstance(exc, ClientError):
        return "rejected"
    return "proxy_error"
