"""Fixtures for the storage tests: real databases, never mocks.

``db`` is a migrated database: a SQLite file in ``tmp_path``, and a database on the real
PostgreSQL server the suite starts (``tests/postgres.py``), or the one named by
``LUTHIEN_TEST_POSTGRES_URL``; its tables are dropped and recreated for every test, so it
must be a database for tests only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.db.models import Base
from tests.postgres import PostgresServer

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_storage_url(request: pytest.FixtureRequest) -> str:
    """One PostgreSQL database for the storage tests (emptied before each test)."""
    given = os.environ.get("LUTHIEN_TEST_POSTGRES_URL")
    if given:
        return given
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database("storage_tests")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "luthien.db"


@pytest.fixture
def sqlite_url(sqlite_path: Path) -> str:
    return f"sqlite+aiosqlite:///{sqlite_path}"


@pytest.fixture(params=BACKENDS)
async def db(request: pytest.FixtureRequest, sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """A database with the current schema and no rows."""
    if request.param == "sqlite":
        engine = create_engine(sqlite_url)
    else:
        engine = create_engine(request.getfixturevalue("postgres_storage_url"))
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            await connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
