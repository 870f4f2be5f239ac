"""Faults at the database, through a real proxy: a SQLite file held locked by another
process, a PostgreSQL server stopped and started again, each with one request in the
outage (idle) and with requests all through it (traffic).

Proxying never waits for the database: every request is answered while it is away, and
once it is back every request the backend received is recorded exactly once; the log
says so in one line each way, without a traceback.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Awaitable, Iterator

import pytest

from tests.conftest import MockBackendServer, ProxyServer, ProxyStarter, free_port
from tests.hardening.conftest import (
    SOAK,
    Call,
    async_client,
    backend_markers,
    call,
    chat,
    check_alive,
    check_calls,
    check_log,
    check_records,
    new_marker,
    proxy_policy,
    scaled,
)
from tests.postgres import PostgresServer, find_bindir, remove, start_postgres

SQLITE_BUSY_TIMEOUT = 5.0  # db/engine.py: a lock held longer is an outage to the writer
LOCK_HELD = SQLITE_BUSY_TIMEOUT + (25.0 if SOAK else 1.5)
OUTAGE = 20.0 if SOAK else 2.0  # how long PostgreSQL stays stopped
TRAFFIC_GAP = 0.05  # between two requests of the traffic


async def traffic(proxy: ProxyServer, prefix: str, scenario: Awaitable[None]) -> list[Call]:
    """Requests one after another, streamed and not, on a few connections at once, for
    as long as ``scenario`` runs."""
    url = f"{proxy.api_base}/chat/completions"
    calls: list[Call] = []
    over = asyncio.Event()

    async def lane(lane_number: int) -> None:
        number = 0
        async with async_client(1) as client:
            while not over.is_set():
                marker = f"{prefix}-{lane_number}-{number}"
                body = chat(marker, stream=number % 2 == 1)
                calls.append(await call(client, url, marker, body=body))
                number += 1
                await asyncio.sleep(TRAFFIC_GAP)

    async def run_scenario() -> None:
        try:
            await scenario
        finally:
            over.set()

    await asyncio.gather(run_scenario(), *(lane(n) for n in range(scaled(4, 8))))
    return calls


async def one_request(proxy: ProxyServer, marker: str) -> Call:
    async with async_client(1) as client:
        body = chat(marker)
        return await call(client, f"{proxy.api_base}/chat/completions", marker, body=body)


def check_answered(calls: list[Call]) -> None:
    check_calls(calls)
    unanswered = [c.describe() for c in calls if (c.status, c.ending) not in OK]
    assert not unanswered, f"{len(unanswered)} not answered: {unanswered[:5]}"


OK = {(200, "answer"), (200, "done")}


def check_all(proxy: ProxyServer, mock: MockBackendServer, calls: list[Call], prefix: str) -> None:
    check_answered(calls)
    check_records(proxy.database_url, calls, backend_markers(mock, prefix), prefix=prefix)
    check_log(proxy)
    check_alive(proxy)


def wait_for_line(proxy: ProxyServer, line: str, after: int) -> None:
    """Until ``line`` is in the proxy's log past its first ``after`` characters (bounded)."""
    assert proxy.server is not None
    deadline = time.monotonic() + 60
    while line not in proxy.server.log()[after:]:
        assert time.monotonic() < deadline, f"never logged: {line}\n{proxy.server.log()[after:]}"
        time.sleep(0.1)


def own_postgres_down(server: PostgresServer) -> bool:
    status = subprocess.run(
        [str(server.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port)],
        capture_output=True,
    )
    return status.returncode != 0


# --- SQLite held locked ------------------------------------------------------------------


@pytest.fixture
def sqlite_proxy(hardening_proxy: ProxyServer) -> ProxyServer:
    """The shared proxy: its database is a SQLite file."""
    return hardening_proxy


class Locked:
    """The proxy's SQLite file held with ``BEGIN EXCLUSIVE`` by another connection (as
    another process would), for ``LOCK_HELD`` seconds: longer than the busy timeout."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.path = proxy.database_url.split(":///", 1)[1]

    def __enter__(self) -> Locked:
        self.connection = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.connection.execute("BEGIN EXCLUSIVE")
        self.until = time.monotonic() + LOCK_HELD
        return self

    async def held(self) -> None:
        await asyncio.sleep(max(0.0, self.until - time.monotonic()))

    def __exit__(self, *exc: object) -> None:
        time.sleep(max(0.0, self.until - time.monotonic()))
        self.connection.execute("COMMIT")
        self.connection.close()


@pytest.mark.parametrize("load", ["idle", "traffic"])
def test_sqlite_held_locked(
    sqlite_proxy: ProxyServer, hardening_mock: MockBackendServer, load: str
) -> None:
    assert sqlite_proxy.server is not None
    prefix = new_marker(f"sqlite-{load}")
    logged = len(sqlite_proxy.server.log())
    with Locked(sqlite_proxy) as lock:
        if load == "idle":
            calls = [asyncio.run(one_request(sqlite_proxy, f"{prefix}-0"))]
        else:
            calls = asyncio.run(traffic(sqlite_proxy, prefix, lock.held()))
    check_all(sqlite_proxy, hardening_mock, calls, prefix)
    wait_for_line(sqlite_proxy, "database is locked", logged)
    wait_for_line(sqlite_proxy, "transaction records are being written again", logged)


# --- PostgreSQL stopped and started again ---------------------------------------------


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own: it is stopped and started again, which
    the session's shared one must not be."""
    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    server = start_postgres(free_port())
    yield server
    remove(server)


@pytest.fixture(scope="module")
def postgres_proxy(
    start_proxy: ProxyStarter, hardening_mock: MockBackendServer, own_postgres: PostgresServer
) -> ProxyServer:
    database_url = own_postgres.create_database(f"h_{uuid.uuid4().hex[:12]}")
    return start_proxy(policy=proxy_policy(hardening_mock.api_base), database_url=database_url)


@pytest.mark.parametrize("load", ["idle", "traffic"])
def test_postgres_stopped_and_started_again(
    postgres_proxy: ProxyServer,
    hardening_mock: MockBackendServer,
    own_postgres: PostgresServer,
    load: str,
) -> None:
    assert postgres_proxy.server is not None
    prefix = new_marker(f"postgres-{load}")
    logged = len(postgres_proxy.server.log())
    own_postgres.stop()
    try:
        if load == "idle":
            calls = [asyncio.run(one_request(postgres_proxy, f"{prefix}-0"))]
            time.sleep(OUTAGE)  # the writer retries meanwhile
        else:

            async def outage() -> None:
                await asyncio.sleep(OUTAGE)
                await asyncio.to_thread(own_postgres.start)
                await asyncio.sleep(OUTAGE)  # traffic goes on past the restart

            calls = asyncio.run(traffic(postgres_proxy, prefix, outage()))
    finally:
        if own_postgres_down(own_postgres):
            own_postgres.start()
    check_all(postgres_proxy, hardening_mock, calls, prefix)
    wait_for_line(postgres_proxy, "cannot write transaction records, will retry", logged)
    wait_for_line(postgres_proxy, "transaction records are being written again", logged)
