"""Client API keys: the keys clients send as ``Authorization: Bearer KEY``.

Only a key's sha256 is stored, with its first characters for display; the key itself
is shown once, when it is made, and never again.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from luthien_control.db.engine import transaction
from luthien_control.db.models import ClientKeyRow, check_name, utcnow
from luthien_control.exceptions import ClientError, MalformedRequest, NotFound

KEY_PREFIX = "lc-"
KEY_PREFIX_CHARS = 8  # how much of a key is kept, to tell keys apart in listings


@dataclass(frozen=True, slots=True)
class ClientKeyInfo:
    """What may be shown about a stored key: everything but the key."""

    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def generate_key() -> str:
    """A new random client key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The sha256 of ``key``, in hex: what is stored and what requests are checked with."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


async def add_key(engine: AsyncEngine, name: str, key: str) -> ClientKeyInfo:
    """Store ``key`` (its hash) under ``name``; names and keys must both be unique."""
    check_name(name, "key")
    if not key:
        raise MalformedRequest("a key must not be empty")
    if any(char.isspace() for char in key):
        raise MalformedRequest("a key must not contain whitespace")
    key_hash = hash_key(key)
    row = ClientKeyRow(
        name=name, key_hash=key_hash, key_prefix=key[:KEY_PREFIX_CHARS], created_at=utcnow()
    )
    race = ClientError(f"a key named {name!r}, or with this value, already exists")
    async with transaction(engine, conflict=race) as session:
        if await _exists(session, ClientKeyRow.name == name):
            raise ClientError(f"a key named {name!r} already exists")
        if await _exists(session, ClientKeyRow.key_hash == key_hash):
            raise ClientError("this key is already stored under another name")
        session.add(row)
        await session.flush()
    return _info(row)


async def replace_key(engine: AsyncEngine, name: str, key: str) -> ClientKeyInfo:
    """Store ``key`` under ``name``, deleting any key of that name first (one transaction).

    Demo mode uses it to hand out a fresh key on every start.
    """
    check_name(name, "key")
    key_hash = hash_key(key)
    async with transaction(engine) as session:
        await session.execute(
            delete(ClientKeyRow).where(
                (ClientKeyRow.name == name) | (ClientKeyRow.key_hash == key_hash)
            )
        )
        row = ClientKeyRow(
            name=name, key_hash=key_hash, key_prefix=key[:KEY_PREFIX_CHARS], created_at=utcnow()
        )
        session.add(row)
        await session.flush()
        return _info(row)


async def list_keys(engine: AsyncEngine) -> list[ClientKeyInfo]:
    """Every stored key, active and revoked, oldest first."""
    async with transaction(engine) as session:
        rows = await session.scalars(select(ClientKeyRow).order_by(ClientKeyRow.id))
        return [_info(row) for row in rows]


async def revoke_key(engine: AsyncEngine, name: str) -> ClientKeyInfo:
    """Revoke the key called ``name``: requests with it are refused from now on."""
    async with transaction(engine) as session:
        row = await session.scalar(
            select(ClientKeyRow).where(ClientKeyRow.name == name).with_for_update()
        )
        if row is None:
            raise NotFound(f"no key named {name!r}")
        if row.revoked_at is not None:
            raise ClientError(f"the key {name!r} is already revoked")
        row.revoked_at = utcnow()
        return _info(row)


async def active_keys(engine: AsyncEngine) -> dict[str, str]:
    """``key_hash -> name`` for every active key, in one query (the proxy polls it)."""
    statement = select(ClientKeyRow.key_hash, ClientKeyRow.name).where(
        ClientKeyRow.revoked_at.is_(None)
    )
    async with transaction(engine) as session:
        return {key_hash: name for key_hash, name in await session.execute(statement)}


async def _exists(session: AsyncSession, condition: ColumnElement[bool]) -> bool:
    return await session.scalar(select(ClientKeyRow.id).where(condition)) is not None


def _info(row: ClientKeyRow) -> ClientKeyInfo:
    return ClientKeyInfo(
        name=row.name,
        prefix=row.key_prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )
