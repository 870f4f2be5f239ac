"""Transaction records: written in batches by the recorder, read by ``logs`` and the
admin API."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Float, Integer, Table, func, or_, select, text, update
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

    One range read on the ``received_at`` index, of the widest window's timing columns
    only; counts, sums and exact percentiles (nearest rank; TTFT from the request's
    arrival to the client's first byte) are taken here."""
    widest = max(span for _, span, _ in windows)
    received = _epoch(engine.dialect.name, TransactionRow.received_at)
    ttft = _epoch(engine.dialect.name, TransactionRow.client_first_byte_at) - received
    statement = select(
        received,
        TransactionRow.outcome,
        TransactionRow.flagged,
        TransactionRow.total_tokens,
        TransactionRow.duration_ms,
        ttft,
    ).where(TransactionRow.received_at >= now - widest)
    async with transaction(engine) as session:
        rows = (await session.execute(statement)).all()
    end = now.timestamp()
    return [_window(label, now - span, end, count, rows) for label, span, count in windows]


def _epoch(dialect: str, column: Any) -> Any:
    """Seconds since the epoch of a time column, exact to the microsecond."""
    if dialect == "sqlite":  # stored as "YYYY-MM-DD HH:MM:SS.ffffff"
        whole = sql_cast(func.strftime("%s", column), Integer)
        return whole + sql_cast(func.substr(column, 20), Float)
    return sql_cast(func.extract("epoch", column), Float)


def _window(
    label: str, start: datetime, end: float, count: int, rows: Sequence[Any]
) -> dict[str, Any]:
    begin = start.timestamp()
    width = (end - begin) / count
    buckets: list[dict[str, Any]] = [
        {
            "start": start + timedelta(seconds=width * k),
            "requests": 0,
            "blocked": 0,
            "flagged": 0,
            "tokens": 0,
            "ttfts": [],
        }
        for k in range(count)
    ]
    outcomes: dict[str, int] = {}
    ttfts: list[float] = []
    durations: list[float] = []
    for at, outcome, flagged, tokens, duration_ms, ttft in rows:
        if at < begin:
            continue
        bucket = buckets[min(max(int((at - begin) // width), 0), count - 1)]
        bucket["requests"] += 1
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "blocked":
            bucket["blocked"] += 1
        if flagged:
            bucket["flagged"] += 1
        bucket["tokens"] += tokens or 0
        durations.append(duration_ms)
        if ttft is not None:
            ms = round(ttft * 1000, 3)
            ttfts.append(ms)
            bucket["ttfts"].append(ms)
    for bucket in buckets:
        bucket["ttft_p90"] = percentile(sorted(bucket.pop("ttfts")), 90)
    ttfts.sort()
    durations.sort()
    return {
        "label": label,
        "start": start,
        "total": sum(b["requests"] for b in buckets),
        "tokens": sum(b["tokens"] for b in buckets),
        "flagged": sum(b["flagged"] for b in buckets),
        "outcomes": outcomes,
        "ttft": {p: percentile(ttfts, p) for p in PERCENTILES},
        "duration": {p: percentile(durations, p) for p in PERCENTILES},
        "buckets": buckets,
    }


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile of sorted values by nearest rank: the smallest value that at
    least ``p`` percent of them do not exceed (None of no values)."""
    if not ordered:
        return None
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


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
