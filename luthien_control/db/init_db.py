"""Create or upgrade the database schema: ``python -m luthien_control.db.init_db``.

The Alembic configuration is built here, in code, so no ``alembic.ini`` is needed at run
time. Upgrading is idempotent and safe to run on every start, even from several
processes at once: each one waits for a database lock, and finds the work done.

Alembic is imported only by the functions that need it: ``serve`` imports this module to
compare ``current_revision`` with ``SCHEMA_REVISION``, and runs this module in a child
process only when they differ, so that the long-lived proxy process never loads Alembic.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from luthien_control.db.engine import create_engine, describe_url, translate_errors
from luthien_control.exceptions import LuthienError, StorageError

if TYPE_CHECKING:
    from alembic.config import Config

# The newest migration's revision, known without Alembic (a test checks it is the head).
SCHEMA_REVISION = "0007"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any fixed 64-bit number; PostgreSQL advisory locks are named by one ("Luthien").
MIGRATION_LOCK_KEY = 0x4C75746869656E
PROG = "luthien-control"


def alembic_config() -> Config:
    """The Alembic configuration: the migrations shipped inside this package."""
    from alembic.config import Config

    config = Config()
    # Config values go through ConfigParser interpolation, where "%" is special.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration's revision, as Alembic finds it."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database's schema is at, read without Alembic; ``None`` for a
    database without one (a fresh database has no ``alembic_version`` table)."""
    async with translate_errors(engine), engine.connect() as connection:
        # Look for the table rather than catch the failed SELECT: on PostgreSQL an error
        # aborts the transaction, and "no such table" is not the only possible error.
        if not await connection.run_sync(_has_version_table):
            return None
        result = await connection.execute(text("SELECT version_num FROM alembic_version"))
        revisions = list(result.scalars())
    return revisions[0] if len(revisions) == 1 else None


async def upgrade(engine: AsyncEngine) -> str:
    """Bring the schema to the newest revision, in one transaction; returns it."""
    from alembic.util import CommandError

    async with translate_errors(engine), engine.begin() as connection:
        await _lock_for_migration(connection)
        try:
            return await connection.run_sync(_upgrade)
        except CommandError as exc:  # such as a revision newer than this code knows
            raise StorageError(
                f"cannot upgrade the database at {describe_url(engine.url)}: {exc}"
            ) from exc


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


def _has_version_table(connection: Connection) -> bool:
    return inspect(connection).has_table("alembic_version")


def _upgrade(connection: Connection) -> str:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    revision = MigrationContext.configure(connection).get_current_revision()
    assert revision is not None
    return revision


if __name__ == "__main__":
    sys.exit(main())
