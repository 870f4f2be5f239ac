"""Create or upgrade the database schema: ``python -m luthien_control.db.init_db``.

The Alembic configuration is built here, in code, so no ``alembic.ini`` is needed at run
time. Upgrading is idempotent and safe to run on every start, even from several
processes at once: each one waits for a database lock, and finds the work done.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from luthien_control.db.engine import create_engine, describe_url, translate_errors
from luthien_control.exceptions import LuthienError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any fixed 64-bit number; PostgreSQL advisory locks are named by one ("Luthien").
MIGRATION_LOCK_KEY = 0x4C75746869656E
PROG = "luthien-control"


def alembic_config() -> Config:
    """The Alembic configuration: the migrations shipped inside this package."""
    config = Config()
    # Config values go through ConfigParser interpolation, where "%" is special.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration's revision."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


async def upgrade(engine: AsyncEngine) -> str:
    """Bring the schema to the newest revision, in one transaction; returns it."""
    async with translate_errors(engine), engine.begin() as connection:
        await _lock_for_migration(connection)
        return await connection.run_sync(_upgrade)


async def upgrade_database(url: str) -> str:
    """Create or upgrade the schema of the database at ``url`` (idempotent); returns the
    revision it is at."""
    engine = create_engine(url)
    try:
        return await upgrade(engine)
    finally:
        await engine.dispose()


def database_url() -> str:
    """The configured ``DATABASE_URL``; invalid settings are a ``ConfigurationError``."""
    from luthien_control.settings import load_settings

    return load_settings().database_url


def ready_message(url: str, revision: str) -> str:
    return f"database ready: {describe_url(url)} (revision {revision})"


def main() -> int:
    """Upgrade the configured database; print one line, or one error line (exit 2)."""
    try:
        url = database_url()
        revision = asyncio.run(upgrade_database(url))
    except LuthienError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(ready_message(url, revision))
    return 0


async def _lock_for_migration(connection: AsyncConnection) -> None:
    # Take the lock before Alembic reads its version table, so that two processes
    # starting at once migrate one after the other instead of both creating tables.
    dialect = connection.dialect.name
    if dialect == "sqlite":
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )


def _upgrade(connection: Connection) -> str:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    revision = MigrationContext.configure(connection).get_current_revision()
    assert revision is not None
    return revision


if __name__ == "__main__":
    sys.exit(main())
