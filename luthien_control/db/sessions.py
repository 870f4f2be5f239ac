"""Operator console sessions: who signed in with ``ADMIN_API_KEY``, until when.

A session is a random token in an HttpOnly cookie; only an HMAC of it, keyed by the admin
key, is stored (``_hash``). Sessions live in the database, not in a worker's
memory: any worker (any process) knows them, and signing out ends a session on all of
them at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import transaction
from luthien_control.db.models import AdminSessionRow, check_name, utcnow


@dataclass(frozen=True, slots=True)
class AdminSession:
    token: str  # the cookie's value: never stored, never logged
    label: str
    expires_at: datetime


def _hash(token: str, admin_key: str) -> str:
    """What is stored of a session: an HMAC of its token keyed by the admin key in force.
    A copy of the database signs no one in, and a new ``ADMIN_API_KEY`` ends every
    session made under the old one (a leaked key is rotated out with its sessions)."""
    return hmac.new(admin_key.encode("utf-8"), token.encode("utf-8"), hashlib.sha256).hexdigest()


async def start_session(
    engine: AsyncEngine, label: str, lifetime: float, admin_key: str
) -> AdminSession:
    """A new session for ``label``, valid ``lifetime`` seconds. Sessions long expired
    are deleted on the way (the table never grows without bound)."""
    check_name(label, "reviewer")
    token = secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + timedelta(seconds=lifetime)
    async with transaction(engine) as session:
        await session.execute(
            delete(AdminSessionRow).where(AdminSessionRow.expires_at < now - timedelta(days=1))
        )
        session.add(
            AdminSessionRow(
                token_hash=_hash(token, admin_key), label=label, created_at=now, expires_at=expires
            )
        )
    return AdminSession(token=token, label=label, expires_at=expires)


async def find_session(engine: AsyncEngine, token: str, admin_key: str) -> AdminSession | None:
    """The live session of this cookie value: not expired, not signed out."""
    if not token or len(token) > 200:
        return None
    async with transaction(engine) as session:
        row = await session.scalar(
            select(AdminSessionRow).where(AdminSessionRow.token_hash == _hash(token, admin_key))
        )
    if row is None or row.ended_at is not None or row.expires_at <= utcnow():
        return None
    return AdminSession(token=token, label=row.label, expires_at=row.expires_at)


async def end_session(engine: AsyncEngine, token: str, admin_key: str) -> None:
    """Sign out: the cookie opens nothing from now on, on every worker."""
    async with transaction(engine) as session:
        await session.execute(
            update(AdminSessionRow)
            .where(
                AdminSessionRow.token_hash == _hash(token, admin_key),
                AdminSessionRow.ended_at.is_(None),
            )
            .values(ended_at=utcnow())
        )
