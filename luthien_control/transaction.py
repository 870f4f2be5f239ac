"""The transaction: one client request, what the policies did to it, and its answer.

A ``Transaction`` is what every policy receives. Before ``SendBackendRequest`` it holds
only the request; after it, ``response`` is set as well, as a buffered body or as a
``ResponseStream`` whose chunks flow through the stream transforms on their way out.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from luthien_control import jsontext
from luthien_control.dialects import Dialect, StreamAssembler, dialect_for

if TYPE_CHECKING:
    from luthien_control.sse import Chunk


_UNPARSED = object()


class Message:
    """A request or response body: the bytes as they came, parsed JSON on demand.

    Policies change ``payload`` in place and call ``mark_changed()`` (or assign a new
    one); ``body`` is serialized again only then.
    """

    __slots__ = ("_body", "_payload", "changed")

    def __init__(self, body: bytes, payload: Any = _UNPARSED) -> None:
        self._body = body
        self._payload = payload
        self.changed = False

    @property
    def body(self) -> bytes:
        if self.changed:
            self._body = jsontext.dumps(self._payload)  # any depth it was read at
            self.changed = False
        return self._body

    @property
    def payload(self) -> Any:
        """The body's JSON, or ``None`` when the body is empty or not JSON."""
        if self._payload is _UNPARSED:
            try:
                self._payload = orjson.loads(self._body) if self._body else None
            except orjson.JSONDecodeError:
                self._payload = None
        return self._payload

    @payload.setter
    def payload(self, value: Any) -> None:
        self._payload = value
        self.changed = True

    def mark_changed(self) -> None:
        _ = self.payload
        self.changed = True

    def set_body(self, body: bytes, payload: Any = _UNPARSED) -> None:
        """Replace the body with new bytes (and ``payload``, their JSON, when known)."""
        self._body = body
        self._payload = payload
        self.changed = False


class ProxyRequest(Message):
    """The client's request, relative to the API root (``/chat/completions``, ``/models``)."""

    __slots__ = ("headers", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: dict[str, str],
        body: bytes,
        payload: Any = _UNPARSED,
    ) -> None:
        super().__init__(body, payload)
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers

    @property
    def wants_stream(self) -> bool:
        payload = self.payload
        return isinstance(payload, dict) and payload.get("stream") is True


class StreamTransform(Protocol):
    """Changes, drops, inserts or holds back chunks of a streamed response.

    ``on_chunk`` returns the chunks to pass on (none, the same one, changed ones, more);
    ``on_end`` is called once when the backend's stream has ended and returns what was
    held back. Raising ``PolicyBlocked`` ends the stream with an error event.
    """

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]: ...

    async def on_end(self) -> list[Chunk]: ...


class ResponseStream:
    """A streamed backend response, not yet read: the relay pulls it through ``transforms``."""

    __slots__ = ("source", "transforms")

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self.source = source
        self.transforms: list[StreamTransform] = []


class ProxyResponse(Message):
    """The answer to the client: from the backend, or made by a policy."""

    __slots__ = ("headers", "status", "stream")

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes = b"",
        stream: ResponseStream | None = None,
    ) -> None:
        super().__init__(body)
        self.status = status
        self.headers = headers
        self.stream = stream


@dataclass(slots=True)
class Decision:
    """Something a policy did: ``action`` is ``blocked``, ``redacted``, ``changed``, ..."""

    policy: str
    action: str
    detail: str = ""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    raw: dict[str, Any] | None = None


@dataclass(slots=True)
class Timings:
    """Seconds on the monotonic clock; ``received_at`` is wall-clock epoch seconds."""

    received_at: float = field(default_factory=time.time)
    start: float = field(default_factory=time.perf_counter)
    backend_sent: float | None = None  # the request went out to the backend
    backend_first_byte: float | None = None  # the backend's status and headers arrived
    backend_ready: float | None = None  # its first event (stream) or whole body arrived
    client_first_byte: float | None = None
    end: float | None = None


@dataclass(slots=True)
class Trail:
    """What the audit record needs that the request path would otherwise forget:
    each side of the exchange as it was, before and after the policies."""

    request_body: bytes = b""  # as received from the client
    backend_request: dict[str, Any] | None = None  # method, url, headers, body as sent
    backend_status: int | None = None
    backend_headers: dict[str, str] | None = None
    backend_body: bytes | None = None  # a buffered answer as the backend sent it
    client_body: bytes | None = None  # a buffered answer as the client got it
    client_headers: list[tuple[bytes, bytes]] | None = None  # the headers the client got
    stream_received: StreamAssembler | None = None  # a stream as the backend sent it
    stream_sent: StreamAssembler | None = None  # a stream as the client got it
    # The stream's events as the backend sent them (their bytes), for a replay of the record
    # (``replay.py``); at most ``RECORDED_EVENTS`` of them, then ``events_cut``.
    events_received: list[bytes] | None = None
    # Their JSON as the relay parsed it, one per event while they line up; ``UNREAD`` where
    # the relay's copy may have been changed since (the record parses those bytes again).
    events_parsed: list[Any] | None = None
    events_named: bool = False  # they came with ``event:`` lines (Responses, Messages)
    events_done: bool = False  # and ended with ``data: [DONE]`` (chat completions)
    events_cut: bool = False


UNREAD = object()  # in ``Trail.events_parsed``: parse this event's bytes again


def new_transaction_id() -> str:
    """128 random bits from the system's generator as 32 hex digits (uuid4's format
    without its cost), read 256 ids at a time: a read of 16 bytes cost as much as the
    rest of a small request's bookkeeping. (``list.pop`` and ``extend`` are atomic:
    threads may share the pool; a forked worker starts with an empty one.)"""
    try:
        return _id_pool.pop()
    except IndexError:
        block = os.urandom(16 * 256).hex()
        _id_pool.extend(block[start : start + 32] for start in range(0, len(block), 32))
        return _id_pool.pop()


_id_pool: list[str] = []
os.register_at_fork(after_in_child=_id_pool.clear)


@dataclass(slots=True, eq=False)
class Transaction:
    """Everything about one request on its way through the proxy."""

    request: ProxyRequest
    services: Any  # luthien_control.app.Services; Any keeps policies free of import cycles
    id: str = field(default_factory=new_transaction_id)
    dialect: Dialect = None  # type: ignore[assignment]  # None: from the request's path
    backend_url: str | None = None
    backend_headers: dict[str, str] = field(default_factory=dict)
    response: ProxyResponse | None = None
    client_key_name: str | None = None
    policy_name: str | None = None
    usage_injected: bool = False  # the proxy, not the client, asked for include_usage
    reads_content: bool = False  # a policy that reads bodies is in force: decoding.py
    usage: Usage | None = None
    decisions: list[Decision] = field(default_factory=list)
    flagged: bool = False  # a policy asked a person to look (``flag``): the review queue
    timings: Timings = field(default_factory=Timings)
    outcome: str = "pending"
    chunks_sent: int = 0
    error: BaseException | None = None
    status: int | None = None  # the HTTP status the client got
    response_complete: bool = False  # the last byte is on its way: a disconnect is no news
    trail: Trail = field(default_factory=Trail)
    resources: AsyncExitStack = field(default_factory=AsyncExitStack)

    def __post_init__(self) -> None:
        if getattr(self, "dialect", None) is None:  # not given: the request path's
            self.dialect = dialect_for(self.request.path)

    def record(self, policy: str, action: str, detail: str = "") -> None:
        """Note a policy decision, for the audit record and the metrics."""
        self.decisions.append(Decision(policy, action, detail))

    def flag(self, policy: str, reason: str, *, action: str = "flagged") -> None:
        """Ask a person to look at this transaction: it is recorded as a decision
        (``action``, ``reason`` as its detail) and the record joins the operator
        console's review queue, where a reviewer marks it fine or a violation. Any policy
        may call it; ``LLMJudgePolicy`` does for ``action: flag``. The reason is stored
        redacted, like every record; name the rule, do not quote the offending text."""
        self.flagged = True
        self.record(policy, action, reason)

    def lookup(self, path: str) -> Any:
        """The value at a dotted path such as ``request.payload.model`` (None if absent)."""
        value: Any = self
        for part in path.split("."):
            if value is None:
                return None
            if isinstance(value, dict):
                value = value.get(part)
            elif isinstance(value, list):
                try:
                    value = value[int(part)]
                except (ValueError, IndexError):
                    return None
            elif part.startswith("_") or part in {"services", "resources", "dialect"}:
                return None
            else:
                value = getattr(value, part, None)
        return value
