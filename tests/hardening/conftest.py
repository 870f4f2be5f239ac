"""The hardening suite's harness: real proxy processes, a mock backend of their own, and
the four checks every test ends with.

Every test of ``tests/hardening`` drives ``luthien-control serve`` processes (never the
app in-process) and ends by checking, whatever it did to them:

- **nothing stuck**: every client call ended within ``CLIENT_BOUND`` with an answer, an
  error event or the error it was meant to get (``Call.ending`` is never ``"stuck"``),
  and the proxy still answers ``/health``;
- **no 5xx of the proxy's own**: a status of 500 or above is the backend's own (passed
  through) or a backend failure the proxy reports as one (502, 504); its record says so
  (outcome ``backend_error_status`` or ``backend_error``), and no record says
  ``proxy_error``;
- **every forwarded request recorded exactly once**: each request carries a unique
  marker (``x-mock-request-id``); the markers the backend received are counted against
  the rows of the database, once the recorder has written them (polled, bounded);
- **no traceback** (nor a line that says "a bug") in the proxy's log.

Counts are small in ``make test``; ``LUTHIEN_SOAK=1`` (``make soak``) runs the same code
at soak scale (``scaled``). ``LUTHIEN_SOAK_SEED`` changes the fuzzers' seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from luthien_control.db.engine import create_engine
from tests.conftest import (
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    ServerProcess,
    free_port,
    python_env,
)
from tests.hardening.raw_backend import RawBackend, raw_backend

SOAK = os.environ.get("LUTHIEN_SOAK", "") not in ("", "0")
SEED = int(os.environ.get("LUTHIEN_SOAK_SEED", "11"))
CLIENT_BOUND = 60.0 if SOAK else 30.0  # a call not ended by then is stuck (a bound, not a measure)
RECORD_BOUND = 120.0 if SOAK else 30.0  # the recorder writes everything within this
MARKER = "x-mock-request-id"
# What a 5xx may be: the backend's own status, or a backend failure reported as one.
BACKEND_OUTCOMES = frozenset({"backend_error", "backend_error_status"})
BUG_SIGNS = ("Traceback", "(a bug", "cannot build the record")


def scaled(quick: int, soak: int) -> int:
    """``quick`` in ``make test``, ``soak`` under ``LUTHIEN_SOAK=1``."""
    return soak if SOAK else quick


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft limit on open files towards ``needed`` (at most to the
    hard limit); children started afterwards inherit it. Returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def new_marker(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --- the client side ---------------------------------------------------------------------


@dataclass
class Call:
    """How one client call ended. ``ending``: ``"answer"`` (a whole non-streamed answer),
    ``"done"`` (a stream that ended normally), ``"error_event"`` (a stream that ended with
    its dialect's error event), ``"cut"`` (the connection ended mid-body), ``"refused"``
    (no connection) or ``"stuck"`` (nothing within ``CLIENT_BOUND``)."""

    marker: str
    status: int | None = None
    transaction_id: str | None = None
    ending: str = "stuck"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def describe(self) -> str:
        return (
            f"{self.marker}: status {self.status}, {self.ending}, "
            f"tx {self.transaction_id}, body {self.body[:300]!r}"
        )


def stream_ending(body: bytes) -> str:
    """``done`` or ``error_event`` from a stream's last event; ``cut`` otherwise."""
    events = [event for event in body.replace(b"\r\n", b"\n").split(b"\n\n") if event.strip()]
    if not events:
        return "cut"
    last = events[-1]
    data = b"".join(line[5:].strip() for line in last.split(b"\n") if line.startswith(b"data:"))
    if data == b"[DONE]":
        return "done"
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "cut"
    if isinstance(payload, dict):
        if "error" in payload or payload.get("type") in ("error", "response.failed"):
            return "error_event"
        if payload.get("type") in ("message_stop", "response.completed"):
            return "done"
    return "cut"


async def call(
    client: httpx.AsyncClient,
    url: str,
    marker: str,
    *,
    body: Any = None,
    content: bytes | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    stream: bool = False,
    bound: float = CLIENT_BOUND,
) -> Call:
    """One request, bounded: how it ended (never raises for a transport error)."""
    result = Call(marker)
    sent = {"authorization": f"Bearer {CLIENT_KEY}", MARKER: marker, **(headers or {})}
    if body is not None:
        content = orjson.dumps(body)
        sent.setdefault("content-type", "application/json")
    try:
        async with asyncio.timeout(bound):
            async with client.stream(method, url, content=content, headers=sent) as response:
                result.status = response.status_code
                result.headers = dict(response.headers)
                result.transaction_id = response.headers.get("x-luthien-transaction-id")
                parts = []
                try:
                    async for part in response.aiter_raw():
                        parts.append(part)
                except httpx.TransportError:
                    result.body = b"".join(parts)
                    result.ending = "cut"
                    return result
                result.body = b"".join(parts)
                is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
                result.ending = stream_ending(result.body) if is_stream else "answer"
    except TimeoutError:
        result.ending = "stuck"
    except httpx.TransportError:
        result.ending = "refused" if result.status is None else "cut"
    return result


def dechunk(data: bytes) -> bytes | None:
    """A chunked body undone; None when it is cut or garbled."""
    body, at = [], 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        try:
            size = int(data[at:end].split(b";")[0], 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(body)
        body.append(data[end + 2 : end + 2 + size])
        at = end + 2 + size + 2
        if at > len(data):
            return None


async def raw_exchange(
    port: int, request: bytes, bound: float = CLIENT_BOUND, *, head: bool = False
) -> Call:
    """``request`` written as it is on a new connection to 127.0.0.1:``port``, the answer
    read to the end of the connection (send ``connection: close``) and parsed by hand: for
    bytes no HTTP library would send, and for load without a library's cost per call.
    ``head``: the answer to a HEAD request, which has no body."""
    result = Call("")
    try:
        async with asyncio.timeout(bound):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            parts: list[bytes] = []
            try:
                writer.write(request)
                while part := await reader.read(65536):
                    parts.append(part)
            except ConnectionError:
                # The proxy answered before it read the whole request (a 413) and closed:
                # the answer, if it came before the reset, is parsed below.
                if not parts:
                    raise
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except TimeoutError:
        return result
    except ConnectionError:
        result.ending = "refused"
        return result
    data = b"".join(parts)
    while data.startswith(b"HTTP/1.1 1"):  # 100 Continue
        data = data.partition(b"\r\n\r\n")[2]
    response_head, separator, body = data.partition(b"\r\n\r\n")
    lines = response_head.split(b"\r\n")
    if not separator or not lines[0].startswith(b"HTTP/1.1 "):
        result.ending = "cut"
        return result
    result.status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        result.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    result.transaction_id = result.headers.get("x-luthien-transaction-id")
    if head:  # no body is due (uvicorn's own 400 has one all the same)
        result.ending = "answer"
        return result
    if result.headers.get("transfer-encoding") == "chunked":
        whole = dechunk(body)
        if whole is None:
            result.body, result.ending = body, "cut"
            return result
        body = whole
    elif "content-length" in result.headers and len(body) != int(result.headers["content-length"]):
        result.body, result.ending = body, "cut"
        return result
    result.body = body
    stream = result.headers.get("content-type", "").startswith("text/event-stream")
    result.ending = stream_ending(body) if stream else "answer"
    return result


def raw_post(port: int, path: str, marker: str, body: bytes, **headers: str) -> bytes:
    """The bytes of a POST to the proxy with the client key and ``marker``."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        f"authorization: Bearer {CLIENT_KEY}",
        f"{MARKER}: {marker}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def async_client(connections: int = 100) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(CLIENT_BOUND, connect=10.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


def chat(marker: str, *, stream: bool = False, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"hardening {marker}"}],
        "stream": stream,
    }


# --- the database side -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    status: int | None
    outcome: str
    error: str | None
    marker: str | None


def _marker_of(document: Any) -> str | None:
    if isinstance(document, str):
        document = json.loads(document)
    if not isinstance(document, dict):
        return None
    received = document.get("received")
    if not isinstance(received, dict):
        return None
    headers = received.get("headers") or {}
    marker = headers.get(MARKER)
    return marker if isinstance(marker, str) else None


async def _rows(database_url: str) -> list[Row]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                text("SELECT id, status, outcome, error, request FROM transactions")
            )
            return [
                Row(row.id, row.status, row.outcome, row.error, _marker_of(row.request))
                for row in result
            ]
    finally:
        await engine.dispose()


def stored_rows(database_url: str) -> list[Row]:
    """Every row of the ``transactions`` table (SQLite or PostgreSQL)."""
    return asyncio.run(_rows(database_url))


def wait_recorded(
    database_url: str, transaction_ids: Iterable[str], markers: Iterable[str]
) -> tuple[list[Row], set[str], set[str]]:
    """The rows once every transaction id and every marker is there (polled, bounded: the
    recorder writes in the background); and the ids and markers still missing then."""
    wanted_ids, wanted_markers = set(transaction_ids), set(markers)
    deadline = time.monotonic() + RECORD_BOUND
    while True:
        rows = stored_rows(database_url)
        missing_ids = wanted_ids - {row.id for row in rows}
        missing_markers = wanted_markers - {row.marker for row in rows}
        if (not missing_ids and not missing_markers) or time.monotonic() > deadline:
            return rows, missing_ids, missing_markers
        time.sleep(0.2)


def backend_markers(mock: MockBackendServer, prefix: str) -> list[str]:
    """The markers of the requests the mock backend received, with ``prefix``."""
    response = mock.client.get(f"{mock.url}/_mock/requests")
    response.raise_for_status()
    return [record["id"] for record in response.json() if record["id"].startswith(prefix)]


# --- the four checks ---------------------------------------------------------------------


def check_calls(calls: list[Call], *, backend_statuses: Iterable[int] = ()) -> None:
    """Nothing stuck, and no 5xx but the backend's own (``backend_statuses``) or a
    backend failure (502, 504; their records are checked by ``check_records``)."""
    own = set(backend_statuses)
    stuck = [c.describe() for c in calls if c.ending == "stuck"]
    assert not stuck, f"{len(stuck)} call(s) stuck: {stuck[:5]}"
    proxy_5xx = [
        c.describe()
        for c in calls
        if c.status is not None and c.status >= 500 and c.status not in own | {502, 504}
    ]
    assert not proxy_5xx, f"{len(proxy_5xx)} 5xx of the proxy's own: {proxy_5xx[:5]}"


def check_records(
    database_url: str,
    calls: list[Call],
    forwarded: Iterable[str],
    *,
    prefix: str,
    describe: Callable[[Call], str] = Call.describe,
) -> list[Row]:
    """Every forwarded request (``forwarded``: markers the backend received) and every
    answered call recorded exactly once; each 5xx recorded as the backend's."""
    forwarded = list(forwarded)
    assert len(forwarded) == len(set(forwarded))
    ids = [c.transaction_id for c in calls if c.transaction_id is not None]
    rows, missing_ids, missing_markers = wait_recorded(database_url, ids, forwarded)
    unrecorded = [
        describe(c) for c in calls if c.transaction_id in missing_ids or c.marker in missing_markers
    ]
    assert not (missing_ids or missing_markers), (
        f"not recorded within {RECORD_BOUND} s: {len(missing_ids)} answered, "
        f"{len(missing_markers)} forwarded: {unrecorded[:5]} {sorted(missing_markers)[:5]}"
    )
    by_marker = Counter(row.marker for row in rows if row.marker and row.marker.startswith(prefix))
    twice = {marker: n for marker, n in by_marker.items() if n != 1}
    assert not twice, f"recorded more than once: {list(twice.items())[:5]}"
    by_id = {row.id: row for row in rows}
    for c in calls:
        if c.transaction_id is None:
            continue
        row = by_id[c.transaction_id]
        assert row.marker == c.marker, c.describe()
        if c.status is not None and c.status >= 500:
            assert row.outcome in BACKEND_OUTCOMES, (c.describe(), row)
    mine = set(ids)
    bugs = [
        row
        for row in rows
        if row.outcome == "proxy_error"
        and (row.id in mine or (row.marker or "").startswith(prefix))
    ]
    assert not bugs, f"{len(bugs)} proxy_error record(s): {bugs[:3]}"
    return rows


def check_log(proxy: ProxyServer) -> None:
    assert proxy.server is not None
    log = proxy.server.log()
    for sign in BUG_SIGNS:
        assert sign not in log, f"{sign!r} in the proxy's log:\n{log[-5000:]}"


def check_alive(proxy: ProxyServer) -> None:
    response = httpx.get(f"{proxy.url}/health", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def rss_bytes(pid: int) -> int:
    """The resident set of a process (``/proc/PID/status``, ``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="package")
def hardening_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockBackendServer]:
    """A mock backend of the suite's own (its request log holds up to 10,000 requests: the
    others' traffic must not push this suite's out of it)."""
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "luthien_control.mock_backend", "--port", str(port)],
        python_env(),
        f"http://127.0.0.1:{port}/health",
        tmp_path_factory.mktemp("hardening-mock") / "mock-backend.log",
    )
    server.start()
    mock = MockBackendServer(f"http://127.0.0.1:{port}")
    yield mock
    mock.client.close()
    server.stop()


UNREACHABLE = "fault-unreachable"  # a model name: routed to a port nobody listens on
RAW = "fault-raw"  # routed to the raw backend
READ_TIMEOUT = 2.0  # BACKEND_READ_TIMEOUT of the shared proxy: stalls end in seconds
MAX_REQUEST_BYTES = 256 * 1024  # its MAX_REQUEST_BYTES: sizes around it stay cheap
PROXY_CONNECTIONS = 1000  # what the load test opens at once; its BACKEND_POOL_SIZE
# Three descriptors a stream: the client's socket and the proxy's two (children inherit
# the limit of this process).
FILES_NEEDED = 4 * PROXY_CONNECTIONS + 1024


@pytest.fixture(scope="package")
def raw() -> Iterator[RawBackend]:
    with raw_backend() as backend:
        yield backend


@pytest.fixture(scope="package")
def hardening_proxy(
    start_proxy: ProxyStarter, hardening_mock: MockBackendServer, raw: RawBackend
) -> ProxyServer:
    """The proxy most of the suite shares (one process: each start costs seconds of CPU):
    the e2e chain in front of the mock backend; the model ``fault-unreachable`` goes to a
    closed port, ``fault-raw`` to the raw backend."""
    raise_fd_limit(FILES_NEEDED)
    routes = {UNREACHABLE: f"http://127.0.0.1:{free_port()}/v1", RAW: raw.url}
    return start_proxy(
        policy=proxy_policy(hardening_mock.api_base, routes=routes),
        env={
            "BACKEND_READ_TIMEOUT": str(READ_TIMEOUT),
            "BACKEND_CONNECT_TIMEOUT": "5",
            "BACKEND_POOL_SIZE": str(PROXY_CONNECTIONS),
            "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        },
    )


@pytest.fixture(autouse=True)
def fresh_request_log(request: pytest.FixtureRequest) -> None:
    """The shared mock's request log emptied before each test that uses it: it keeps the
    newest 10,000 requests, which a soak's test alone may reach."""
    if "hardening_mock" in request.fixturenames:
        mock: MockBackendServer = request.getfixturevalue("hardening_mock")
        mock.client.delete(f"{mock.url}/_mock/requests").raise_for_status()


def proxy_policy(backend_url: str, *, routes: dict[str, str] | None = None) -> dict[str, Any]:
    """The e2e chain (key check, secret scanning, backend key); requests whose ``model``
    is a key of ``routes`` go to that backend instead."""
    branches = [
        {
            "condition": {
                "type": "equals",
                "left": {"type": "transaction_path", "path": "request.payload.model"},
                "right": {"type": "static", "value": model},
            },
            "policy": {"type": "SetBackendPolicy", "config": {"backend_url": url}},
        }
        for model, url in (routes or {}).items()
    ]
    backend: dict[str, Any] = {"type": "SetBackendPolicy", "config": {"backend_url": backend_url}}
    if branches:
        backend = {
            "type": "BranchingPolicy",
            "config": {"cond_to_policy_map": branches, "default_policy": backend},
        }
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "Hardening",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {}},
                {
                    "type": "AddApiKeyHeaderFromEnv",
                    "config": {"api_key_env_var_name": "OPENAI_API_KEY"},
                },
                backend,
                {"type": "SendBackendRequest", "config": {}},
            ],
        },
    }
