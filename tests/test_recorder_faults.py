"""The audit trail under faults: every forwarded request is recorded, and no record is
lost to a database that is locked, stopped, refusing a row, or to a bug in the writer.

The proxy tests send hostile shapes through a real proxy process; the others drive a
``DatabaseRecorder`` against a real SQLite file and a real PostgreSQL server that they
lock, stop and start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control import metrics, recording
from luthien_control.db import engine as db_engine
from luthien_control.db import transactions
from luthien_control.db.engine import create_engine, describe_url
from luthien_control.db.init_db import upgrade
from luthien_control.recording import DatabaseRecorder, Redactor, default_dead_letter
from luthien_control.settings import Settings
from luthien_control.transaction import ProxyRequest, Transaction
from tests.conftest import (
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    e2e_policy,
    free_port,
)
from tests.postgres import PostgresServer, find_bindir, remove, start_postgres

SETTLE_TIMEOUT = 30.0  # a bound against hanging, never a measure of speed
REFUSED_MODEL = "refuse-me"


# --- every forwarded request is recorded, whatever its shape ---------------------------


def nested(depth: int) -> str:
    """JSON text of an object nested ``depth`` levels deep (written, not serialized:
    Python's json module recurses)."""
    return '{"a":' * depth + '"x"' + "}" * depth


def chat_body(depth: int) -> str:
    return (
        '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
        f'"metadata":{nested(depth)}}}'
    )


def inflated(value: Any) -> Any:
    """A stored document with the JSON text of its deepest parts parsed back (in place,
    without recursion)."""
    root = [value]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        container, key = stack.pop()
        child = container[key]
        if isinstance(child, str) and child[:1] in ("{", "["):
            with contextlib.suppress(ValueError):  # else a string, not JSON text
                child = container[key] = json.loads(child)
        if isinstance(child, dict):
            stack.extend((child, name) for name in child)
        elif isinstance(child, list):
            stack.extend((child, index) for index in range(len(child)))
    return root[0]


def depth_of(value: Any) -> int:
    """How many arrays and objects deep ``value`` is nested (without recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def rows_with_id(proxy: ProxyServer, transaction_id: str) -> int:
    database = proxy.database_url.split(":///", 1)[1]
    with sqlite3.connect(database) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM transactions WHERE id = ?", (transaction_id,)
        ).fetchone()
    return int(count)


@pytest.fixture(scope="module")
def reading_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """The e2e policy: LeakedApiKeyDetection reads content, so bodies are decoded strictly."""
    return start_proxy(policy=e2e_policy(mock_backend.api_base))


@pytest.fixture(scope="module")
def plain_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """No policy reads content: bodies pass as they came."""
    policy = e2e_policy(mock_backend.api_base)
    members = policy["config"]["policies"]
    policy["config"]["policies"] = [m for m in members if m["type"] != "LeakedApiKeyDetection"]
    return start_proxy(policy=policy)


@pytest.mark.parametrize("depth", [260, 10_000])
@pytest.mark.parametrize(
    ("proxy_name", "path", "content_type"),
    [
        ("reading_proxy", "/chat/completions", "application/json"),
        ("plain_proxy", "/chat/completions", "application/json"),
        # Not read at all without a content policy: forwarded as it came.
        ("plain_proxy", "/embeddings", "text/plain"),
    ],
)
def test_a_deeply_nested_request_is_refused_or_recorded_exactly_once(
    request: pytest.FixtureRequest, proxy_name: str, path: str, content_type: str, depth: int
) -> None:
    proxy: ProxyServer = request.getfixturevalue(proxy_name)
    sent = chat_body(depth)
    response = httpx.post(
        f"{proxy.api_base}{path}",
        content=sent,
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": content_type},
        timeout=30,
    )
    transaction_id = response.headers["x-luthien-transaction-id"]
    record = proxy.record(transaction_id)  # `logs --transaction ID --json` reads it back
    assert rows_with_id(proxy, transaction_id) == 1
    assert record["status"] == response.status_code
    stored = record["request"]["received"]["body"]
    if record["outcome"] == "rejected":  # refused by the proxy, before the backend
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"
        assert stored == sent  # not JSON to the proxy: kept as the text it came as
    elif depth > 1024:  # deeper than any JSON parser here reads: kept as text
        assert stored == sent
    else:
        if path == "/chat/completions":
            assert response.status_code == 200
        depth_kept = 0
        level = stored["metadata"]
        while isinstance(level, dict):
            level, depth_kept = level["a"], depth_kept + 1
        # The document's own levels (itself, received, body), then the body's, down to
        # RECORD_MAX_DEPTH; below it, JSON text.
        assert depth_kept == recording.RECORD_MAX_DEPTH - 3
        assert inflated(stored) == json.loads(sent)


def test_a_deep_value_is_stored_redacted_and_as_json_text_below_the_limit() -> None:
    secret = "sk-proj-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8"
    escaped = "\\u0073k" + secret[2:]  # a JSON escape must not hide it at any depth
    body = ('{"metadata":' + '{"a":' * 300 + f'"{escaped}"' + "}" * 300 + "}").encode()
    tx = Transaction(request=ProxyRequest("POST", "/embeddings", b"", {}, body), services=None)
    tx.trail.request_body = body
    document = json.loads(recording.build_record(tx, Redactor())["request"])
    assert secret[3:] not in json.dumps(document)
    assert depth_of(document) == recording.RECORD_MAX_DEPTH
    expected: Any = "[REDACTED]"
    for _ in range(300):
        expected = {"a": expected}
    assert inflated(document["received"]["body"]) == {"metadata": expected}


# --- the recorder against a real database ---------------------------------------------


def finished(model: str = "gpt-4o-mini") -> Transaction:
    """A transaction as the edge hands it to the recorder: answered 200."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = ProxyRequest("POST", "/chat/completions", b"", {}, body)
    tx = Transaction(request=request, services=None)
    tx.trail.request_body = body
    tx.status, tx.outcome = 200, "ok"
    tx.timings.end = tx.timings.start + 0.002
    return tx


async def stored(engine: AsyncEngine) -> list[dict[str, Any]]:
    query = "SELECT id, model, outcome, status, error, request FROM transactions ORDER BY seq"
    async with engine.connect() as connection:
        rows = (await connection.execute(text(query))).mappings().all()
    # asyncpg hands JSON columns over decoded, aiosqlite as text.
    return [{**row, "request": _decoded(row["request"])} for row in rows]


def _decoded(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def full(tx: Transaction) -> dict[str, Any]:
    """The stored columns ``stored`` reads of a transaction recorded whole."""
    body = json.loads(tx.trail.request_body)
    return {
        "id": tx.id,
        "model": body["model"],
        "outcome": "ok",
        "status": 200,
        "error": None,
        "request": {
            "received": {"headers": {}, "query": "", "body": body},
            "sent": None,
        },
    }


def summary(tx: Transaction, error: str) -> dict[str, Any]:
    """The same columns of the summary row that stands for a record not stored whole."""
    nothing = {"received": None, "sent": None}
    return {
        "id": tx.id,
        "model": None,
        "outcome": "ok",
        "status": 200,
        "error": error,
        "request": nothing,
    }


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (bounded, so that a broken recorder fails instead of hanging)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while not condition():
        assert loop.time() < deadline, "the recorder did not get there"
        await asyncio.sleep(0.02)


def counter(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


class Attempts:
    """Counts the recorder's inserts and their failures; can fail the first ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, failing: int = 0) -> None:
        self.calls = self.failed = 0
        insert = transactions.insert_records

        async def counted(engine: AsyncEngine, rows: Any) -> None:
            self.calls += 1
            if self.calls <= failing:
                self.failed += 1
                raise RuntimeError("a bug in the insert")
            try:
                await insert(engine, rows)
            except Exception:
                self.failed += 1
                raise

        monkeypatch.setattr(transactions, "insert_records", counted)


def recorder_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "luthien_control.transactions"]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries every 50 ms instead of 0.5 to 5 s: the same path, sooner."""
    monkeypatch.setattr(recording, "RETRY_DELAYS", (0.05,))


@pytest.fixture
async def sqlite_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngine]:
    # A lock held elsewhere fails an attempt after 50 ms instead of 5 s.
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT_MS", 50)
    engine = create_engine(f"sqlite:///{tmp_path / 'luthien.db'}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated SQLite file, then a migrated PostgreSQL database."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'luthien.db'}")
    else:
        server: PostgresServer = request.getfixturevalue("own_postgres")
        engine = create_engine(server.create_database(f"t_{uuid.uuid4().hex[:12]}"))
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own, since the tests stop and start it."""
    if find_bindir() is None and os.environ.get("LUTHIEN_REQUIRE_POSTGRES") != "1":
        pytest.skip("PostgreSQL is not installed")
    server = start_postgres(free_port())
    yield server
    remove(server)


@pytest.fixture
async def postgres_engine(own_postgres: PostgresServer) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(own_postgres.create_database(f"t_{uuid.uuid4().hex[:12]}"))
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.mark.anyio
async def test_a_locked_sqlite_database_delays_a_record_and_never_drops_it(
    sqlite_engine: AsyncEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = Attempts(monkeypatch)
    dead_letter = tmp_path / "dead.jsonl"
    recorder = DatabaseRecorder(sqlite_engine, Redactor(), dead_letter=dead_letter)
    refused_before = counter("luthien_recorder_refused_total")
    holder = sqlite3.connect(str(sqlite_engine.url.database), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write, and no other traffic
    tx = finished()
    with caplog.at_level(logging.INFO, logger="luthien_control.transactions"):
        recorder.record(tx)
        recorder.start()
        # The old writer took a single row refused three times for a refusal, and dropped it.
        await until(lambda: attempts.failed >= 6)
        assert await stored(sqlite_engine) == []
        holder.execute("COMMIT")
        holder.close()
        await until(lambda: recorder.backlog == 0)
        await recorder.stop()
    assert await stored(sqlite_engine) == [full(tx)]
    assert not dead_letter.exists()
    assert counter("luthien_recorder_refused_total") == refused_before
    where = describe_url(sqlite_engine.url)
    assert recorder_lines(caplog) == [
        f"cannot write transaction records, will retry: cannot reach the database at {where}: "
        "database is locked",
        "transaction records are being written again",
    ]


@pytest.mark.anyio
async def test_requests_are_not_held_back_while_the_database_is_away(
    sqlite_engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's pace holds new requests back only while it writes: in an outage the
    backlog (``RECORDER_BACKLOG``) rides it out and traffic goes on."""
    monkeypatch.setattr(recording, "PACE_ROWS", 2)
    attempts = Attempts(monkeypatch)
    recorder = DatabaseRecorder(sqlite_engine, Redactor(), dead_letter=tmp_path / "dead.jsonl")
    holder = sqlite3.connect(str(sqlite_engine.url.database), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    txs = [finished() for _ in range(3)]
    for tx in txs:
        recorder.record(tx)
    assert not recorder.paced.is_set()  # behind, and no outage known yet
    recorder.start()
    try:
        await until(lambda: attempts.failed >= 1)
        assert recorder.paced.is_set()  # the database is away: nobody waits
        recorder.record(finished())
        assert recorder.paced.is_set() and recorder.backlog == 4
        holder.execute("COMMIT")
        holder.close()
        await until(lambda: recorder.backlog == 0)
    finally:
        await recorder.stop()
    assert len(await stored(sqlite_engine)) == 4


async def refuse_model(engine: AsyncEngine) -> str:
    """Make the database refuse every row of model ``REFUSED_MODEL``; its reason."""
    async with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            await connection.execute(
                text(
                    "CREATE TRIGGER refuse_me BEFORE INSERT ON transactions "
                    f"WHEN NEW.model = '{REFUSED_MODEL}' "
                    "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
                )
            )
            return "refused for the test"
        await connection.execute(
            text(
                "ALTER TABLE transactions ADD CONSTRAINT refuse_me "
                f"CHECK (model IS NULL OR model <> '{REFUSED_MODEL}')"
            )
        )
        return 'new row for relation "transactions" violates check constraint "refuse_me"'


@pytest.mark.anyio
async def test_a_refused_row_goes_to_the_dead_letter_file_and_the_others_are_written(
    any_engine: AsyncEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = any_engine
    reason = await refuse_model(engine)
    dead_letter = tmp_path / "records" / "dead.jsonl"
    recorder = DatabaseRecorder(engine, Redactor(), dead_letter=dead_letter)
    refused_before = counter("luthien_recorder_refused_total")
    lost_before = counter("luthien_recorder_lost_total")
    first, refused, last = finished(), finished(REFUSED_MODEL), finished()
    with caplog.at_level(logging.INFO, logger="luthien_control.transactions"):
        for tx in (first, refused, last):
            recorder.record(tx)
        recorder.start()
        await until(lambda: recorder.backlog == 0)
        await recorder.stop()
    refusal = f"database error at {describe_url(engine.url)}: {reason}"
    assert await stored(engine) == [
        full(first),
        summary(
            refused,
            f"record refused by the database: {refusal}; whole in the dead-letter file "
            f"{dead_letter}",
        ),
        full(last),
    ]
    (line,) = dead_letter.read_text().splitlines()
    entry = json.loads(line)
    assert (entry["reason"], entry["row"]["id"]) == (refusal, refused.id)
    assert {k: entry["row"][k] for k in full(refused)} == full(refused)
    assert entry["row"]["response"]["sent"]["status"] == 200
    assert (dead_letter.stat().st_mode & 0o777) == 0o600
    assert counter("luthien_recorder_refused_total") == refused_before + 1
    assert counter("luthien_recorder_lost_total") == lost_before
    assert recorder_lines(caplog) == [
        f"record of transaction {refused.id} refused by the database, written to the "
        f"dead-letter file {dead_letter}: {refusal}"
    ]


@pytest.mark.anyio
async def test_a_refused_row_that_cannot_be_dead_lettered_is_counted_as_lost(
    sqlite_engine: AsyncEngine, tmp_path: Path
) -> None:
    reason = await refuse_model(sqlite_engine)
    recorder = DatabaseRecorder(sqlite_engine, Redactor(), dead_letter=tmp_path)  # a directory
    lost_before = counter("luthien_recorder_lost_total")
    refused, other = finished(REFUSED_MODEL), finished()
    recorder.record(refused)
    recorder.record(other)
    recorder.start()
    await until(lambda: recorder.backlog == 0)
    await recorder.stop()
    refusal = f"database error at {describe_url(sqlite_engine.url)}: {reason}"
    assert await stored(sqlite_engine) == [
        summary(
            refused,
            f"record refused by the database: {refusal}; whole lost (the dead-letter file "
            "could not be written)",
        ),
        full(other),
    ]
    assert counter("luthien_recorder_lost_total") == lost_before + 1


@pytest.mark.anyio
async def test_a_record_that_cannot_be_built_leaves_a_summary_row_and_the_writer_goes_on(
    sqlite_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, bad, after, later = finished(), finished(), finished(), finished()
    build = recording.build_record
    to_break = {bad.id}

    def build_once_broken(tx: Transaction, redactor: Redactor) -> dict[str, Any]:
        if tx.id in to_break:
            to_break.remove(tx.id)
            raise RuntimeError("a bug in build_record")
        return build(tx, redactor)

    monkeypatch.setattr(recording, "build_record", build_once_broken)
    recorder = DatabaseRecorder(sqlite_engine, Redactor(), dead_letter=Path("unused"))
    for tx in (before, bad, after):
        recorder.record(tx)
    recorder.start()
    await until(lambda: recorder.backlog == 0)
    recorder.record(later)
    await until(lambda: recorder.backlog == 0)
    await recorder.stop()
    assert await stored(sqlite_engine) == [
        full(before),
        summary(bad, "record could not be built: RuntimeError('a bug in build_record')"),
        full(after),
        full(later),
    ]


@pytest.mark.anyio
async def test_an_unexpected_error_in_the_writer_keeps_the_records_and_the_writer(
    sqlite_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = Attempts(monkeypatch, failing=1)
    recorder = DatabaseRecorder(sqlite_engine, Redactor(), dead_letter=Path("unused"))
    first, second = finished(), finished()
    with caplog.at_level(logging.INFO, logger="luthien_control.transactions"):
        recorder.record(first)
        recorder.record(second)
        recorder.start()
        await until(lambda: recorder.backlog == 0)
        later = finished()
        recorder.record(later)
        await until(lambda: recorder.backlog == 0)
        await recorder.stop()
    assert attempts.failed == 1
    assert await stored(sqlite_engine) == [full(first), full(second), full(later)]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "cannot write transaction records (a bug), will retry: RuntimeError('a bug in the insert')"
    ]
    assert errors[0].exc_info is None  # one line, no traceback


@pytest.mark.anyio
async def test_postgresql_stopped_and_restarted_while_records_queue_loses_none(
    own_postgres: PostgresServer,
    postgres_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    attempts = Attempts(monkeypatch)
    dead_letter = tmp_path / "dead.jsonl"
    recorder = DatabaseRecorder(postgres_engine, Redactor(), dead_letter=dead_letter)
    before = [finished() for _ in range(3)]
    during = [finished() for _ in range(4)]
    after = [finished() for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="luthien_control.transactions"):
        recorder.start()
        for tx in before:
            recorder.record(tx)
        await until(lambda: recorder.backlog == 0)
        await asyncio.to_thread(own_postgres.stop)
        for tx in during:
            recorder.record(tx)
        failed = attempts.failed
        await until(lambda: attempts.failed >= failed + 3)  # refused connections, retried
        await asyncio.to_thread(own_postgres.start)
        for tx in after:
            recorder.record(tx)
        await until(lambda: recorder.backlog == 0)
        await recorder.stop()
    assert await stored(postgres_engine) == [full(tx) for tx in before + during + after]
    assert not dead_letter.exists()
    lines = recorder_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "cannot write transaction records, will retry: cannot reach the database at "
        f"{describe_url(postgres_engine.url)}: "
    )
    assert lines[1] == "transaction records are being written again"


class TableLock:
    """Another client's write that holds the ``transactions`` table (SQLite: the whole
    file) until ``release``: the recorder's insert waits for it meanwhile."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sqlite: sqlite3.Connection | None = None
        self.postgres: Any = None

    async def hold(self) -> None:
        if self.engine.dialect.name == "sqlite":
            self.sqlite = sqlite3.connect(str(self.engine.url.database), isolation_level=None)
            self.sqlite.execute("BEGIN IMMEDIATE")
            return
        self.postgres = await self.engine.connect()
        await self.postgres.begin()
        await self.postgres.execute(text("LOCK TABLE transactions IN EXCLUSIVE MODE"))

    async def release(self) -> None:
        if self.sqlite is not None:
            self.sqlite.execute("COMMIT")
            self.sqlite.close()
        if self.postgres is not None:
            await self.postgres.commit()
            await self.postgres.close()


@pytest.mark.anyio
async def test_stopping_the_recorder_while_a_write_waits_for_a_lock_loses_no_record(
    any_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The soak's lost shutdown: the writer was cancelled in the middle of its insert,
    which waited for the lock, and on SQLite the abandoned connection kept its write
    transaction open until the garbage collector found it (the proxy collects rarely,
    ``server.GC_THRESHOLD``): every later write found the file locked, and the shutdown
    gave up on all of its records."""
    gc.disable()  # as rare as the proxy's collections
    try:
        await _stop_while_a_write_waits(any_engine, monkeypatch, tmp_path, caplog)
    finally:
        gc.enable()


async def _stop_while_a_write_waits(
    any_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = Attempts(monkeypatch)
    dead_letter = tmp_path / "dead.jsonl"
    recorder = DatabaseRecorder(any_engine, Redactor(), dead_letter=dead_letter)
    lock = TableLock(any_engine)
    await lock.hold()
    records = [finished() for _ in range(recording.BATCH_SIZE + 20)]
    with caplog.at_level(logging.INFO, logger="luthien_control.transactions"):
        for tx in records:
            recorder.record(tx)
        recorder.start()
        await until(lambda: attempts.calls >= 1)
        # The insert now waits for the lock (SQLite: its 5-second busy timeout), and the
        # shutdown stops the recorder; the lock goes soon after, well within the grace.
        await asyncio.sleep(0.3)
        stopping = asyncio.create_task(recorder.stop(grace=20))
        await asyncio.sleep(0.2)
        await lock.release()
        await stopping
    assert await stored(any_engine) == [full(tx) for tx in records]
    assert recorder.backlog == 0
    assert not dead_letter.exists()
    assert recorder_lines(caplog) == []


@pytest.mark.anyio
async def test_records_the_database_never_takes_before_shutdown_go_to_the_dead_letter_file(
    sqlite_engine: AsyncEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead_letter = tmp_path / "dead.jsonl"
    recorder = DatabaseRecorder(sqlite_engine, Redactor(), dead_letter=dead_letter)
    lock = TableLock(sqlite_engine)
    await lock.hold()  # through the whole shutdown
    records = [finished() for _ in range(3)]
    lost_before = counter("luthien_recorder_lost_total")
    with caplog.at_level(logging.INFO, logger="luthien_control.transactions"):
        for tx in records:
            recorder.record(tx)
        recorder.start()
        await recorder.stop(grace=0.5)
    await lock.release()
    assert await stored(sqlite_engine) == []
    assert recorder.backlog == recorder.backlog_bytes == 0
    locked = f"cannot reach the database at {describe_url(sqlite_engine.url)}: database is locked"
    lines = [json.loads(line) for line in dead_letter.read_text().splitlines()]
    assert [line["reason"] for line in lines] == [f"not written before shutdown: {locked}"] * 3
    assert [line["row"]["id"] for line in lines] == [tx.id for tx in records]
    assert [line["row"]["request"] for line in lines] == [full(tx)["request"] for tx in records]
    assert counter("luthien_recorder_lost_total") == lost_before
    assert recorder_lines(caplog) == [
        f"cannot write transaction records, will retry: {locked}",
        "shutting down with 3 unwritten record(s): database unreachable; written to the "
        f"dead-letter file {dead_letter}",
    ]


def test_the_dead_letter_file_is_next_to_the_sqlite_file_or_where_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "data" / "luthien_control.db"
    assert default_dead_letter(f"sqlite+aiosqlite:///{database}") == Path(
        f"{database}-dead-letter.jsonl"
    )
    assert default_dead_letter("postgresql+asyncpg://u@db/luthien") == (
        tmp_path / "luthien_control-dead-letter.jsonl"
    )
    from luthien_control.app import Services

    configured = tmp_path / "elsewhere.jsonl"
    services = Services.create(
        Settings(database_url=f"sqlite:///{database}", recorder_dead_letter=configured)
    )
    assert services.recorder is not None and services.recorder.dead_letter == configured
