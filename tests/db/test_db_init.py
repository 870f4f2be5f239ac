from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import (
    SCHEMA_REVISION,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
    upgrade_database,
)
from luthien_control.db.models import Base
from luthien_control.db.search import is_search_index
from tests.db.conftest import BACKENDS


async def _versions(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return [row[0] for row in result]
    finally:
        await engine.dispose()


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return {name for name in names if not is_search_index(name)}


def test_the_migrations_form_one_chain_from_the_initial_one() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    chain = [revision.revision for revision in script.walk_revisions()]
    assert script.get_heads() == [head_revision()]
    assert chain[0] == head_revision()
    assert chain[-1] == "0001"


def test_schema_revision_is_the_newest_migration() -> None:
    # serve compares the database with SCHEMA_REVISION without loading Alembic; a new
    # migration must update it.
    assert head_revision() == SCHEMA_REVISION


@pytest.mark.anyio
async def test_current_revision_of_a_migrated_database_is_the_schema_revision(
    db: AsyncEngine,
) -> None:
    assert await current_revision(db) == SCHEMA_REVISION


@pytest.mark.anyio
@pytest.mark.parametrize("backend", BACKENDS)
async def test_current_revision_of_a_fresh_database_is_none(
    request: pytest.FixtureRequest, backend: str, sqlite_url: str
) -> None:
    url = sqlite_url if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    try:
        assert await current_revision(engine) is None
        assert await _tables(engine) == set()
        # Nothing was left half-done: the same engine migrates the database at once.
        assert await upgrade(engine) == SCHEMA_REVISION
        assert await current_revision(engine) == SCHEMA_REVISION
    finally:
        await engine.dispose()


@pytest.mark.anyio
async def test_upgrade_creates_the_schema_and_is_idempotent(sqlite_path: Path) -> None:
    url = f"sqlite:///{sqlite_path}"
    assert await upgrade_database(url) == head_revision()
    assert await upgrade_database(url) == head_revision()
    assert await _versions(url) == [head_revision()]
    engine = create_engine(url)
    try:
        assert await _tables(engine) == {"alembic_version", *Base.metadata.tables}
    finally:
        await engine.dispose()


@pytest.mark.anyio
async def test_the_models_match_the_migrations(db: AsyncEngine) -> None:
    def differences(connection: Connection) -> list[object]:
        # Each database's own search index (FTS5 tables, a GIN index) is not a model.
        options = {"include_name": lambda name, type_, parent: not is_search_index(name)}
        context = MigrationContext.configure(connection, opts=options)
        return list(compare_metadata(context, Base.metadata))

    async with db.connect() as connection:
        assert await connection.run_sync(differences) == []


@pytest.mark.anyio
async def test_concurrent_upgrades_of_a_fresh_database_both_succeed(sqlite_path: Path) -> None:
    url = f"sqlite:///{sqlite_path}"
    engines = [create_engine(url) for _ in range(4)]
    revisions: list[str] = []

    async def run(engine: AsyncEngine) -> None:
        revisions.append(await upgrade(engine))

    try:
        async with anyio.create_task_group() as group:
            for engine in engines:
                group.start_soon(run, engine)
    finally:
        for engine in engines:
            await engine.dispose()
    assert revisions == [head_revision()] * 4
    assert await _versions(url) == [head_revision()]


def _run_init_db(cwd: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "luthien_control.db.init_db"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_init_db_module_upgrades_the_configured_database(tmp_path: Path) -> None:
    path = tmp_path / "data" / "luthien.db"
    first = _run_init_db(tmp_path, f"sqlite:///{path}")
    second = _run_init_db(tmp_path, f"sqlite:///{path}")
    expected = f"database ready: sqlite:///{path} (revision {head_revision()})\n"
    assert (first.returncode, first.stdout, first.stderr) == (0, expected, "")
    assert (second.returncode, second.stdout, second.stderr) == (0, expected, "")
    assert path.is_file()


def test_init_db_module_uses_the_default_database_in_the_working_directory(
    tmp_path: Path,
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "luthien_control.db.init_db"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"database ready: sqlite+aiosqlite:///./luthien_control.db (revision {head_revision()})\n"
    )
    assert (tmp_path / "luthien_control.db").is_file()


def _set_revision(path: Path, revision: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_init_db_module_reports_an_unknown_revision_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "luthien.db"
    assert _run_init_db(tmp_path, f"sqlite:///{path}").returncode == 0
    _set_revision(path, "0099")  # as a newer version of Luthien Control would leave it
    result = _run_init_db(tmp_path, f"sqlite:///{path}")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"luthien-control: error: cannot upgrade the database at sqlite+aiosqlite:///{path}: "
        "Can't locate revision identified by '0099'\n"
    )


@pytest.mark.parametrize(
    ("database_url", "message"),
    [
        ("mysql://root:s3cret@localhost/luthien", "unsupported database URL"),
        ("sqlite:///{tmp_path}", "cannot reach the database at sqlite+aiosqlite:///{tmp_path}: "),
    ],
)
def test_init_db_module_reports_errors_in_one_line(
    tmp_path: Path, database_url: str, message: str
) -> None:
    result = _run_init_db(tmp_path, database_url.format(tmp_path=tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("luthien-control: error: " + message.format(tmp_path=tmp_path))
    assert result.stderr.count("\n") == 1
    assert "s3cret" not in result.stderr


@pytest.mark.anyio
async def test_the_policies_stored_before_0005_become_their_first_kept_versions(
    sqlite_path: Path,
) -> None:
    """A database stored at 0004 keeps its policies' versions in force as kept versions."""
    from alembic import command

    from luthien_control.db.policies import list_versions, save_policy

    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_path}")

    def to_0004(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")

    try:
        async with engine.begin() as connection:
            await connection.run_sync(to_0004)
            await connection.execute(
                text(
                    "INSERT INTO policies (name, definition, version, created_at, updated_at) "
                    'VALUES (\'root\', \'{"type": "NoopPolicy", "config": {}}\', 4, '
                    "'2026-12-01 10:00:00', '2026-12-02 10:00:00')"
                )
            )
        assert await upgrade(engine) == SCHEMA_REVISION
        kept = await list_versions(engine, "root")
        assert [(v.version, v.definition, v.created_by, v.in_force) for v in kept] == [
            (4, {"type": "NoopPolicy", "config": {}}, None, True)
        ]
        assert (
            await save_policy(engine, "root", {"type": "NoopPolicy", "config": {}})
        ).version == 5
    finally:
        await engine.dispose()
