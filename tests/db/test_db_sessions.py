"""Console sessions on both databases: only a token's hash is stored; expiry and sign-out
close a session."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import transaction
from luthien_control.db.models import AdminSessionRow, utcnow
from luthien_control.db.sessions import end_session, find_session, start_session
from luthien_control.exceptions import MalformedRequest

pytestmark = pytest.mark.anyio

KEY = "admin-key-of-these-tests"


async def test_a_session_is_found_until_it_is_ended(db: AsyncEngine) -> None:
    started = await start_session(db, "ada", 3600, KEY)
    found = await find_session(db, started.token, KEY)
    assert found is not None and found.label == "ada"
    assert found.expires_at == started.expires_at
    async with transaction(db) as session:
        stored = list(await session.scalars(select(AdminSessionRow.token_hash)))
    assert stored == [hmac.new(KEY.encode(), started.token.encode(), hashlib.sha256).hexdigest()]
    # another admin key (ADMIN_API_KEY rotated) opens none of the old sessions
    assert await find_session(db, started.token, "the-new-admin-key") is None
    await end_session(db, started.token, KEY)
    assert await find_session(db, started.token, KEY) is None
    assert await find_session(db, "not-a-token", KEY) is None
    assert await find_session(db, "", KEY) is None


async def test_an_expired_session_opens_nothing_and_is_eventually_deleted(
    db: AsyncEngine,
) -> None:
    old = await start_session(db, "grace", 3600, KEY)
    async with transaction(db) as session:
        await session.execute(
            update(AdminSessionRow).values(expires_at=utcnow() - timedelta(days=2))
        )
    assert await find_session(db, old.token, KEY) is None
    await start_session(db, "grace", 3600, KEY)
    async with transaction(db) as session:
        labels = list(await session.scalars(select(AdminSessionRow.label)))
    assert labels == ["grace"]  # the long-expired one is gone


async def test_a_label_is_a_name(db: AsyncEngine) -> None:
    with pytest.raises(MalformedRequest, match="a reviewer name must not be empty"):
        await start_session(db, "  ", 3600, KEY)


@pytest.mark.parametrize("label", ["a\x00b", "\u202etxt.exe", "zero\u200bwidth", "tab\there"])
async def test_a_label_that_would_not_show_as_itself_is_refused(
    db: AsyncEngine, label: str
) -> None:
    with pytest.raises(MalformedRequest, match="control or invisible formatting"):
        await start_session(db, label, 3600, KEY)
