"""Transaction records: written in batches by the recorder, read by ``logs`` and the
admin API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import transaction, translate_errors
from luthien_control.db.models import TransactionRow

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
)


async def insert_records(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows in one transaction; a row whose id is already stored is skipped, so a
    batch retried after an ambiguous failure is never written twice."""
    if not rows:
        return
    # Core, not the ORM: one executemany with no per-row mapper work.
    # The dialect's own insert (ON CONFLICT), imported only for the database in use: a
    # SQLite proxy does not load SQLAlchemy's PostgreSQL dialect (~4 MB of RSS).
    table = cast(Table, TransactionRow.__table__)
    statement: Any
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        statement = postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
    else:
        from sqlalchemy.dialects import sqlite

        statement = sqlite.insert(table).on_conflict_do_nothing(index_elements=["id"])
    async with translate_errors(engine), engine.begin() as connection:
        await connection.execute(statement, list(rows))


@dataclass(frozen=True, slots=True)
class TransactionFilter:
    outcome: str | None = None
    model: str | None = None
    key_name: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int | None = None  # rows inserted after this one (``--follow``)


async def list_transactions(
    engine: AsyncEngine, where: TransactionFilter, *, limit: int = 50, oldest_first: bool = False
) -> list[dict[str, Any]]:
    """Summaries (``SUMMARY_COLUMNS``) of matching transactions, newest first by default."""
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
    if where.until is not None:
        statement = statement.where(TransactionRow.received_at <= where.until)
    if oldest_first:
        statement = statement.order_by(TransactionRow.seq)
    else:
        statement = statement.order_by(TransactionRow.received_at.desc(), TransactionRow.seq.desc())
    async with transaction(engine) as session:
        result = await session.execute(statement.limit(limit))
        return [dict(zip(SUMMARY_COLUMNS, row, strict=True)) for row in result]


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
        return {c.name: getattr(row, c.key) for c in TransactionRow.__table__.columns}
