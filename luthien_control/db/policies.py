"""Control policies stored by name, each as its serialized ``{"type", "config"}`` tree.

Every replacement bumps the policy's ``version``; the proxy polls ``policy_version`` and
reloads the policy when it changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import transaction
from luthien_control.db.models import PolicyRow, check_name, utcnow
from luthien_control.exceptions import StorageError


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A stored policy. ``definition`` is the serialized tree, exactly as saved."""

    name: str
    definition: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


async def save_policy(engine: AsyncEngine, name: str, definition: dict[str, Any]) -> StoredPolicy:
    """Create the policy ``name``, or replace it and bump its version (one transaction)."""
    check_name(name, "policy")
    definition = copy.deepcopy(definition)
    try:
        return await _save(engine, name, definition)
    except _CreatedConcurrently:
        # Another process created it between our UPDATE and our INSERT; now it exists,
        # and a second attempt replaces it.
        return await _save(engine, name, definition)


async def get_policy(engine: AsyncEngine, name: str) -> StoredPolicy | None:
    """The policy called ``name``, or ``None``."""
    async with transaction(engine) as session:
        row = await session.scalar(select(PolicyRow).where(PolicyRow.name == name))
        return None if row is None else _stored(row)


async def list_policies(engine: AsyncEngine) -> list[StoredPolicy]:
    """Every stored policy, by name."""
    async with transaction(engine) as session:
        rows = await session.scalars(select(PolicyRow).order_by(PolicyRow.name))
        return [_stored(row) for row in rows]


async def policy_version(engine: AsyncEngine, name: str) -> int | None:
    """The current version of the policy ``name`` (one small query), or ``None``."""
    async with transaction(engine) as session:
        return await session.scalar(select(PolicyRow.version).where(PolicyRow.name == name))


class _CreatedConcurrently(StorageError):
    pass


async def _save(engine: AsyncEngine, name: str, definition: dict[str, Any]) -> StoredPolicy:
    now = utcnow()
    race = _CreatedConcurrently(f"the policy {name!r} was created concurrently; try again")
    async with transaction(engine, conflict=race) as session:
        # One UPDATE increments the version inside the database, so that concurrent
        # replacements cannot both write the same version.
        row = await session.scalar(
            update(PolicyRow)
            .where(PolicyRow.name == name)
            .values(definition=definition, version=PolicyRow.version + 1, updated_at=now)
            .returning(PolicyRow)
        )
        if row is None:
            row = PolicyRow(
                name=name, definition=definition, version=1, created_at=now, updated_at=now
            )
            session.add(row)
            await session.flush()
        return _stored(row)


def _stored(row: PolicyRow) -> StoredPolicy:
    return StoredPolicy(
        name=row.name,
        definition=row.definition,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
