"""Control policies stored by name, each as its serialized ``{"type", "config"}`` tree.

Every definition saved under a name becomes that name's next version, kept for good in
``policy_versions``; the ``policies`` row holds the version in force. Saving puts the new
version in force unless asked not to (an edit kept for later), and any version can be put
back in force (``activate_version``). The proxy polls ``policy_version`` and reloads the
policy whenever the version in force changes, to an older one too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import transaction
from luthien_control.db.models import PolicyRow, PolicyVersionRow, check_name, utcnow
from luthien_control.exceptions import NotFound, StorageError


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A stored policy. ``definition`` is the serialized tree, exactly as saved."""

    name: str
    definition: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One kept version of a stored policy."""

    name: str
    version: int
    definition: dict[str, Any]
    created_at: datetime
    created_by: str | None
    in_force: bool


async def save_policy(
    engine: AsyncEngine,
    name: str,
    definition: dict[str, Any],
    *,
    by: str | None = None,
    activate: bool = True,
) -> StoredPolicy:
    """Store ``definition`` as the next version of the policy ``name`` (its first version
    creates it) and, unless ``activate`` is false, put it in force; one transaction.
    ``by`` says who stored it. Returns the policy as it now stands."""
    check_name(name, "policy")
    definition = copy.deepcopy(definition)
    try:
        return await _save(engine, name, definition, by, activate)
    except _CreatedConcurrently:
        # Another process created it between our UPDATE and our INSERT; now it exists,
        # and a second attempt adds to it.
        return await _save(engine, name, definition, by, activate)


async def list_versions(engine: AsyncEngine, name: str) -> list[PolicyVersion]:
    """Every kept version of the policy ``name``, newest first (empty if there is none)."""
    async with transaction(engine) as session:
        in_force = await session.scalar(select(PolicyRow.version).where(PolicyRow.name == name))
        rows = await session.scalars(
            select(PolicyVersionRow)
            .where(PolicyVersionRow.policy_name == name)
            .order_by(PolicyVersionRow.version.desc())
        )
        return [_version(row, in_force) for row in rows]


async def get_version(engine: AsyncEngine, name: str, version: int) -> PolicyVersion | None:
    """Version ``version`` of the policy ``name``, or ``None``."""
    async with transaction(engine) as session:
        in_force = await session.scalar(select(PolicyRow.version).where(PolicyRow.name == name))
        row = await session.scalar(_version_query(name, version))
        return None if row is None else _version(row, in_force)


async def activate_version(engine: AsyncEngine, name: str, version: int) -> StoredPolicy:
    """Put version ``version`` of the policy ``name`` back in force (``NotFound`` if the
    policy has no such version)."""
    async with transaction(engine) as session:
        kept = await session.scalar(_version_query(name, version))
        if kept is None:
            raise NotFound(f"the policy {name!r} has no version {version}")
        row = await session.scalar(
            update(PolicyRow)
            .where(PolicyRow.name == name)
            .values(definition=kept.definition, version=version, updated_at=utcnow())
            .returning(PolicyRow)
        )
        if row is None:  # pragma: no cover - a version is never kept without its policy
            raise NotFound(f"no policy {name!r}")
        return _stored(row)


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


async def _save(
    engine: AsyncEngine,
    name: str,
    definition: dict[str, Any],
    by: str | None,
    activate: bool,
) -> StoredPolicy:
    now = utcnow()
    race = _CreatedConcurrently(f"the policy {name!r} was created concurrently; try again")
    async with transaction(engine, conflict=race) as session:
        # The UPDATE takes the policy's row lock first: concurrent saves of one policy
        # queue here, so each reads the newest version number and none writes the same.
        row = await session.scalar(
            update(PolicyRow)
            .where(PolicyRow.name == name)
            .values(updated_at=PolicyRow.updated_at)
            .returning(PolicyRow)
        )
        if row is None:
            # The first version of a policy is the policy: it is in force from the start.
            row = PolicyRow(
                name=name, definition=definition, version=1, created_at=now, updated_at=now
            )
            session.add(row)
            await session.flush()
            version = 1
        else:
            newest = await session.scalar(
                select(func.max(PolicyVersionRow.version)).where(
                    PolicyVersionRow.policy_name == name
                )
            )
            version = max(newest or 0, row.version) + 1
            if activate:
                row = await session.scalar(
                    update(PolicyRow)
                    .where(PolicyRow.name == name)
                    .values(definition=definition, version=version, updated_at=now)
                    .returning(PolicyRow)
                    .execution_options(populate_existing=True)
                )
                assert row is not None
        session.add(
            PolicyVersionRow(
                policy_name=name,
                version=version,
                definition=copy.deepcopy(definition),
                created_at=now,
                created_by=by,
            )
        )
        await session.flush()
        return _stored(row)


def _version_query(name: str, version: int) -> Any:
    return select(PolicyVersionRow).where(
        PolicyVersionRow.policy_name == name, PolicyVersionRow.version == version
    )


def _version(row: PolicyVersionRow, in_force: int | None) -> PolicyVersion:
    return PolicyVersion(
        name=row.policy_name,
        version=row.version,
        definition=row.definition,
        created_at=row.created_at,
        created_by=row.created_by,
        in_force=row.version == in_force,
    )


def _stored(row: PolicyRow) -> StoredPolicy:
    return StoredPolicy(
        name=row.name,
        definition=row.definition,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
