from __future__ import annotations

import hashlib
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.db.keys import (
    active_keys,
    add_key,
    generate_key,
    hash_key,
    list_keys,
    revoke_key,
)
from luthien_control.exceptions import ClientError, MalformedRequest, NotFound

pytestmark = pytest.mark.anyio


def test_generated_keys_are_long_random_and_prefixed() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("lc-")
        assert len(key) == 3 + 43
        assert key.isascii()
        assert not any(char.isspace() for char in key)


def test_hash_key_is_the_sha256_hex() -> None:
    assert hash_key("lc-abc") == hashlib.sha256(b"lc-abc").hexdigest()
    assert len(hash_key(generate_key())) == 64


async def test_add_list_and_revoke(db: AsyncEngine) -> None:
    key = generate_key()
    added = await add_key(db, "alice", key)
    assert (added.name, added.prefix, added.revoked_at, added.active) == (
        "alice",
        key[:8],
        None,
        True,
    )
    assert added.created_at.tzinfo is UTC
    await add_key(db, "bob", "bob-key-0123456789")

    revoked = await revoke_key(db, "alice")
    assert not revoked.active

    listed = await list_keys(db)
    assert [(info.name, info.prefix, info.active) for info in listed] == [
        ("alice", key[:8], False),
        ("bob", "bob-key-", True),
    ]
    alice = listed[0]
    assert alice.created_at == added.created_at
    assert alice.created_at.tzinfo is UTC
    assert alice.revoked_at is not None
    assert alice.revoked_at >= alice.created_at


async def test_active_keys_maps_hashes_to_names_without_revoked_ones(db: AsyncEngine) -> None:
    assert await active_keys(db) == {}
    await add_key(db, "alice", "alice-key")
    await add_key(db, "bob", "bob-key")
    await add_key(db, "carol", "carol-key")
    await revoke_key(db, "bob")
    assert await active_keys(db) == {
        hash_key("alice-key"): "alice",
        hash_key("carol-key"): "carol",
    }


async def test_the_key_itself_is_never_stored(sqlite_path: Path, sqlite_url: str) -> None:
    key = generate_key()
    engine = create_engine(sqlite_url)
    try:
        await upgrade(engine)
        await add_key(engine, "alice", key)
        await revoke_key(engine, "alice")
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT * FROM client_api_keys"))).all()
            await connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    finally:
        await engine.dispose()

    assert len(rows) == 1
    values = [str(value) for value in rows[0]]
    assert hashlib.sha256(key.encode()).hexdigest() in values
    assert not any(key in value for value in values)
    contents = _database_files(sqlite_path)
    assert hash_key(key).encode() in contents[sqlite_path.name]
    for content in contents.values():
        assert key.encode() not in content
        assert key[8:].encode() not in content


def _database_files(path: Path) -> dict[str, bytes]:
    """The bytes of the SQLite file and of its journals, if any are left."""
    return {file.name: file.read_bytes() for file in path.parent.glob(path.name + "*")}


async def test_a_duplicate_name_is_refused(db: AsyncEngine) -> None:
    await add_key(db, "alice", "first-key")
    with pytest.raises(ClientError) as caught:
        await add_key(db, "alice", "second-key")
    assert caught.value.message == "a key named 'alice' already exists"
    assert await active_keys(db) == {hash_key("first-key"): "alice"}


async def test_a_duplicate_key_value_is_refused(db: AsyncEngine) -> None:
    await add_key(db, "alice", "shared-key")
    with pytest.raises(ClientError, match="already stored under another name"):
        await add_key(db, "bob", "shared-key")
    assert [info.name for info in await list_keys(db)] == ["alice"]


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        ("", "some-key", "a key name must not be empty"),
        ("   ", "some-key", "a key name must not be empty"),
        ("x" * 201, "some-key", "a key name must be at most 200 characters"),
        ("alice", "", "a key must not be empty"),
        ("alice", "has space", "a key must not contain whitespace"),
        ("alice", "trailing-newline\n", "a key must not contain whitespace"),
    ],
)
async def test_invalid_names_and_keys_are_refused(
    db: AsyncEngine, name: str, key: str, message: str
) -> None:
    with pytest.raises(MalformedRequest) as caught:
        await add_key(db, name, key)
    assert caught.value.message == message
    assert await list_keys(db) == []


async def test_revoking_an_unknown_key_is_an_error(db: AsyncEngine) -> None:
    with pytest.raises(NotFound) as caught:
        await revoke_key(db, "nobody")
    assert caught.value.message == "no key named 'nobody'"


async def test_revoking_twice_is_an_error(db: AsyncEngine) -> None:
    await add_key(db, "alice", "alice-key")
    first = await revoke_key(db, "alice")
    with pytest.raises(ClientError) as caught:
        await revoke_key(db, "alice")
    assert caught.value.message == "the key 'alice' is already revoked"
    assert (await list_keys(db))[0].revoked_at == first.revoked_at


async def test_the_key_cache_forgets_a_revoked_or_replaced_key_at_its_refresh(
    db: AsyncEngine,
) -> None:
    from luthien_control.app import KeyCache

    cache = KeyCache()
    await add_key(db, "ci", "lc-first")
    await cache.refresh(db)
    assert cache.name_for("lc-first") == "ci"
    assert cache.name_for("lc-first") == "ci"  # now from the memo of matched keys
    assert cache.name_for("lc-guess") is None
    await revoke_key(db, "ci")
    assert cache.name_for("lc-first") == "ci"  # until the next refresh (every second)
    await cache.refresh(db)
    assert cache.name_for("lc-first") is None


def test_the_memo_of_matched_keys_is_bounded() -> None:
    from luthien_control.app import KeyCache

    cache = KeyCache()
    cache._by_hash = {hash_key(f"lc-{i}"): f"k{i}" for i in range(KeyCache.MEMO_SIZE + 5)}
    for i in range(KeyCache.MEMO_SIZE + 5):
        assert cache.name_for(f"lc-{i}") == f"k{i}"
    assert len(cache._matched) <= KeyCache.MEMO_SIZE
