"""SQLite: the search index is written once per batch of records, not by a trigger per row.

An ``AFTER INSERT`` trigger on ``transaction_texts`` fed the FTS5 table one row at a time,
and each trigger statement made FTS5 write its pending terms to disk as a new segment:
about 50 µs of SQLite's time per record whatever its text (``docs/performance.md``). The
recorder now indexes the rows it has just inserted with one statement per batch
(``transactions.insert_records``). The delete and update triggers stay: nothing on the
request path deletes or updates a search text.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER transaction_texts_ai")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER transaction_texts_ai AFTER INSERT ON transaction_texts BEGIN "
            "INSERT INTO transaction_texts_fts(rowid, text) VALUES (new.seq, new.text); END"
        )
