"""Text search in prompts and answers: ``transaction_texts`` and each database's index
of it (SQLite: an FTS5 table with the trigram tokenizer, kept by triggers; PostgreSQL:
the pg_trgm extension and a GIN index). The records already stored are filled in.

The index on ``received_at`` becomes one that also covers what the overview reads, so
that its range read never visits the table's wide rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH = 2000  # records read and written at a time


OVERVIEW_COLUMNS = [
    "received_at",
    "outcome",
    "flagged",
    "total_tokens",
    "duration_ms",
    "client_first_byte_at",
]


def upgrade() -> None:
    op.create_index("ix_transactions_overview", "transactions", OVERVIEW_COLUMNS)
    op.drop_index("ix_transactions_received_at", table_name="transactions")
    op.create_table(
        "transaction_texts",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_transaction_texts"),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        # External content: the text is stored once, in transaction_texts; the FTS5 table
        # holds only its trigram index.
        for statement in (
            "CREATE VIRTUAL TABLE transaction_texts_fts USING fts5(text, "
            "content='transaction_texts', content_rowid='seq', tokenize='trigram')",
            "CREATE TRIGGER transaction_texts_ai AFTER INSERT ON transaction_texts BEGIN "
            "INSERT INTO transaction_texts_fts(rowid, text) VALUES (new.seq, new.text); END",
            "CREATE TRIGGER transaction_texts_ad AFTER DELETE ON transaction_texts BEGIN "
            "INSERT INTO transaction_texts_fts(transaction_texts_fts, rowid, text) "
            "VALUES ('delete', old.seq, old.text); END",
            "CREATE TRIGGER transaction_texts_au AFTER UPDATE ON transaction_texts BEGIN "
            "INSERT INTO transaction_texts_fts(transaction_texts_fts, rowid, text) "
            "VALUES ('delete', old.seq, old.text); "
            "INSERT INTO transaction_texts_fts(rowid, text) VALUES (new.seq, new.text); END",
        ):
            op.execute(statement)
    _backfill()
    if dialect == "postgresql":
        # pg_trgm is a trusted extension (PostgreSQL 13+): the database's owner, or anyone
        # with CREATE on it, may create it (docs/operations.md). The index is built after
        # the backfill: once, not row by row.
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(
            "CREATE INDEX ix_transaction_texts_text ON transaction_texts "
            "USING gin (text gin_trgm_ops)"
        )


def _backfill() -> None:
    """The search text of every stored record, read in batches by ``seq``."""
    from luthien_control.db.search import search_text

    connection = op.get_bind()
    last = 0
    while True:
        rows = connection.execute(
            sa.text(
                "SELECT seq, endpoint, request, response FROM transactions "
                "WHERE seq > :last ORDER BY seq LIMIT :batch"
            ),
            {"last": last, "batch": BACKFILL_BATCH},
        ).all()
        if not rows:
            return
        connection.execute(
            sa.text("INSERT INTO transaction_texts (seq, text) VALUES (:seq, :text)"),
            [
                {"seq": seq, "text": search_text(endpoint, request, response)}
                for seq, endpoint, request, response in rows
            ],
        )
        last = rows[-1][0]


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE transaction_texts_fts")
    op.drop_table("transaction_texts")  # its triggers and its index with it
    op.create_index("ix_transactions_received_at", "transactions", ["received_at"])
    op.drop_index("ix_transactions_overview", table_name="transactions")
