"""Transaction records: every value comes back as it was written, on both databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import SerializedJSON, create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.db.models import TransactionRow
from luthien_control.db.transactions import (
    TransactionFilter,
    get_transaction,
    insert_records,
    list_transactions,
    overview,
)
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


# Text search (db/search.py) and the overview's figures, on both databases.


def conversation(transaction_id: str, prompt: str, answer: str, **changes: Any) -> dict[str, Any]:
    """A chat completion's record: ``prompt`` asked, ``answer`` given (both as recorded)."""
    request = {
        "received": {"body": {"model": "m", "messages": [{"role": "user", "content": prompt}]}},
        "sent": None,
    }
    response = {
        "received": None,
        "sent": {"status": 200, "body": {"choices": [{"message": {"content": answer}}]}},
    }
    return row(
        transaction_id,
        request=SerializedJSON(json.dumps(request)),
        response=response,
        **changes,
    )


async def found(db: AsyncEngine, search: str, **where: Any) -> list[str]:
    rows = await list_transactions(
        db, TransactionFilter(search=search, **where), limit=10, by_seq=True
    )
    return [r["id"][0] for r in rows]


async def test_a_search_finds_a_word_of_a_prompt_or_an_answer_never_a_secret(
    db: AsyncEngine,
) -> None:
    await insert_records(
        db,
        [
            conversation("a" * 32, "Book a table in Zürich", "Done: table for two."),
            conversation("b" * 32, "My key is [REDACTED], keep it", "Noted.", outcome="blocked"),
            conversation("c" * 32, "50% off_sale", "Quokkas are marsupials."),
            # A record with nothing to read (a summary row) is stored, and found by nothing.
            row("d" * 32, request=SerializedJSON('{"received":null,"sent":null}')),
        ],
    )
    assert await found(db, "table") == ["a"]  # the prompt and the answer: found once
    assert await found(db, "TABLE FOR") == ["a"]  # any case, across words
    assert await found(db, "zürich") == ["a"]
    assert await found(db, "quokka") == ["c"]  # the answer
    assert await found(db, "arsupial") == ["c"]  # inside a word
    assert await found(db, "[REDACTED]") == ["b"]
    assert await found(db, "sk-proj") == []  # what was redacted is nowhere to be found
    assert await found(db, "50% off_") == ["c"]  # % and _ are themselves, not patterns
    assert await found(db, "0%_") == []
    assert await found(db, 'a "table') == []
    assert await found(db, "Zürich Done") == []  # no match spans two parts
    assert await found(db, "key", outcome="blocked") == ["b"]
    assert await found(db, "key", outcome="ok") == []


async def test_a_search_pages_by_record_number(db: AsyncEngine) -> None:
    await insert_records(
        db, [conversation(c * 32, f"weather report {c}", "Sunny.") for c in "abcde"]
    )
    seqs = {r["id"][0]: r["seq"] for r in await list_transactions(db, TransactionFilter())}
    assert await found(db, "weather") == ["e", "d", "c", "b", "a"]
    assert await found(db, "weather", before_seq=seqs["c"]) == ["b", "a"]
    assert await found(db, "weather", after_seq=seqs["c"]) == ["e", "d"]
    assert await found(db, "report c", before_seq=seqs["c"]) == []


async def test_a_batch_written_again_keeps_one_search_text(db: AsyncEngine) -> None:
    await insert_records(db, [conversation("a" * 32, "first words", "x")])
    await insert_records(
        db, [conversation("a" * 32, "second words", "x"), conversation("b" * 32, "other", "y")]
    )
    async with db.connect() as connection:
        texts = (
            await connection.execute(text("SELECT seq, text FROM transaction_texts ORDER BY seq"))
        ).all()
    seqs = {r["id"][0]: r["seq"] for r in await list_transactions(db, TransactionFilter())}
    assert [tuple(t) for t in texts] == [
        (seqs["a"], "user: first words\nx"),
        (seqs["b"], "user: other\ny"),
    ]
    assert await found(db, "words") == ["a"]
    assert await found(db, "second") == []
    if db.dialect.name == "sqlite":
        await assert_search_index_holds(db)


async def assert_search_index_holds(db: AsyncEngine) -> None:
    """SQLite: FTS5's own check that its index lists exactly the stored texts (it fails
    on a text indexed twice, or not at all)."""
    from luthien_control.db.search import FTS_TABLE

    async with db.begin() as connection:
        await connection.execute(
            text(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('integrity-check')")
        )


async def test_each_batch_indexes_its_own_texts(db: AsyncEngine) -> None:
    """The recorder indexes a batch's texts itself (SQLite: one statement per batch, not
    a trigger per row): records of several batches, one written twice, are each found."""
    batches = [
        [conversation(f"{c}{k}" * 16, f"word{c}{k} shared", "x") for k in range(3)] for c in "abc"
    ]
    for batch in (batches[0], batches[1], batches[1], batches[2]):
        await insert_records(db, batch)
    assert sorted(await found(db, "shared")) == sorted("aaabbbccc")
    assert await found(db, "wordb1") == ["b"]
    if db.dialect.name == "sqlite":
        await assert_search_index_holds(db)


@pytest.mark.parametrize(
    ("endpoint", "request_body", "answer", "expected"),
    [
        (
            "/responses",
            {"instructions": "Be terse.", "input": "What is a quokka?"},
            {"body": {"output": [{"type": "message", "content": [{"text": "A marsupial."}]}]}},
            "system: Be terse.\n\nuser: What is a quokka?\nA marsupial.",
        ),
        (
            "/messages",
            {"system": "Be terse.", "messages": [{"role": "user", "content": "Hi"}]},
            # A stream's assembled answer, as the recorder stores it
            {"body": None, "stream": {"message": {"content": [{"type": "text", "text": "Yo"}]}}},
            "system: Be terse.\n\nuser: Hi\nYo",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "Call it"}]},
            {
                "body": {
                    "choices": [
                        {
                            "message": {
                                "tool_calls": [
                                    {"function": {"name": "lookup", "arguments": '{"q":"x"}'}}
                                ]
                            }
                        }
                    ]
                }
            },
            'user: Call it\n[tool call] lookup: {"q":"x"}',
        ),
    ],
)
def test_the_search_text_of_each_dialect(
    endpoint: str, request_body: dict[str, Any], answer: dict[str, Any], expected: str
) -> None:
    from luthien_control.db.search import search_text

    request = {"received": {"body": request_body}, "sent": None}
    response = {"received": None, "sent": {"status": 200, **answer}}
    assert search_text(endpoint, json.dumps(request), response) == expected


def test_the_search_text_keeps_the_start_and_the_end_of_a_long_prompt() -> None:
    from luthien_control.db.search import PROMPT_HEAD_CHARS, PROMPT_TAIL_CHARS, search_text

    turns = [{"role": "user", "content": f"turn {k:05d} " + "x" * 100} for k in range(400)]
    request = {"received": {"body": {"messages": turns}}, "sent": None}
    kept = search_text("/chat/completions", request, None)
    assert len(kept) == PROMPT_HEAD_CHARS + 1 + PROMPT_TAIL_CHARS
    assert kept.startswith("user: turn 00000") and "turn 00399" in kept
    assert "turn 00100" not in kept


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("ab", "a search needs at least 3 characters"),
        ("  ab  ", "a search needs at least 3 characters"),
        ("x" * 201, "a search has at most 200 characters"),
        ("ab\x00", "a search cannot hold a NUL character"),
    ],
)
def test_a_search_too_short_or_too_long_is_refused(given: str, message: str) -> None:
    from luthien_control.db.search import checked_query
    from luthien_control.exceptions import ClientError

    with pytest.raises(ClientError, match=message):
        checked_query(given)


async def test_the_search_reads_its_index(db: AsyncEngine) -> None:
    """A search on a few thousand realistic records can read the database's search index,
    not every text (the 1M-record timings and plans: docs/performance.md)."""
    from luthien_control.bench.records import RARE, records
    from luthien_control.db.search import FTS_TABLE, GIN_INDEX
    from luthien_control.db.transactions import listing

    batch = list(records(3000, days=1))
    for start in range(0, len(batch), 1000):
        await insert_records(db, batch[start : start + 1000])
    # The traffic page's query, as it pages: newest first by record number.
    statement = listing(db.dialect.name, TransactionFilter(search=RARE), by_seq=True).limit(51)
    async with db.connect() as connection:
        if db.dialect.name == "postgresql":
            # At 3,000 rows reading every text (in a scan or by seq) is cheaper, and
            # PostgreSQL rightly does; with those priced out, as they are at scale for a
            # rare word, the search must have an index to read.
            await connection.execute(text("ANALYZE"))
            await connection.execute(text("SET enable_seqscan = off"))
            await connection.execute(text("SET enable_indexscan = off"))  # a walk by seq
        compiled = statement.compile(db.sync_engine, compile_kwargs={"literal_binds": True})
        plan = "\n".join(
            " ".join(str(v) for v in line)
            for line in await connection.execute(text(f"EXPLAIN {compiled}"))
        )
        if db.dialect.name == "sqlite":
            plan = "\n".join(
                str(line[-1])
                for line in await connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))
            )
    if db.dialect.name == "sqlite":
        # Read from the FTS5 index in record order, each match joined to its record.
        assert plan.splitlines() == [
            f"SCAN {FTS_TABLE} VIRTUAL TABLE INDEX 192:M1",
            "SEARCH transactions USING INTEGER PRIMARY KEY (rowid=?)",
        ], plan
    else:
        assert f"Bitmap Index Scan on {GIN_INDEX}" in plan, plan
    assert await found(db, RARE) == []  # one in 100,000 records: none of these 3,000
    assert len(await found(db, "weather")) == 10


async def test_records_stored_before_0006_are_found_after_the_upgrade(
    request: pytest.FixtureRequest, sqlite_url: str
) -> None:
    from alembic import command
    from sqlalchemy.engine import Connection

    from luthien_control.db.init_db import alembic_config

    def to_0005(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0005")

    for url in (sqlite_url, request.getfixturevalue("postgres_url")):
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(to_0005)
            # As the recorder of 0005 wrote them: the transactions only.
            table = TransactionRow.__table__
            async with engine.begin() as connection:
                await connection.execute(
                    table.insert(),  # type: ignore[attr-defined]
                    [
                        conversation("a" * 32, "Old question", "Old [REDACTED] answer"),
                        conversation("b" * 32, "Other", "Reply"),
                    ],
                )
            assert await upgrade(engine) == "0007"
            assert await found(engine, "old question") == ["a"]
            assert await found(engine, "[redacted] answer") == ["a"]
            await insert_records(engine, [conversation("c" * 32, "New question", "x")])
            assert await found(engine, "question") == ["c", "a"]
        finally:
            await engine.dispose()


async def test_the_overview_of_the_last_hour_and_day(db: AsyncEngine) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    def at(ago: timedelta, ttft_ms: float | None, **changes: Any) -> dict[str, Any]:
        received = now - ago
        first = None if ttft_ms is None else received + timedelta(milliseconds=ttft_ms)
        return {"received_at": received, "client_first_byte_at": first, **changes}

    minutes = timedelta(minutes=1)
    await insert_records(
        db,
        [
            row("a" * 32, **at(2.5 * minutes, 100, duration_ms=400, total_tokens=10, flagged=True)),
            row(
                "b" * 32,
                **at(2.5 * minutes, 20, duration_ms=25, outcome="blocked", total_tokens=None),
            ),
            row("c" * 32, **at(32.5 * minutes, 300.5, duration_ms=900, total_tokens=30)),
            row(
                "d" * 32, **at(210 * minutes, 200, duration_ms=1000, total_tokens=50, flagged=True)
            ),
            row(
                "e" * 32,
                **at(210 * minutes, None, duration_ms=5, outcome="rejected", total_tokens=None),
            ),
            row("f" * 32, **at(25 * 60 * minutes, 1, duration_ms=1)),  # older than a day
        ],
    )
    hour, day = await overview(db, now)
    assert {k: hour[k] for k in ("label", "start", "total", "tokens", "flagged", "outcomes")} == {
        "label": "last hour",
        "start": now - timedelta(hours=1),
        "total": 3,
        "tokens": 40,
        "flagged": 1,
        "outcomes": {"ok": 2, "blocked": 1},
    }
    assert hour["ttft"] == {50: 100.0, 90: 300.5, 99: 300.5}
    assert hour["duration"] == {50: 400.0, 90: 900.0, 99: 900.0}
    assert [b["start"] for b in hour["buckets"]] == [
        now - timedelta(minutes=60 - 5 * k) for k in range(12)
    ]
    assert [
        (b["requests"], b["blocked"], b["flagged"], b["tokens"], b["ttft_p90"])
        for b in hour["buckets"]
    ] == [(0, 0, 0, 0, None)] * 5 + [(1, 0, 0, 30, 300.5)] + [(0, 0, 0, 0, None)] * 5 + [
        (2, 1, 1, 10, 100.0)
    ]
    assert (day["total"], day["tokens"], day["flagged"]) == (5, 90, 2)
    assert day["outcomes"] == {"ok": 3, "blocked": 1, "rejected": 1}
    assert day["ttft"] == {50: 100.0, 90: 300.5, 99: 300.5}
    assert day["duration"] == {50: 400.0, 90: 1000.0, 99: 1000.0}
    assert [b["requests"] for b in day["buckets"]] == [0] * 20 + [2, 0, 0, 3]
    assert [b["ttft_p90"] for b in day["buckets"]][20:] == [200.0, None, None, 300.5]


async def test_percentiles_are_by_nearest_rank(db: AsyncEngine) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    async def percentiles(durations: list[float]) -> dict[int, float | None]:
        await insert_records(
            db,
            [
                row(f"{k:032x}", received_at=now - timedelta(seconds=k + 1), duration_ms=d)
                for k, d in enumerate(durations)
            ],
        )
        hour, _ = await overview(db, now)
        async with db.begin() as connection:
            await connection.execute(text("DELETE FROM transactions"))
        return dict(hour["duration"])

    assert await percentiles([float(v) for v in range(100, 0, -1)]) == {50: 50, 90: 90, 99: 99}
    assert await percentiles([7.0]) == {50: 7, 90: 7, 99: 7}
    assert await percentiles([4.0, 1.0, 3.0, 2.0]) == {50: 2, 90: 4, 99: 4}
    assert await percentiles([]) == {50: None, 90: None, 99: None}
