"""Transaction records: written in batches by the recorder, read by ``logs`` and the
admin API."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Float, Integer, Table, func, null, or_, select, text, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from luthien_control.db.engine import describe_url, transaction, translate_errors
from luthien_control.db.models import ClientKeyRow, ReviewRow, TransactionRow
from luthien_control.db.search import matching_seqs, search_text
from luthien_control.exceptions import StorageRefused

logger = logging.getLogger(__name__)

SEEN_WINDOW = 10_000  # ids remembered while following, against rows committed late
LOOKBACK = 1000  # rows re-read on each poll while following

SUMMARY_COLUMNS = (
    "seq",
    "id",
    "received_at",
    "client_key_name",
    "policy_name",
    "method",
    "endpoint",
    "model",
    "streamed",
    "status",
    "outcome",
    "total_tokens",
    "duration_ms",
    "flagged",
)


async def insert_records(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows in one transaction; a row whose id is already stored is skipped, so a
    batch retried after an ambiguous failure is never written twice. ``StorageRefused``
    when the database refuses a row (nothing of the batch is written then), another
    ``StorageError`` when it cannot be reached or written at all."""
    if not rows:
        return
    # Core, not the ORM: one executemany with no per-row mapper work.
    # The dialect's own insert (ON CONFLICT), imported only for the database in use: a
    # SQLite proxy does not load SQLAlchemy's PostgreSQL dialect (~4 MB of RSS).
    table = cast(Table, TransactionRow.__table__)
    if engine.dialect.name == "sqlite":
        sql, columns = _sqlite_insert(engine.dialect, tuple(rows[0]))
        # Each value through its column type's own bind processor, then one executemany
        # at the driver: SQLAlchemy's per-row work for this statement cost about as
        # much CPU as SQLite's insert itself (docs/performance.md).
        try:
            values = [
                tuple(
                    row[key] if process is None else process(row[key]) for key, process in columns
                )
                for row in rows
            ]
        except (ValueError, TypeError, KeyError) as exc:  # as SQLAlchemy's would be: refused
            raise StorageRefused(
                f"database error at {describe_url(engine.url)}: a value cannot be stored: {exc!r}"
            ) from exc
        texts = _texts(rows)
        async with translate_errors(engine), engine.begin() as connection:
            await connection.exec_driver_sql(sql, values)
            await connection.exec_driver_sql(
                _SQLITE_TEXT_INSERT, [(row["text"], row["id"]) for row in texts]
            )
            await _touch_keys(connection, rows)
        return
    from sqlalchemy.dialects import postgresql

    statement = postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
    texts = _texts(rows)
    async with translate_errors(engine), engine.begin() as connection:
        await connection.execute(statement, list(rows))
        await connection.execute(_POSTGRESQL_TEXT_INSERT, texts)
        await _touch_keys(connection, rows)


# Each record's search text beside it, under the seq the insert gave it; a record already
# stored (a batch written again) keeps the text it has.
_SQLITE_TEXT_INSERT = (
    "INSERT INTO transaction_texts (seq, text) SELECT seq, ? FROM transactions WHERE id = ? "
    "ON CONFLICT DO NOTHING"
)
_POSTGRESQL_TEXT_INSERT = text(
    "INSERT INTO transaction_texts (seq, text) SELECT seq, CAST(:text AS TEXT) "
    "FROM transactions WHERE id = :id ON CONFLICT DO NOTHING"
)


def _texts(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Each row's search text (``search.search_text``); a record whose text cannot be
    read (a bug) is stored all the same, found by no search."""
    texts = []
    for row in rows:
        try:
            found = search_text(row["endpoint"], row["request"], row["response"])
        except Exception:
            logger.exception("cannot read the search text of transaction %s", row["id"])
            found = ""
        texts.append({"text": found, "id": row["id"]})
    return texts


async def _touch_keys(connection: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Each key's ``last_used_at``: the newest request of the batch made with it (one
    statement per key of the batch, never moving the time backwards)."""
    newest: dict[str, datetime] = {}
    for row in rows:
        name, at = row.get("client_key_name"), row["received_at"]
        if name is not None and (name not in newest or at > newest[name]):
            newest[name] = at
    for name, at in newest.items():
        await connection.execute(
            update(ClientKeyRow)
            .where(
                ClientKeyRow.name == name,
                or_(ClientKeyRow.last_used_at.is_(None), ClientKeyRow.last_used_at < at),
            )
            .values(last_used_at=at)
        )


@functools.cache
def _sqlite_insert(
    dialect: Dialect, keys: tuple[str, ...]
) -> tuple[str, list[tuple[str, Callable[[Any], Any] | None]]]:
    """The INSERT ... ON CONFLICT DO NOTHING of these columns, as SQLite's SQL text, and
    each parameter's key and bind processor, in the order the text takes them."""
    from sqlalchemy.dialects import sqlite

    table = cast(Table, TransactionRow.__table__)
    statement = sqlite.insert(table).on_conflict_do_nothing(index_elements=["id"])
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    order = compiled.positiontup
    assert order is not None and sorted(order) == sorted(keys), (order, keys)
    return str(compiled), [
        (key, table.c[key].type.dialect_impl(dialect).bind_processor(dialect)) for key in order
    ]


@dataclass(frozen=True, slots=True)
class TransactionFilter:
    outcome: str | None = None
    model: str | None = None
    key_name: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int | None = None  # rows inserted after this one (``--follow``)
    before_seq: int | None = None  # rows inserted before this one (the console's pages)
    flagged: bool | None = None  # only those a policy flagged for review (or only not)
    search: str | None = None  # only those whose prompt or answer holds it (search.py)


async def list_transactions(
    engine: AsyncEngine,
    where: TransactionFilter,
    *,
    limit: int = 50,
    oldest_first: bool = False,
    by_seq: bool = False,
) -> list[dict[str, Any]]:
    """Summaries (``SUMMARY_COLUMNS``) of matching transactions, newest first by default
    (by ``received_at``; by recording order with ``by_seq``: keyset pages with
    ``before_seq``, walking the primary key)."""
    columns = [getattr(TransactionRow, name) for name in SUMMARY_COLUMNS]
    statement = select(*columns)
    if where.outcome:
        statement = statement.where(TransactionRow.outcome == where.outcome)
    if where.model:
        statement = statement.where(TransactionRow.model == where.model)
    if where.key_name:
        statement = statement.where(TransactionRow.client_key_name == where.key_name)
    if where.since is not None:
        statement = statement.where(TransactionRow.received_at >= where.since)
    if where.after_seq is not None:
        statement = statement.where(TransactionRow.seq > where.after_seq)
    if where.before_seq is not None:
        statement = statement.where(TransactionRow.seq < where.before_seq)
    if where.flagged is not None:
        statement = statement.where(TransactionRow.flagged.is_(where.flagged))
    if where.until is not None:
        statement = statement.where(TransactionRow.received_at <= where.until)
    if where.search:
        statement = statement.where(
            TransactionRow.seq.in_(
                matching_seqs(
                    engine.dialect.name,
                    where.search,
                    after_seq=where.after_seq,
                    before_seq=where.before_seq,
                )
            )
        )
    if oldest_first:
        statement = statement.order_by(TransactionRow.seq)
    elif by_seq:
        statement = statement.order_by(TransactionRow.seq.desc())
    else:
        statement = statement.order_by(TransactionRow.received_at.desc(), TransactionRow.seq.desc())
    async with transaction(engine) as session:
        result = await session.execute(statement.limit(limit))
        return [dict(zip(SUMMARY_COLUMNS, row, strict=True)) for row in result]


PERCENTILES = (50, 90, 99)
# The overview's windows: (label, span, buckets of its charts).
WINDOWS = (("last hour", timedelta(hours=1), 12), ("last day", timedelta(days=1), 24))


async def overview(
    engine: AsyncEngine, now: datetime, windows: Sequence[tuple[str, timedelta, int]] = WINDOWS
) -> list[dict[str, Any]]:
    """What the transactions received in each window before ``now`` did, for the
    console's overview: ``{"label", "start", "total", "tokens", "flagged", "outcomes":
    {outcome: count}, "ttft": {p: ms}, "duration": {p: ms}, "buckets": [...]}``, each
    bucket ``{"start", "requests", "blocked", "flagged", "tokens", "ttft_p90"}``.

    Everything is counted and ranked by the database, on ``ix_transactions_overview``
    (which covers the columns read: the table's wide rows are never visited), and comes
    back as a few rows per bucket. Percentiles are exact, by nearest rank (the smallest
    value that at least p percent of the values do not exceed); TTFT runs from the
    request's arrival to the client's first byte."""
    async with transaction(engine) as session:
        return [
            await _window(session, engine.dialect.name, label, now - span, now, count)
            for label, span, count in windows
        ]


async def _window(
    session: Any, dialect: str, label: str, start: datetime, now: datetime, count: int
) -> dict[str, Any]:
    width = (now - start).total_seconds() / count
    received = _epoch(dialect, TransactionRow.received_at)
    ttft = (_epoch(dialect, TransactionRow.client_first_byte_at) - received) * 1000
    offset = (received - start.timestamp()) / width
    # Truncated on SQLite, floored on PostgreSQL (whose cast rounds): the same for >= 0.
    bucket = (sql_cast(offset, Integer) if dialect == "sqlite" else func.floor(offset)).label(
        "bucket"
    )
    within = (TransactionRow.received_at >= start, TransactionRow.received_at <= now)
    buckets: list[dict[str, Any]] = [
        {
            "start": start + timedelta(seconds=width * k),
            "requests": 0,
            "blocked": 0,
            "flagged": 0,
            "tokens": 0,
            "ttft_p90": None,
        }
        for k in range(count)
    ]
    postgresql = dialect == "postgresql"
    # One pass by bucket; on PostgreSQL its p90 TTFT in the same pass (percentile_disc is
    # the nearest rank), on SQLite ranked after (a window function).
    grouped = (
        select(
            bucket,
            func.count(),
            func.count().filter(TransactionRow.outcome == "blocked"),
            func.count().filter(TransactionRow.flagged.is_(True)),
            func.coalesce(func.sum(TransactionRow.total_tokens), 0),
            func.percentile_disc(0.9).within_group(ttft) if postgresql else null(),
        )
        .where(*within)
        .group_by(bucket)
    )
    for index, requests, blocked, flagged, tokens, ttft_p90 in await session.execute(grouped):
        slot = buckets[min(int(index), count - 1)]
        slot["requests"] += requests
        slot["blocked"] += blocked
        slot["flagged"] += flagged
        slot["tokens"] += int(tokens)
        if ttft_p90 is not None:
            slot["ttft_p90"] = round(float(ttft_p90), 3)
    by_outcome = select(TransactionRow.outcome, func.count()).where(*within)
    by_outcome = by_outcome.group_by(TransactionRow.outcome)
    outcomes = {str(o): int(n) for o, n in await session.execute(by_outcome)}
    if postgresql:
        overall = select(
            *(func.percentile_disc(p / 100).within_group(ttft) for p in PERCENTILES),
            *(
                func.percentile_disc(p / 100).within_group(TransactionRow.duration_ms)
                for p in PERCENTILES
            ),
        ).where(*within)
        values = (await session.execute(overall)).one()
        ranked = [
            (p, float(v)) for p, v in zip(PERCENTILES, values[:3], strict=True) if v is not None
        ]
        durations = {
            p: float(v) for p, v in zip(PERCENTILES, values[3:], strict=True) if v is not None
        }
    else:
        for index, value in await _ranks(session, ttft, within, (90,), bucket):
            buckets[min(int(index), count - 1)]["ttft_p90"] = round(value, 3)
        ranked = await _ranks(session, ttft, within, PERCENTILES)
        durations = dict(await _ranks(session, TransactionRow.duration_ms, within, PERCENTILES))
    ttfts = {p: round(v, 3) for p, v in ranked}
    return {
        "label": label,
        "start": start,
        "total": sum(b["requests"] for b in buckets),
        "tokens": sum(b["tokens"] for b in buckets),
        "flagged": sum(b["flagged"] for b in buckets),
        "outcomes": outcomes,
        "ttft": {p: ttfts.get(p) for p in PERCENTILES},
        "duration": {p: durations.get(p) for p in PERCENTILES},
        "buckets": buckets,
    }


async def _ranks(
    session: Any,
    value: Any,
    within: tuple[Any, ...],
    percentiles: Sequence[int],
    bucket: Any = None,
) -> list[tuple[Any, float]]:
    """The nearest-rank percentiles of ``value`` over the rows ``within``: ``(p, value)``
    for each of ``percentiles``; or, by ``bucket``, ``(bucket, value)`` of the one
    percentile given. Ranked by SQLite (a window function: it has no percentile)."""
    columns = [value.label("v")] + ([bucket] if bucket is not None else [])
    inner = select(*columns).where(*within, value.is_not(None)).subquery()
    partition = [inner.c.bucket] if bucket is not None else None
    ranked = select(
        *([inner.c.bucket] if bucket is not None else []),
        inner.c.v,
        func.row_number().over(partition_by=partition, order_by=inner.c.v).label("rank"),
        func.count().over(partition_by=partition).label("n"),
    ).subquery()
    # rank == ceil(p * n / 100), in integers: (rank - 1) * 100 < p * n <= rank * 100
    wanted = or_(
        *(
            ((ranked.c.rank - 1) * 100 < p * ranked.c.n) & (p * ranked.c.n <= ranked.c.rank * 100)
            for p in percentiles
        )
    )
    statement = select(
        ranked.c.bucket if bucket is not None else ranked.c.n, ranked.c.v, ranked.c.rank
    ).where(wanted)
    rows = (await session.execute(statement)).all()
    if bucket is not None:
        return [(index, float(v)) for index, v, _ in rows]
    found = []
    for n, v, rank in rows:
        for p in percentiles:
            if (rank - 1) * 100 < p * n <= rank * 100:
                found.append((p, float(v)))
    return found


def _epoch(dialect: str, column: Any) -> Any:
    """Seconds since the epoch of a time column, exact to the microsecond."""
    if dialect == "sqlite":  # stored as "YYYY-MM-DD HH:MM:SS.ffffff"
        whole = sql_cast(func.strftime("%s", column), Integer)
        return whole + sql_cast(func.substr(column, 20), Float)
    return sql_cast(func.extract("epoch", column), Float)


async def max_seq(engine: AsyncEngine) -> int:
    """The sequence number of the newest stored record (0 when there is none)."""
    async with transaction(engine) as session:
        return int(await session.scalar(select(func.max(TransactionRow.seq))) or 0)


async def get_transaction(engine: AsyncEngine, transaction_id: str) -> dict[str, Any] | None:
    """One transaction, whole."""
    async with transaction(engine) as session:
        row = await session.scalar(
            select(TransactionRow).where(TransactionRow.id == transaction_id)
        )
        if row is None:
            return None
        record = {c.name: getattr(row, c.key) for c in TransactionRow.__table__.columns}
        reviews = await session.scalars(
            select(ReviewRow)
            .where(ReviewRow.transaction_id == transaction_id)
            .order_by(ReviewRow.id)
        )
        record["reviews"] = [
            {
                "verdict": review.verdict,
                "note": review.note,
                "reviewer": review.reviewer,
                "reviewed_at": review.reviewed_at,
            }
            for review in reviews
        ]
        return record


async def follow_transactions(
    engine: AsyncEngine,
    where: TransactionFilter,
    *,
    interval: float,
    after_seq: int | None = None,
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Summaries of the matching transactions recorded from now on (or after the record
    ``after_seq``), each exactly once, in batches: one per poll, every ``interval``
    seconds, empty when nothing came.

    ``seq`` alone is not enough with several writers (workers, processes): a row with a
    lower ``seq`` can commit after one with a higher. Everything up to the starting point
    counts as seen; then each poll looks back ``LOOKBACK`` rows and skips the ids it has
    already given. ``logs --follow`` and the admin API's event stream both use it.
    """
    last_seq = await max_seq(engine) if after_seq is None else max(0, after_seq)
    window = TransactionFilter(after_seq=max(0, last_seq - LOOKBACK))
    earlier = await list_transactions(engine, window, limit=2 * LOOKBACK, oldest_first=True)
    seen = deque((r["id"] for r in earlier if r["seq"] <= last_seq), maxlen=SEEN_WINDOW)
    seen_ids = set(seen)
    while True:
        await asyncio.sleep(interval)
        lookback = replace(where, after_seq=max(0, last_seq - LOOKBACK))
        rows = await list_transactions(engine, lookback, limit=2 * LOOKBACK, oldest_first=True)
        fresh = [r for r in rows if r["id"] not in seen_ids]
        for record in fresh:
            if len(seen) == seen.maxlen:
                seen_ids.discard(seen[0])
            seen.append(record["id"])
            seen_ids.add(record["id"])
            last_seq = max(last_seq, record["seq"])
        yield fresh
