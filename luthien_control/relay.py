"""Out to the client: the streaming relay and the buffered response.

The relay reads the backend's bytes as they arrive, cuts them into events, lets the
proxy's own usage bookkeeping and then every policy transform see each event, and sends
whatever comes out at once, one ``send`` per network read. It sends no headers until the
first event is ready, so a failure before that is still a real HTTP error; after that a
failure ends the stream with an error event and no ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from luthien_control import metrics
from luthien_control.decoding import check_stream_start, strict_event_data
from luthien_control.dialects import StreamAssembler
from luthien_control.exceptions import BackendBroken, BackendError, ClientError, PolicyBlocked
from luthien_control.responses import HOP_BY_HOP, STREAM_HEADERS, TRANSACTION_HEADER
from luthien_control.sse import DONE_EVENT, Chunk, SSEDecoder
from luthien_control.transaction import StreamTransform, Transaction

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Response headers that describe one hop or that the proxy sets itself.
_NOT_FORWARDED = HOP_BY_HOP | {"date", "server", "x-luthien-transaction-id"}
_STREAM_OWN = frozenset(name.decode() for name, _ in STREAM_HEADERS) | {"content-encoding"}
_INJECTED_USAGE = b',"usage":null'


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


class _UsageBook:
    """Takes the backend's usage figures, and hides what the client did not ask for.

    The proxy asks every chat stream for ``include_usage`` (``Dialect.injects_usage``);
    when the client did not, the
    usage-only chunk is dropped and the ``"usage": null`` the backend then adds to every
    chunk is removed again, so the client sees exactly the stream it asked for.
    """

    __slots__ = ("hide", "tx")

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.hide = tx.usage_injected

    def see(self, chunk: Chunk, raw: bytes) -> Chunk | None:
        """``raw``: the chunk's bytes, which the caller found to hold ``"usage"``."""
        if self.hide:
            stripped = raw.replace(_INJECTED_USAGE, b"")
            if len(stripped) != len(raw):
                data = chunk.data  # parsed from the bytes as they came
                if type(data) is dict and data.get("usage", 0) is None:
                    del data["usage"]
                chunk.replace_raw(stripped)  # the same event, as the client asked for it
                if b'"usage"' not in stripped:
                    return chunk
        data = chunk.data
        if not isinstance(data, dict) or "usage" not in data:
            return chunk
        usage = data["usage"]
        note_usage(self.tx, data)
        if self.hide:
            if isinstance(usage, dict) and not data.get("choices"):
                return None
            del data["usage"]
            chunk.mark_changed()
        return chunk


async def relay_stream(tx: Transaction, send: Send, *, dev: bool) -> None:
    """Relay a streamed response to the client, chunk by chunk, as it arrives."""
    response = tx.response
    assert response is not None and response.stream is not None
    stream = response.stream
    transforms = stream.transforms
    dialect = tx.dialect
    usage = _UsageBook(tx) if dialect.injects_usage else None
    decoder = SSEDecoder()
    # The stream as received, and as sent. They are one assembler for as long as every
    # event goes out as it came in (the usual case: one fold per chunk, not two); the
    # first network read with an event a policy changed, dropped or added splits them.
    # Each read's events are folded in once its fate is known: sent, failed on, or cut
    # off by a disconnect.
    received = tx.trail.stream_received = tx.trail.stream_sent = dialect.new_assembler()
    sent: StreamAssembler | None = None  # None: still the same as ``received``
    started = False

    async def emit(chunks: list[Chunk], *, last: bytes | None = None) -> None:
        nonlocal started
        body = b"".join([chunk.raw for chunk in chunks])
        if last is not None:
            body += last
        if not body and last is None:
            return
        if not started:
            headers = tx.trail.client_headers = response_headers(
                response.headers, tx.id, stream=True
            )
            tx.status = response.status
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            started = True
            tx.timings.client_first_byte = time.perf_counter()
        tx.chunks_sent += len(chunks)
        if last is not None:
            tx.response_complete = True
        await send({"type": "http.response.body", "body": body, "more_body": last is None})

    def fold(arrived: list[Any], out: list[Chunk], *, same: bool) -> None:
        """Fold one read into the record: ``arrived``, its events as they came; ``out``,
        what goes to the client; ``same``: ``out`` is exactly ``arrived``."""
        nonlocal sent
        if sent is None and not same:
            sent = tx.trail.stream_sent = received.copy()
        for payload in arrived:
            received.feed(payload)
        if sent is not None:
            for chunk in out:
                sent.feed(chunk.data)

    done = False
    # A policy reads the content: every event must be strict JSON, as the client reads
    # it (decoding.py); else the events go out unread and are parsed leniently.
    strict = tx.reads_content
    rules = dialect.stream_rules() if strict else None
    metrics.ACTIVE_STREAMS.inc()
    try:
        async for data in stream.source:
            if tx.timings.backend_ready is None:
                tx.timings.backend_ready = time.perf_counter()
                if strict:
                    check_stream_start(data)
            ready: list[Chunk] = []
            arrived: list[Any] = []
            same = True  # every event of this read so far went out as it came in
            unfed: bytes | None = None  # the event in the policies' hands
            try:
                for event in decoder.feed(data):
                    raw = unfed = event.raw
                    if b"[DONE]" in raw and event.is_done:
                        unfed = None
                        done = True
                        break
                    if strict:
                        payload = strict_event_data(event.payload)
                        event.set_parsed(payload)
                        if rules is not None:
                            rules.check(payload)
                    else:
                        payload = event.data
                    seen = (
                        usage.see(event, raw) if usage is not None and b'"usage"' in raw else event
                    )
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
                    ready.extend(chunks)
            except BaseException as exc:
                if unfed is not None:  # a policy failed on it: received, never sent
                    arrived.append(_parsed(unfed))
                if not isinstance(exc, Exception):  # cancelled (a disconnect): none sent
                    fold(arrived, [], same=not arrived)
                    raise
                fold(arrived, ready, same=False)
                await emit(ready)  # what passed every policy before the failure goes out
                raise
            fold(arrived, ready, same=same)
            await emit(ready)
            if done:
                break
        if not dialect.stream_complete(received, done=done, pending=decoder.pending):
            raise BackendBroken("the backend's stream ended before it was complete")
        tail: list[Chunk] = []
        for transform in transforms:
            tail = await _through(transform, tail)
            tail.extend(await transform.on_end())
        fold([], tail, same=not tail)
        await emit(tail, last=DONE_EVENT if done else b"")
    except Exception as exc:
        if not started:
            raise
        tx.outcome = outcome_for(exc)
        tx.error = exc
        tx.response_complete = True
        # Built from the stream as the client got it: what the backend sent may hold
        # what a policy redacted or refused.
        last = None
        if isinstance(exc, PolicyBlocked) and exc.as_message:  # block_with: message
            last = dialect.blocked_ending(exc.message, tx, sent or received)
        if last is None:
            last = dialect.error_event(exc, tx, sent or received, dev=dev)
        await send({"type": "http.response.body", "body": last, "more_body": False})
    finally:
        metrics.ACTIVE_STREAMS.dec()
        if tx.usage is None and received.usage is not None:  # a stream cut short too
            tx.usage = dialect.usage(received.usage)
        # A transform that keeps the transaction (to record what it did) makes a cycle
        # through it; broken here, the transaction is freed without the collector.
        transforms.clear()


def _parsed(raw: bytes) -> Any:
    """An event's JSON as its bytes spell it (a policy may have changed the parsed one)."""
    return Chunk(raw).data


def outcome_for(exc: BaseException) -> str:
    """The recorded outcome of a transaction that ended with ``exc``."""
    if isinstance(exc, PolicyBlocked):
        return "blocked"
    if isinstance(exc, BackendError):
        return "backend_error"
    if isinstance(exc, ClientError):
        return "rejected"
    return "proxy_error"
