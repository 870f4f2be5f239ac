"""A dry run: a recorded transaction replayed through a policy, with no backend call.

The record's request (as the client sent it) goes through the proxy's own request path
(``LuthienProxy`` with the policy to try in force) and its answer as the backend sent it
(a buffered body, or a stream event by event, ``response.received.events``) comes back
from a stand-in backend (``RecordedBackend``) instead of the network. What comes out is
what the client would have seen under that policy, and the record the proxy would have
written. Nothing is stored and nothing is counted in ``/metrics``.

A record is redacted: the replayed request and answer carry ``[REDACTED]`` where the
originals held a secret, and the client's key is gone. The client is taken to be the key
the record names (``client_key_name``); a record without one replays without a key. An
``LLMJudgePolicy`` in the policy does call its judge: that call is the policy at work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from luthien_control.app import KeyCache, PolicySource, Services
from luthien_control.dialects import dialect_for
from luthien_control.exceptions import BackendUnreachable, ClientError
from luthien_control.policies.base import Policy
from luthien_control.recording import Redactor, build_record
from luthien_control.settings import Settings
from luthien_control.transaction import ProxyRequest, Transaction
from luthien_control.upstream.client import BackendClient

# The client key a replayed request carries, in the headers the original sent one in.
REPLAY_KEY = "luthien-replay-key"
_CREDENTIALS = ("authorization", "x-api-key", "api-key")
# Not replayed: they describe the original bytes, and the replay writes its own.
_FRAMING = frozenset({"content-length", "content-encoding", "transfer-encoding"})


class ReplayRefused(ClientError):
    """The record cannot be replayed (no request body, a stream not kept event by event)."""


@dataclass
class Replay:
    """What the client would have seen: ``status``, ``headers`` and the whole ``body``
    (a stream's events, as they would have gone out); ``record``: the record the proxy
    would have written (redacted), its ``decisions``, ``outcome`` and ``response.sent``."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return any(
            name == "content-type" and value.startswith("text/event-stream")
            for name, value in self.headers
        )


class _ReplayKeys(KeyCache):
    """The replayed request's key is the key the record names."""

    def __init__(self, name: str | None) -> None:
        super().__init__()
        self._name = name
        self.loaded = True

    def name_for(self, key: str) -> str | None:
        return self._name if key == REPLAY_KEY else None


class _RecordedResponse:
    """The backend's recorded answer, in the shape of ``upstream.client.BackendResponse``."""

    def __init__(self, status: int, headers: dict[str, str], pieces: list[bytes]) -> None:
        self.status = status
        self.headers = headers
        self._pieces = pieces

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("content-type", "").lower().startswith("text/event-stream")

    async def read(self) -> bytes:
        body = b"".join(self._pieces)
        self._pieces = []
        return body

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        pieces, self._pieces = self._pieces, []
        for piece in pieces:  # one event per read, as a backend most often sends them
            yield piece

    def close(self) -> None:
        self._pieces = []


class _RecordedExchange:
    def __init__(self, response: _RecordedResponse) -> None:
        self._response = response

    async def __aenter__(self) -> _RecordedResponse:
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        self._response.close()


class RecordedBackend:
    """Stands in for ``BackendClient``: every request gets the record's answer."""

    def __init__(self, received: dict[str, Any] | None) -> None:
        self._received = received
        self.calls = 0

    def open(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> _RecordedExchange:
        self.calls += 1
        received = self._received
        if received is None:
            raise BackendUnreachable(
                "the recorded transaction never reached the backend: the record holds no "
                "answer to replay"
            )
        return _RecordedExchange(_recorded_response(received))


def _recorded_response(received: dict[str, Any]) -> _RecordedResponse:
    headers = _recorded_headers(received)
    status = int(received.get("status") or 502)
    events = received.get("events")
    if received.get("stream") is not None:
        if events is None:
            raise ReplayRefused(
                "the record keeps this stream assembled only (it had more events than a "
                "record keeps): it cannot be replayed event by event"
            )
        named = bool(received.get("events_named"))
        pieces = [_event_bytes(data, named=named) for data in events]
        if received.get("events_done"):
            pieces.append(b"data: [DONE]\n\n")
        return _RecordedResponse(status, headers, pieces)
    body = received.get("body")
    return _RecordedResponse(status, headers, [_body_bytes(body)] if body is not None else [])


def _recorded_headers(side: dict[str, Any]) -> dict[str, str]:
    """A recorded side's headers, lower-cased, without those that describe its bytes."""
    return {
        str(name).lower(): str(value)
        for name, value in (side.get("headers") or {}).items()
        if str(name).lower() not in _FRAMING
    }


def _event_bytes(data: Any, *, named: bool) -> bytes:
    name = data.get("type") if named and isinstance(data, dict) else None
    prefix = b"event: " + name.encode() + b"\n" if isinstance(name, str) else b""
    return prefix + b"data: " + orjson.dumps(data) + b"\n\n"


def _body_bytes(body: Any) -> bytes:
    if isinstance(body, str):
        return body.encode()
    return orjson.dumps(body)


def _request(record: dict[str, Any]) -> tuple[ProxyRequest, bytes]:
    received = (record.get("request") or {}).get("received")
    if not isinstance(received, dict):
        raise ReplayRefused("the record holds no request to replay")
    headers = _recorded_headers(received)
    if record.get("client_key_name") is not None:
        # The key was redacted: the replay presents its own, where the client put it.
        present = [name for name in _CREDENTIALS if name in headers] or ["authorization"]
        for name in _CREDENTIALS:
            headers.pop(name, None)
        for name in present:
            headers[name] = f"Bearer {REPLAY_KEY}" if name == "authorization" else REPLAY_KEY
    body_value = received.get("body")
    body = b"" if body_value is None else _body_bytes(body_value)
    query = str(received.get("query") or "").encode("latin-1", "replace")
    request = ProxyRequest(
        str(record.get("method") or "POST"), record["endpoint"], query, headers, b""
    )
    return request, body


async def replay(
    record: dict[str, Any],
    policy: Policy,
    settings: Settings,
    *,
    judge_backend: BackendClient | None = None,
) -> Replay:
    """Run ``record`` (a stored transaction, as ``get_transaction`` gives it) through
    ``policy``; the backend's answer is the record's. ``judge_backend``: the pool a judge
    calls through (a new one, closed afterwards, when not given)."""
    from luthien_control.server import LuthienProxy

    request, body = _request(record)
    backend = RecordedBackend((record.get("response") or {}).get("received"))
    source = PolicySource(settings)
    source.current = policy
    judges = judge_backend
    if judges is None:
        judges = BackendClient(
            settings.timeouts,
            settings.judge_limits,
            settings.network,
            pool_setting="JUDGE_POOL_SIZE",
        )
        await judges.start()
    services = Services(
        settings=settings,
        engine=cast(Any, None),  # a replay never reads nor writes the database
        backend=cast(BackendClient, backend),
        judge_backend=judges,
        keys=_ReplayKeys(record.get("client_key_name")),
        policy=source,
    )
    proxy = LuthienProxy(settings)
    proxy.services = services
    tx = Transaction(request=request, services=services)
    tx.dialect = dialect_for(request.path)
    out = Replay()
    answered = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", [])
            ]
        elif message["type"] == "http.response.body":
            out.body += message.get("body", b"")
            if not message.get("more_body", False):
                answered.set()

    try:
        await proxy._run(tx, receive, send, dev=False)
    finally:
        tx.timings.end = time.perf_counter()
        if tx.outcome == "pending":
            tx.outcome = "ok"
        await tx.resources.aclose()
        if judge_backend is None:
            await judges.close()
    out.record = orjson.loads(_row_json(build_record(tx, Redactor())))
    return out


def _row_json(row: dict[str, Any]) -> bytes:
    """A built row as the database would give it back: its JSON columns parsed."""
    plain = {
        name: (orjson.loads(str(value)) if name in ("request", "response", "decisions") else value)
        for name, value in row.items()
    }
    return orjson.dumps(plain, default=str)
