"""``python -m luthien_control.bench.records --database-url URL``: the console's queries on
a database of a million records.

Fills an empty database (migrated first) with realistic records through the recorder's
own insert (``insert_records``: the search text and its index are written as the proxy
writes them), then times the traffic page's query (the newest 50, keyset pages) with and
without a text search, and the overview's, each the median of ``--repeat`` runs. The
fill is slow (minutes), so it is no part of ``make test``; ``tests/db`` runs a few
thousand records through the same generator to check the query plans.

Records: chat completions (most), Responses and Anthropic Messages, one to five user and
assistant turns of everyday words, answers of a few sentences, streamed or not; outcomes,
models, keys and flags in the proportions of a busy proxy; received over ``--days`` days,
newest now. Seeded: the same flags give the same records.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text

from luthien_control.db.engine import SerializedJSON, create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.db.transactions import (
    TransactionFilter,
    insert_records,
    list_transactions,
    overview,
)

PROG = "python -m luthien_control.bench.records"
BATCH = 2000
POOL = 20_000  # sentences the records are made of
_VOCABULARY = (
    "the of and to in is that it for you was with on as have be at one this are from or by "
    "not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him "
    "see time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know get through "
    "back much before go good new write our used me man too any day same right look think "
    "also around another came come work three word must because does part even place well "
    "such here take why help put different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought both few "
    "those always show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animal life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year "
    "mother light parts country father let night following picture being study second eyes "
    "soon times story boys since white days ever paper hard near sentence better best across "
    "during today others however sure means knew try told young miles sun ways thing whole "
    "hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually money seen car morning given body family later "
    "order matter class weather function database deploy error invoice report summary python "
    "request server budget contract schedule meeting customer refund password migration"
)
WORDS = tuple(_VOCABULARY.split())
RARE = "quetzalcoatl"  # in RARE_EVERY records: a search that finds a handful
RARE_EVERY = 100_000
OUTCOMES = (
    ("ok", 0.93),
    ("blocked", 0.03),
    ("client_disconnected", 0.02),
    ("rejected", 0.01),
    ("backend_error_status", 0.01),
)
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "claude-sonnet-4", "o3-mini")
SEARCHES = (("common", "weather"), ("phrase", "invoice report"), ("rare", RARE), ("none", "zqxj"))


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[:1].upper() + text[1:] + "."


def _paragraph(rng: random.Random, pool: list[str], sentences: int) -> str:
    return " ".join(rng.choice(pool) for _ in range(sentences))


def records(count: int, days: float, seed: int = 7) -> Iterator[dict[str, Any]]:
    """``count`` records, oldest first, received evenly over the last ``days`` days."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    start = now - timedelta(days=days)
    step = timedelta(days=days) / max(count, 1)
    pool = [_sentence(rng, rng.randint(6, 18)) for _ in range(POOL)]
    outcomes = [name for name, _ in OUTCOMES]
    weights = [share for _, share in OUTCOMES]
    for index in range(count):
        received = start + step * (index + 1)
        turns = [
            {"role": "user" if k % 2 == 0 else "assistant", "content": _paragraph(rng, pool, 2)}
            for k in range(rng.choice((1, 1, 1, 3, 5)))
        ]
        if index % RARE_EVERY == RARE_EVERY // 2:
            turns[-1]["content"] += f" Tell me about {RARE}."
        answer = _paragraph(rng, pool, rng.randint(2, 5))
        outcome = rng.choices(outcomes, weights)[0]
        flavour = rng.random()
        if flavour < 0.8:
            endpoint = "/chat/completions"
            body: dict[str, Any] = {"model": "", "messages": turns}
            sent: dict[str, Any] = {"choices": [{"index": 0, "message": {"content": answer}}]}
        elif flavour < 0.9:
            endpoint = "/responses"
            body = {"model": "", "instructions": "Be brief.", "input": turns}
            sent = {
                "output": [
                    {"type": "message", "content": [{"type": "output_text", "text": answer}]}
                ]
            }
        else:
            endpoint = "/messages"
            body = {"model": "", "system": "Be brief.", "messages": turns}
            sent = {"type": "message", "content": [{"type": "text", "text": answer}]}
        model = rng.choice(MODELS)
        body["model"] = model
        streamed = rng.random() < 0.6
        ttft = rng.lognormvariate(-1.2, 0.6)  # seconds: a median of 0.3 s
        duration = ttft + rng.lognormvariate(0.3, 0.7)
        prompt_tokens = rng.randint(20, 2000)
        completion_tokens = rng.randint(10, 600)
        blocked = outcome in ("blocked", "rejected")
        answered = {"status": 200, "headers": {}, "body": None if streamed else sent}
        if streamed:
            answered["stream"] = sent
        yield {
            "id": f"{seed:08x}{index:024x}",
            "received_at": received,
            "backend_first_byte_at": None if blocked else received + timedelta(seconds=ttft),
            "client_first_byte_at": received + timedelta(seconds=ttft),
            "ended_at": received + timedelta(seconds=duration),
            "duration_ms": duration * 1000,
            "client_key_name": f"agent-{rng.randint(1, 20)}",
            "policy_name": "root",
            "method": "POST",
            "endpoint": endpoint,
            "model": model,
            "streamed": streamed,
            "status": 403 if blocked else 200,
            "outcome": outcome,
            "error": None,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "usage_partial": False,
            "chunks_sent": rng.randint(5, 200) if streamed else 0,
            "request": SerializedJSON(
                orjson.dumps({"received": {"headers": {}, "body": body}, "sent": None}).decode()
            ),
            "response": SerializedJSON(
                orjson.dumps({"received": answered, "sent": answered}).decode()
            ),
            "decisions": [],
            "flagged": rng.random() < 0.01,
        }


async def fill(url: str, count: int, days: float, *, progress: bool = True) -> float:
    """Migrate the database at ``url`` and write ``count`` records; the seconds it took."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        started = time.perf_counter()
        batch: list[dict[str, Any]] = []
        written = 0
        for record in records(count, days):
            batch.append(record)
            if len(batch) == BATCH:
                await insert_records(engine, batch)
                written += len(batch)
                batch = []
                if progress and written % 50_000 == 0:
                    elapsed = time.perf_counter() - started
                    print(f"  {written:,} records, {elapsed:.0f} s", file=sys.stderr)
        if batch:
            await insert_records(engine, batch)
        seconds = time.perf_counter() - started
        if engine.dialect.name == "postgresql":
            # As autovacuum would soon: the planner's statistics of the new rows.
            async with engine.begin() as connection:
                await connection.execute(text("ANALYZE"))
        return seconds
    finally:
        await engine.dispose()


async def _median_ms(run: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, Any]:
    result = await run()  # once to warm the caches, not counted
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


async def measure(url: str, repeat: int = 5) -> list[tuple[str, float, int]]:
    """``(what, median ms, rows)`` of each query the console makes."""
    engine = create_engine(url)
    figures: list[tuple[str, float, int]] = []

    async def page(where: TransactionFilter) -> list[dict[str, Any]]:
        return await list_transactions(engine, where, limit=51, by_seq=True)

    try:
        cases: list[tuple[str, TransactionFilter]] = [
            ("traffic, newest 50", TransactionFilter()),
            ("traffic, outcome=blocked", TransactionFilter(outcome="blocked")),
        ]
        first = await page(TransactionFilter())
        middle = first[0]["seq"] // 2 if first else 0
        for label, query in SEARCHES:
            cases.append((f"traffic, q={query!r} ({label})", TransactionFilter(search=query)))
        cases += [
            (
                "traffic, q='weather' outcome=blocked",
                TransactionFilter(search="weather", outcome="blocked"),
            ),
            (
                "traffic, q='weather', a page in the middle",
                TransactionFilter(search="weather", before_seq=middle),
            ),
        ]
        for label, where in cases:
            ms, rows = await _median_ms(functools.partial(page, where), repeat)
            figures.append((label, ms, len(rows)))

        async def windows() -> list[dict[str, Any]]:
            return await overview(engine, datetime.now(UTC))

        ms, shown = await _median_ms(windows, repeat)
        figures.append(("overview (hour and day)", ms, sum(w["total"] for w in shown)))
    finally:
        await engine.dispose()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="an empty database, or --no-fill")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=10.0, help="received over (default 10)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each query")
    parser.add_argument("--no-fill", action="store_true", help="measure the database as it is")
    args = parser.parse_args(argv)
    if not args.no_fill:
        seconds = asyncio.run(fill(args.database_url, args.records, args.days))
        print(
            f"filled {args.records:,} records in {seconds:.0f} s "
            f"({args.records / seconds:,.0f} records/s)"
        )
    for label, ms, rows in asyncio.run(measure(args.database_url, args.repeat)):
        print(f"{label:48} {ms:9.1f} ms  {rows:>7,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
