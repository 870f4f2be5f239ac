"""The tables, as typed SQLAlchemy models.

The schema itself is created by the Alembic migrations in ``migrations/versions``;
these models must match them (a test compares the two).
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from luthien_control.exceptions import MalformedRequest

# Constraint names are part of the schema: migrations must be able to name them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
NAME_LENGTH = 200
KEY_HASH_LENGTH = 64  # sha256, hex
KEY_PREFIX_LENGTH = 16  # column size; keys.KEY_PREFIX_CHARS are shown
ENDPOINT_LENGTH = 500


def utcnow() -> datetime:
    return datetime.now(UTC)


_UNSHOWN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def check_name(name: str, what: str) -> None:
    """Names are what people type on the command line: not blank, not too long."""
    if not name.strip():
        raise MalformedRequest(f"a {what} name must not be empty")
    if len(name) > NAME_LENGTH:
        raise MalformedRequest(f"a {what} name must be at most {NAME_LENGTH} characters")
    # Control and format characters (NUL, bidi overrides, zero-width) would make a name
    # show as another, or as nothing, where people read it.
    if any(unicodedata.category(char) in _UNSHOWN for char in name):
        raise MalformedRequest(
            f"a {what} name must not hold control or invisible formatting characters"
        )


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    SQLite has no time zones and gives naive values back; PostgreSQL gives them in the
    session's zone. Both come back as UTC, and naive values are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use an aware one (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ClientKeyRow(Base):
    """A key clients authenticate with. Only its sha256 is stored, never the key."""

    __tablename__ = "client_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    key_hash: Mapped[str] = mapped_column(String(KEY_HASH_LENGTH), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(KEY_PREFIX_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The newest request recorded with it (the recorder keeps it, a batch at a time).
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AdminSessionRow(Base):
    """A signed-in operator console session. Only the sha256 of its cookie is stored."""

    __tablename__ = "admin_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(KEY_HASH_LENGTH), unique=True)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))  # who: shown on reviews
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # signed out


class PolicyRow(Base):
    """A named control policy, serialized as ``{"type": ..., "config": ...}``."""

    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    # JSON, not PostgreSQL's JSONB: JSONB reorders keys, and a stored policy must come
    # back exactly as it was written.
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PolicyVersionRow(Base):
    """Every version a stored policy has had, kept so that any one can be looked at again
    and put back in force (``PolicyRow`` holds the version in force)."""

    __tablename__ = "policy_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)  # as written, like PolicyRow's
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Who stored it: a console session's label, "admin api", "cli"; None before 0005.
    created_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH))

    __table_args__ = (UniqueConstraint("policy_name", "version"),)


class TransactionRow(Base):
    """One transaction as it passed through the proxy, secrets redacted (the audit trail)."""

    __tablename__ = "transactions"

    # Insertion order, for following new records; ``id`` is the X-Luthien-Transaction-Id.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)  # ix_transactions_overview
    backend_first_byte_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    client_first_byte_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float] = mapped_column(Float)
    client_key_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    policy_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    method: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(ENDPOINT_LENGTH))
    model: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    streamed: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    usage_partial: Mapped[bool] = mapped_column(Boolean)
    chunks_sent: Mapped[int] = mapped_column(Integer)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"received": ..., "sent": ...}
    response: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"received": ..., "sent": ...}
    decisions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # A policy asked a person to look at it (``Transaction.flag``): the review queue.
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index("ix_transactions_flagged_seq", "flagged", "seq"),
        # By time, and covering what the console's overview reads (0006).
        Index(
            "ix_transactions_overview",
            "received_at",
            "outcome",
            "flagged",
            "total_tokens",
            "duration_ms",
            "client_first_byte_at",
        ),
    )


class TransactionTextRow(Base):
    """What a text search looks in, one row per transaction (``db/search.py``): the
    recorded prompt and answer, redacted as the record is. Its index is each database's
    own (made by migration 0006): an FTS5 trigram table on SQLite, a pg_trgm GIN index on
    PostgreSQL."""

    __tablename__ = "transaction_texts"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


REVIEW_VERDICTS = ("fine", "violation")


class ReviewRow(Base):
    """A person's verdict on a flagged transaction (the newest one counts)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_id: Mapped[str] = mapped_column(String(32), index=True)
    verdict: Mapped[str] = mapped_column(String(16))  # REVIEW_VERDICTS
    note: Mapped[str] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(NAME_LENGTH))  # the console session's label
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
