"""A backend written on raw sockets, for the faults no HTTP library will send.

``RawBackend`` listens on loopback in a thread of its own (its own event loop) and reads
HTTP/1.1 requests, keep-alive, by hand. The ``x-fault`` header of each request picks the
answer (``FAULTS``): a status line that is not one, a header without a colon, a chunk
size that is not hex, a body shorter than its ``Content-Length``, a stream cut between
two events, a head of a megabyte, or a good answer after which the connection is closed
(a keep-alive connection the backend drops while it is idle in the proxy's pool). It
counts the ``x-mock-request-id`` marker of every request it reads whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson

from tests.red_team_backend import chat_body, chat_events

FAULT_HEADER = "x-fault"
MARKER = "x-mock-request-id"
HEAD_LIMIT = 64 * 1024  # a request head larger than this is not read


@dataclass(frozen=True)
class Answer:
    """Bytes to write; then the connection is closed when ``close``."""

    data: bytes
    close: bool = True


def _chunked(pieces: list[bytes], *, end: bool = True) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return body + (b"0\r\n\r\n" if end else b"")


def _good(stream: bool) -> bytes:
    if stream:
        events = chat_events({"content": "raw "}, {"content": "backend"})
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + _chunked(events)
        )
    body = orjson.dumps(chat_body({"role": "assistant", "content": "raw backend"}))
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def _stream_cut(stream: bool) -> bytes:
    events = chat_events({"content": "cut "}, {"content": "here"})[:2]
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + _chunked(events, end=False)
    )


def _short_body(stream: bool) -> bytes:
    kind = b"text/event-stream" if stream else b"application/json"
    return b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b'\r\ncontent-length: 1000\r\n\r\n{"id"'


def _bad_chunk(stream: bool) -> bytes:
    kind = b"text/event-stream" if stream else b"application/json"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n"
    )


def _huge_head(stream: bool) -> bytes:
    pad = b"x-pad: " + b"p" * 1000 + b"\r\n"
    return b"HTTP/1.1 200 OK\r\n" + pad * 1024 + _good(stream).split(b"\r\n", 1)[1]


FAULTS: dict[str, Callable[[bool], Answer]] = {
    "ok": lambda stream: Answer(_good(stream), close=False),
    # A good answer, then the idle keep-alive connection is closed by the backend.
    "keepalive-close": lambda stream: Answer(_good(stream), close=True),
    "not-http": lambda stream: Answer(b"SSH-2.0-OpenSSH_9.6\r\n"),
    "bad-status-line": lambda stream: Answer(b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\n{}"),
    "header-without-colon": lambda stream: Answer(
        b"HTTP/1.1 200 OK\r\ncontent-type application/json\r\ncontent-length: 2\r\n\r\n{}"
    ),
    "bad-chunk-size": lambda stream: Answer(_bad_chunk(stream)),
    "short-body": lambda stream: Answer(_short_body(stream)),
    "stream-cut": lambda stream: Answer(_stream_cut(stream)),
    "nothing": lambda stream: Answer(b""),
    "huge-head": lambda stream: Answer(_huge_head(stream)),
}
GATE = "gate"  # a stream held after its first event until the gate opens (``Gate``)
HELD_COMMENT_EVERY = 0.5  # seconds between the comments a held stream gets


class Gate:
    """Holds streams after their first event until ``size`` of them are open at once
    (or ``bound`` seconds have passed: then ``opened_full`` stays false)."""

    def __init__(self, size: int, bound: float) -> None:
        self.size = size
        self.bound = bound
        self.waiting = 0
        self.peak = 0
        self.opened_full = False
        self._open: asyncio.Event | None = None

    async def hold(self) -> None:
        if self._open is None:
            self._open = asyncio.Event()
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        if self.waiting >= self.size:
            self.opened_full = True
            self._open.set()
        try:
            await asyncio.wait_for(self._open.wait(), self.bound)
        except TimeoutError:
            self._open.set()
        finally:
            self.waiting -= 1


class RawBackend:
    """The server; ``received`` counts the markers of the requests read whole."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.gate: Gate | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def set_gate(self, gate: Gate) -> None:
        """Streams asked for with ``x-fault: gate`` are held by ``gate`` (set it before
        they come; this loop's thread is the only one that touches it afterwards)."""
        self.gate = gate

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        for task in self._handlers:  # keep-alive connections still open
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower().decode("latin-1")] = value.strip().decode(
                        "latin-1"
                    )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.received[headers.get(MARKER, "")] += 1
                stream = b'"stream":true' in body.replace(b" ", b"")
                if headers.get(FAULT_HEADER) == GATE:
                    await self._gated(writer)
                    continue
                answer = FAULTS[headers.get(FAULT_HEADER, "ok")](stream)
                writer.write(answer.data)
                await writer.drain()
                if answer.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _gated(self, writer: asyncio.StreamWriter) -> None:
        events = chat_events({"content": "held "}, {"content": "then "}, {"content": "released"})
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + _chunked(events[:1], end=False)
        )
        await writer.drain()
        assert self.gate is not None, "no gate set"
        held = asyncio.ensure_future(self.gate.hold())
        while not held.done():
            # A comment now and then, so that a stream held long is not a stalled one.
            await asyncio.wait({held}, timeout=HELD_COMMENT_EVERY)
            if not held.done():
                writer.write(_chunked([b": held\n\n"], end=False))
                await writer.drain()
        writer.write(_chunked(events[1:]))
        await writer.drain()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the raw backend did not start")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@contextlib.contextmanager
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    backend.start()
    try:
        yield backend
    finally:
        backend.stop()
