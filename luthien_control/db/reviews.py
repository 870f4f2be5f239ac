"""The review queue: transactions a policy flagged (``Transaction.flag``) wait for a person,
oldest first; a reviewer marks each ``fine`` or ``violation``, with a note. Verdicts are
kept, each with who gave it (the console session's label) and when; the newest counts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import transaction
from luthien_control.db.models import REVIEW_VERDICTS, ReviewRow, TransactionRow, utcnow
from luthien_control.db.transactions import SUMMARY_COLUMNS
from luthien_control.exceptions import ClientError, MalformedRequest, NotFound

MAX_NOTE = 10_000


async def add_review(
    engine: AsyncEngine, transaction_id: str, verdict: str, note: str, reviewer: str
) -> dict[str, Any]:
    """Store a verdict on a flagged transaction; it leaves the queue."""
    if verdict not in REVIEW_VERDICTS:
        raise MalformedRequest(
            f"a verdict is {' or '.join(REVIEW_VERDICTS)}, not {verdict[:50]!r}", param="verdict"
        )
    if len(note) > MAX_NOTE:
        raise MalformedRequest(f"a note is at most {MAX_NOTE} characters", param="note")
    async with transaction(engine) as session:
        flagged = await session.scalar(
            select(TransactionRow.flagged).where(TransactionRow.id == transaction_id)
        )
        if flagged is None:
            raise NotFound(f"no transaction {transaction_id!r}")
        if not flagged:
            raise ClientError("only a transaction a policy flagged is reviewed")
        row = ReviewRow(
            transaction_id=transaction_id,
            verdict=verdict,
            note=note.replace("\x00", ""),
            reviewer=reviewer,
            reviewed_at=utcnow(),
        )
        session.add(row)
        await session.flush()
        return _review(row)


async def review_queue(
    engine: AsyncEngine, *, limit: int = 50, after_seq: int | None = None
) -> list[dict[str, Any]]:
    """Flagged transactions no one has reviewed yet, oldest first (keyset pages on
    ``seq``; the ``flagged, seq`` index walks them in order)."""
    columns = [getattr(TransactionRow, name) for name in SUMMARY_COLUMNS]
    reviewed = exists().where(ReviewRow.transaction_id == TransactionRow.id)
    statement = select(*columns).where(TransactionRow.flagged.is_(True), ~reviewed)
    if after_seq is not None:
        statement = statement.where(TransactionRow.seq > after_seq)
    statement = statement.order_by(TransactionRow.seq).limit(limit)
    async with transaction(engine) as session:
        result = await session.execute(statement)
        return [dict(zip(SUMMARY_COLUMNS, row, strict=True)) for row in result]


def _review(row: ReviewRow) -> dict[str, Any]:
    return {
        "verdict": row.verdict,
        "note": row.note,
        "reviewer": row.reviewer,
        "reviewed_at": row.reviewed_at,
    }
