"""Transaction records: every value comes back as it was written, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import SerializedJSON, create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.db.transactions import get_transaction, insert_records
from luthien_control.exceptions import StorageError

pytestmark = pytest.mark.anyio

RECEIVED = datetime(2026, 11, 24, 15, 4, 5, 123456, tzinfo=UTC)


def row(transaction_id: str, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": transaction_id,
        "received_at": RECEIVED,
        # Another zone on the way in, UTC on the way out.
        "backend_first_byte_at": RECEIVED.astimezone(timezone(timedelta(hours=2))),
        "client_first_byte_at": None,
        "ended_at": RECEIVED + timedelta(microseconds=1),
        "duration_ms": 1.5,
        "client_key_name": "ci",
        "policy_name": "p",
        "method": "POST",
        "endpoint": "/chat/completions",
        "model": "gpt-4o-mini",
        "streamed": True,
        "status": 200,
        "outcome": "ok",
        "error": None,
        "prompt_tokens": 3,
        "completion_tokens": None,
        "total_tokens": 3,
        "usage_partial": False,
        "chunks_sent": 7,
        "request": SerializedJSON('{"received":{"body":"caf\\u00e9 ☕"},"sent":null}'),
        "response": {"received": None, "sent": {"status": 200}},
        "decisions": [],
        "flagged": False,
    }
    values.update(changes)
    return values


async def test_a_record_comes_back_exactly_as_written(db: AsyncEngine) -> None:
    await insert_records(db, [row("a" * 32), row("b" * 32, streamed=False, status=None)])
    stored = await get_transaction(db, "a" * 32)
    assert stored is not None
    seq = stored.pop("seq")
    assert stored == {
        **row("a" * 32),
        "backend_first_byte_at": RECEIVED,
        "request": {"received": {"body": "café ☕"}, "sent": None},
        "reviews": [],
    }
    other = await get_transaction(db, "b" * 32)
    assert other is not None and other["seq"] == seq + 1
    assert (other["streamed"], other["status"]) == (False, None)


async def test_a_batch_written_again_adds_nothing(db: AsyncEngine) -> None:
    await insert_records(db, [row("a" * 32)])
    await insert_records(db, [row("a" * 32, model="other"), row("c" * 32)])
    async with db.connect() as connection:
        stored = (await connection.execute(text("SELECT id, model FROM transactions"))).all()
    assert sorted(stored) == [("a" * 32, "gpt-4o-mini"), ("c" * 32, "gpt-4o-mini")]


async def test_sqlite_stores_the_text_sqlalchemys_dialect_writes(sqlite_url: str) -> None:
    # Times as SQLAlchemy's SQLite dialect writes them (no offset: they sort as time
    # does, and rows written by any version compare), booleans as 0 and 1.
    engine = create_engine(sqlite_url)
    try:
        await upgrade(engine)
        await insert_records(engine, [row("a" * 32)])
        async with engine.connect() as connection:
            stored = (
                await connection.execute(
                    text("SELECT received_at, backend_first_byte_at, streamed FROM transactions")
                )
            ).one()
    finally:
        await engine.dispose()
    assert tuple(stored) == ("2026-11-24 15:04:05.123456", "2026-11-24 15:04:05.123456", 1)


async def test_a_value_the_database_cannot_take_is_a_storage_error(db: AsyncEngine) -> None:
    # The recorder handles StorageError (the row is tried alone, then dropped and logged);
    # anything else would end its task.
    naive = RECEIVED.replace(tzinfo=None)
    with pytest.raises(StorageError, match="naive datetime"):
        await insert_records(db, [row("a" * 32), row("b" * 32, received_at=naive)])
    assert await get_transaction(db, "a" * 32) is None  # nothing of the batch was written


async def test_a_batch_tells_each_key_when_it_was_last_used(db: AsyncEngine) -> None:
    from luthien_control.db.keys import add_key, list_keys

    await add_key(db, "ci", "lc-ci-key")
    await add_key(db, "idle", "lc-idle-key")
    later = RECEIVED + timedelta(seconds=5)
    await insert_records(db, [row("a" * 32, received_at=later), row("b" * 32)])
    await insert_records(db, [row("c" * 32, client_key_name=None)])
    used = {k.name: k.last_used_at for k in await list_keys(db)}
    assert used == {"ci": later, "idle": None}
    await insert_records(db, [row("d" * 32)])  # an older request moves nothing back
    assert {k.name: k.last_used_at for k in await list_keys(db)}["ci"] == later
