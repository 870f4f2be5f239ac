"""Transaction records: written in batches by the recorder, read by ``logs`` and the
admin API."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Float, Select, Table, func, or_, select, text, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from luthien_control.db.engine import describe_url, transaction, translate_errors
from luthien_control.db.models import ClientKeyRow, ReviewRow, TransactionRow
from luthien_control.db.search import FTS_TABLE, SEARCH_TEXT, fts_match, matching_seqs, search_text
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
        sql, columns = _sqlite_insert(engine.dialect, tuple(k for k in rows[0] if k != SEARCH_TEXT))
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
            # The write lock is held from the first insert: no other writer adds texts
            # until the commit, so the texts above ``indexed`` are this batch's new ones.
            indexed = (await connection.exec_driver_sql(_SQLITE_LAST_TEXT)).scalar_one()
            await connection.exec_driver_sql(
                _SQLITE_TEXT_INSERT, [(row["text"], row["id"]) for row in texts]
            )
            await connection.exec_driver_sql(_SQLITE_TEXT_INDEX, (indexed,))
            await _touch_keys(connection, rows)
        return
    from sqlalchemy.dialects import postgresql

    statement = postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
    texts = _texts(rows)
    columns_only = [{k: v for k, v in row.items() if k != SEARCH_TEXT} for row in rows]
    async with translate_errors(engine), engine.begin() as connection:
        await connection.execute(statement, columns_only)
        await connection.execute(_POSTGRESQL_TEXT_INSERT, texts)
        await _touch_keys(connection, rows)


# Each record's search text beside it, under the seq the insert gave it; a record already
# stored (a batch written again) keeps the text it has.
_SQLITE_TEXT_INSERT = (
    "INSERT INTO transaction_texts (seq, text) SELECT seq, ? FROM transactions WHERE id = ? "
    "ON CONFLICT DO NOTHING"
)
# SQLite's FTS5 index of the texts just inserted, in one statement: FTS5 writes its pending
# terms to disk once per statement, so a trigger per row (migration 0006's, dropped by
# 0007) cost a segment per record.
_SQLITE_LAST_TEXT = "SELECT coalesce(max(seq), 0) FROM transaction_texts"
_SQLITE_TEXT_INDEX = (
    f"INSERT INTO {FTS_TABLE} (rowid, text) SELECT seq, text FROM transaction_texts WHERE seq > ?"
)
_POSTGRESQL_TEXT_INSERT = text(
    "INSERT INTO transaction_texts (seq, text) SELECT seq, CAST(:text AS TEXT) "
    "FROM transactions WHERE id = :id ON CONFLICT DO NOTHING"
)


def _texts(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Each row's search text (``SEARCH_TEXT``, else ``search.search_text`` of its
    documents); a record whose text cannot be read (a bug) is stored all the same, found
    by no search."""
    texts = []
    for row in rows:
        try:
            found = row.get(SEARCH_TEXT)
            if found is None:
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
    statement = listing(engine.dialect.name, where, oldest_first=oldest_first, by_seq=by_seq)
    async with transaction(engine) as session:
        result = await session.execute(statement.limit(limit))
        return [dict(zip(SUMMARY_COLUMNS, row, strict=True)) for row in result]


def listing(
    dialect: str, where: TransactionFilter, *, oldest_first: bool = False, by_seq: bool = False
) -> Select[Any]:
    """The query of ``list_transactions`` (without its limit)."""
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
    order: Any = TransactionRow.seq
    if where.search and dialect == "sqlite" and (oldest_first or by_seq):
        # Read from the FTS index in record order, joined to each record, until the page
        # is full: a common word costs a page, not every match (docs/performance.md).
        index, found = fts_match(where.search, where.after_seq, where.before_seq)
        statement = statement.join_from(
            TransactionRow, index, index.c.rowid == TransactionRow.seq
        ).where(*found)
        order = index.c.rowid
    elif where.search:
        statement = statement.where(
            TransactionRow.seq.in_(
                matching_seqs(
                    dialect,
                    where.search,
                    after_seq=where.after_seq,
                    before_seq=where.before_seq,
                )
            )
        )
    if oldest_first:
        statement = statement.order_by(order)
    elif by_seq:
        statement = statement.order_by(order.desc())
    else:
        statement = statement.order_by(TransactionRow.received_at.desc(), TransactionRow.seq.desc())
    return statement


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
        if engine.dialect.name == "sqlite":
            return await _sqlite_windows(session, now, windows)
        return [
            await _window(session, label, now - span, now, count) for label, span, count in windows
        ]


async def _sqlite_windows(
    session: Any, now: datetime, windows: Sequence[tuple[str, timedelta, int]]
) -> list[dict[str, Any]]:
    """SQLite: the widest window's columns read once, through the driver (SQLite has no
    percentile, and its date functions cost more per row than reading the text does);
    counted and ranked here. The times are SQLAlchemy's stored text, in UTC."""
    stored = "%Y-%m-%d %H:%M:%S.%f"
    earliest = min(now - span for _, span, _ in windows)
    connection = await session.connection()
    result = await connection.exec_driver_sql(
        "SELECT received_at, client_first_byte_at, duration_ms, outcome, flagged, total_tokens "
        "FROM transactions WHERE received_at >= ? AND received_at <= ?",
        (earliest.astimezone(UTC).strftime(stored), now.astimezone(UTC).strftime(stored)),
    )
    parse = datetime.fromisoformat
    rows = []
    for received, first, duration_ms, outcome, flagged, tokens in result.all():
        at = parse(received).replace(tzinfo=UTC)
        ttft = None if first is None else (parse(first).replace(tzinfo=UTC) - at) / _MS
        rows.append((at, ttft, duration_ms, outcome, flagged, tokens))
    summaries = []
    for label, span, count in windows:
        start = now - span
        width = span / count
        buckets = _buckets(start, width, count)
        ttfts: list[list[float]] = [[] for _ in range(count)]
        outcomes: dict[str, int] = {}
        all_ttfts: list[float] = []
        durations: list[float] = []
        for at, ttft, duration_ms, outcome, flagged, tokens in rows:
            if at < start:
                continue
            index = min(int((at - start) / width), count - 1)
            slot = buckets[index]
            slot["requests"] += 1
            slot["blocked"] += outcome == "blocked"
            slot["flagged"] += bool(flagged)
            slot["tokens"] += tokens or 0
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            durations.append(duration_ms)
            if ttft is not None:
                ttfts[index].append(ttft)
                all_ttfts.append(ttft)
        for slot, values in zip(buckets, ttfts, strict=True):
            slot["ttft_p90"] = _rounded(_nearest_rank(sorted(values), 90))
        all_ttfts.sort()
        durations.sort()
        summaries.append(
            _summary(
                label,
                start,
                buckets,
                outcomes,
                {p: _rounded(_nearest_rank(all_ttfts, p)) for p in PERCENTILES},
                {p: _nearest_rank(durations, p) for p in PERCENTILES},
            )
        )
    return summaries


_MS = timedelta(milliseconds=1)


def _nearest_rank(ordered: Sequence[float], p: int) -> float | None:
    """The smallest of the sorted values that at least ``p`` percent do not exceed."""
    if not ordered:
        return None
    return ordered[(p * len(ordered) + 99) // 100 - 1]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _buckets(start: datetime, width: timedelta, count: int) -> list[dict[str, Any]]:
    return [
        {
            "start": start + width * k,
            "requests": 0,
            "blocked": 0,
            "flagged": 0,
            "tokens": 0,
            "ttft_p90": None,
        }
        for k in range(count)
    ]


def _summary(
    label: str,
    start: datetime,
    buckets: list[dict[str, Any]],
    outcomes: dict[str, int],
    ttft: dict[int, float | None],
    duration: dict[int, float | None],
) -> dict[str, Any]:
    return {
        "label": label,
        "start": start,
        "total": sum(b["requests"] for b in buckets),
        "tokens": sum(b["tokens"] for b in buckets),
        "flagged": sum(b["flagged"] for b in buckets),
        "outcomes": outcomes,
        "ttft": ttft,
        "duration": duration,
        "buckets": buckets,
    }


async def _window(
    session: Any, label: str, start: datetime, now: datetime, count: int
) -> dict[str, Any]:
    """PostgreSQL: one pass by bucket, with its p90 TTFT (``percentile_disc`` is the
    nearest rank), one by outcome, one for the window's percentiles."""
    width = (now - start) / count
    received = _epoch(TransactionRow.received_at)
    ttft = (_epoch(TransactionRow.client_first_byte_at) - received) * 1000
    bucket = func.floor((received - start.timestamp()) / width.total_seconds()).label("bucket")
    within = (TransactionRow.received_at >= start, TransactionRow.received_at <= now)
    buckets = _buckets(start, width, count)
    grouped = (
        select(
            bucket,
            func.count(),
            func.count().filter(TransactionRow.outcome == "blocked"),
            func.count().filter(TransactionRow.flagged.is_(True)),
            func.coalesce(func.sum(TransactionRow.total_tokens), 0),
            func.percentile_disc(0.9).within_group(ttft),
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
    overall = select(
        *(func.percentile_disc(p / 100).within_group(ttft) for p in PERCENTILES),
        *(
            func.percentile_disc(p / 100).within_group(TransactionRow.duration_ms)
            for p in PERCENTILES
        ),
    ).where(*within)
    values = [None if v is None else float(v) for v in (await session.execute(overall)).one()]
    return _summary(
        label,
        start,
        buckets,
        outcomes,
        {p: _rounded(v) for p, v in zip(PERCENTILES, values[:3], strict=True)},
        dict(zip(PERCENTILES, values[3:], strict=True)),
    )


def _epoch(column: Any) -> Any:
    """PostgreSQL: seconds since the epoch of a time column (exact: a numeric)."""
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
