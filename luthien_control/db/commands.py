"""The database commands of ``luthien-control``: ``init-db``, ``keys ...``, ``policy ...``.

Each one opens the configured database (``DATABASE_URL``), brings its schema up to date
so that a fresh SQLite file just works, does one thing, prints plain text, and closes
the database. Mistakes are raised as ``LuthienError``; ``cli`` prints them on one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.cli import printable
from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import database_url, ready_message, upgrade, upgrade_database
from luthien_control.db.keys import add_key, generate_key, list_keys, revoke_key
from luthien_control.db.models import check_name
from luthien_control.db.policies import get_policy, list_policies, save_policy
from luthien_control.exceptions import NotFound, PolicyConfigError


async def init_db() -> int:
    """Create or upgrade the schema and say so."""
    url = database_url()
    print(ready_message(url, await upgrade_database(url)))
    return 0


async def keys_add(name: str, key: str | None) -> int:
    """Store a client key (a new random one unless given) and print it, once."""
    value = generate_key() if key is None else key
    async with _database() as engine:
        await add_key(engine, name, value)
    # The key alone on stdout, so that scripts can capture it; the advice on stderr.
    print(value)
    print(f"added key {name!r}: store it now, it cannot be shown again", file=sys.stderr)
    return 0


async def keys_list() -> int:
    """Print the stored keys: names and prefixes, never the keys."""
    async with _database() as engine:
        keys = await list_keys(engine)
    if not keys:
        print("no keys")
        return 0
    _print_table(
        ("NAME", "PREFIX", "CREATED", "STATUS"),
        [(key.name, key.prefix, _timestamp(key.created_at), _status(key.active)) for key in keys],
    )
    return 0


async def keys_revoke(name: str) -> int:
    """Revoke a key: the proxy refuses it within a second."""
    async with _database() as engine:
        await revoke_key(engine, name)
    print(f"revoked key {name!r}")
    return 0


async def policy_load(file: str, name: str) -> int:
    """Validate a policy file and store it under ``name`` (creating or replacing it)."""
    from luthien_control.policies.loader import load_policy_file

    check_name(name, "policy")
    definition = load_policy_file(file).serialize()
    try:  # what the database's JSON column will be given (YAML allows keys JSON has not)
        orjson.dumps(definition)
    except TypeError as exc:
        raise PolicyConfigError(f"policy {file!r} cannot be stored as JSON: {exc}") from exc
    async with _database() as engine:
        stored = await save_policy(engine, name, definition, by="cli")
    print(f"stored policy {name!r} (version {stored.version})")
    return 0


async def policy_list() -> int:
    """Print the stored policies: name, root type, version, last change."""
    async with _database() as engine:
        policies = await list_policies(engine)
    if not policies:
        print("no policies")
        return 0
    _print_table(
        ("NAME", "TYPE", "VERSION", "UPDATED"),
        [
            (
                policy.name,
                _root_type(policy.definition),
                str(policy.version),
                _timestamp(policy.updated_at),
            )
            for policy in policies
        ],
    )
    return 0


async def policy_show(name: str) -> int:
    """Print a stored policy's definition as JSON, ready to be loaded again."""
    async with _database() as engine:
        policy = await get_policy(engine, name)
    if policy is None:
        raise NotFound(f"no policy named {name!r}")
    print(json.dumps(policy.definition, indent=2, ensure_ascii=False))
    return 0


async def policy_replay(file: str, transaction_id: str, *, as_json: bool) -> int:
    """Replay a recorded transaction through the policy in ``file`` (no backend call) and
    print what the client would have seen, beside what it saw."""
    from luthien_control.console.conversation import answer_turns
    from luthien_control.db.transactions import get_transaction
    from luthien_control.policies.loader import load_policy_file
    from luthien_control.replay import replay
    from luthien_control.settings import Settings

    policy = load_policy_file(file)
    async with _database() as engine:
        record = await get_transaction(engine, transaction_id)
    if record is None:
        raise NotFound(f"no transaction {transaction_id!r}")
    result = await replay(record, policy, Settings())
    now = result.record
    if as_json:
        print(
            json.dumps(
                {
                    "transaction": transaction_id,
                    "status": result.status,
                    "headers": result.headers,
                    "body": result.body.decode("utf-8", "replace"),
                    "record": now,
                },
                ensure_ascii=False,
                default=str,
            )
        )
        return 0
    print(
        f"replayed transaction {transaction_id} through {policy.type_name} "
        f"'{printable(policy.name)}' ({printable(file)}); no backend call"
    )
    print(f"then: {_replay_line(record)}")
    print(f"now:  {_replay_line(now)}")
    decisions = now.get("decisions") or []
    print("decisions:" if decisions else "decisions: none")
    for decision in decisions:
        print(
            f"  {printable(str(decision.get('policy')))} {printable(str(decision.get('action')))}: "
            f"{printable(str(decision.get('detail')))}"
        )
    turns = answer_turns(str(now.get("endpoint", "")), (now.get("response") or {}).get("sent"))
    if turns:
        print("the answer, as the client would read it:")
        for turn in turns:
            label = turn["kind"] if not turn["name"] else f"{turn['kind']} {turn['name']}"
            print(f"  [{printable(label)}] {printable(turn['text'])}")
    else:
        body = (now.get("response") or {}).get("sent") or {}
        shown = body.get("body")
        print("the answer, as the client would get it:")
        print(f"  {printable(json.dumps(shown, ensure_ascii=False))}")
    return 0


def _replay_line(record: dict[str, Any]) -> str:
    status = record.get("status")
    sent = (record.get("response") or {}).get("sent") or {}
    stream = sent.get("stream")
    shape = (
        f"streamed, {stream.get('chunks', 0)} events" if isinstance(stream, dict) else "buffered"
    )
    return f"{status} {printable(str(record.get('outcome')))} ({shape})"


@asynccontextmanager
async def _database() -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url())
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


def _root_type(definition: Any) -> str:
    kind = definition.get("type") if isinstance(definition, dict) else None
    return kind if isinstance(kind, str) else "?"


def _status(active: bool) -> str:
    return "active" if active else "revoked"


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    # Names may have been stored through the admin API: escaped, they cannot drive the
    # terminal.
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in (headers, *rows)) for column in range(len(headers))]
    for row in (headers, *rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
