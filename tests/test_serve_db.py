"""``serve``'s database preparation: Alembic stays out of the proxy process.

``serve`` compares the database's revision with ``SCHEMA_REVISION`` (one query), and runs
the migrations in a child process (``python -m luthien_control.db.init_db``) only when
they differ, so that the process that goes on to serve requests never loads Alembic.
Real SQLite databases in ``tmp_path``, never mocks.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import SCHEMA_REVISION, alembic_config, current_revision
from luthien_control.exceptions import ConfigurationError
from luthien_control.serve import _prepare_database
from luthien_control.settings import Settings
from tests.conftest import free_port, python_env, run_cli

PREPARE = """
import asyncio, sys
from luthien_control.serve import _prepare_database
from luthien_control.settings import load_settings
asyncio.run(_prepare_database(load_settings(), {demo_key!r}))
print(sorted(name for name in sys.modules if name.split(".")[0] in ("alembic", "mako")))
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _python(cwd: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=python_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _serve(cwd: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    """``luthien-control serve`` with a backend configured (no demo mode)."""
    return subprocess.run(
        [sys.executable, "-m", "luthien_control", "serve", "--port", str(free_port())],
        cwd=cwd,
        env=python_env(
            DATABASE_URL=database_url,
            BACKEND_URL="http://127.0.0.1:9/v1",
            OPENAI_API_KEY="sk-test",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _revision_and_tables(url: str) -> tuple[str | None, set[str]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
        return await current_revision(engine), set(names)
    finally:
        await engine.dispose()


def _set_revision(path: Path, revision: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_importing_the_proxy_does_not_import_alembic(tmp_path: Path) -> None:
    result = _python(
        tmp_path,
        "import sys, luthien_control.serve, luthien_control.server, luthien_control.db.init_db\n"
        "print('alembic' in sys.modules)",
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "False\n", "")


@pytest.mark.parametrize("demo_key", [None, "lc-demo-key-0123456789"])
def test_a_current_database_is_prepared_without_alembic(
    tmp_path: Path, demo_key: str | None
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'luthien.db'}"
    init = subprocess.run(
        [sys.executable, "-m", "luthien_control.db.init_db"],
        cwd=tmp_path,
        env=python_env(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    result = _python(tmp_path, PREPARE.format(demo_key=demo_key), DATABASE_URL=url)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "[]\n"  # neither alembic nor mako was imported
    if demo_key is not None:
        assert "demo" in run_cli(url, "keys", "list").stdout


@pytest.mark.anyio
async def test_a_fresh_database_gets_the_schema(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'luthien.db'}"
    await _prepare_database(Settings(database_url=url), None)
    revision, tables = await _revision_and_tables(url)
    assert revision == SCHEMA_REVISION
    assert {"alembic_version", "client_api_keys", "policies", "transactions"} <= tables


@pytest.mark.anyio
async def test_an_older_schema_is_upgraded(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy.engine import Connection

    url = f"sqlite+aiosqlite:///{tmp_path / 'luthien.db'}"

    def upgrade_to_0001(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")

    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade_to_0001)
    finally:
        await engine.dispose()
    revision, tables = await _revision_and_tables(url)
    assert revision == "0001" and "transactions" not in tables

    await _prepare_database(Settings(database_url=url), None)
    revision, tables = await _revision_and_tables(url)
    assert revision == SCHEMA_REVISION and "transactions" in tables


@pytest.mark.anyio
async def test_a_failed_upgrade_is_a_configuration_error_with_the_child_s_message(
    tmp_path: Path,
) -> None:
    path = tmp_path / "luthien.db"
    url = f"sqlite+aiosqlite:///{path}"
    await _prepare_database(Settings(database_url=url), None)
    _set_revision(path, "0099")  # as a newer version of Luthien Control would leave it
    with pytest.raises(ConfigurationError) as caught:
        await _prepare_database(Settings(database_url=url), None)
    assert caught.value.message == (
        f"cannot upgrade the database at {url}: Can't locate revision identified by '0099'"
    )


@pytest.mark.parametrize(
    ("database", "message"),
    [
        # a directory that cannot be created: its parent is a file
        ("{tmp_path}/file/luthien.db", "cannot create the directory of the database at "),
        # a directory where the database file should be
        ("{tmp_path}", "cannot reach the database at "),
    ],
)
def test_serve_reports_an_unusable_database_in_one_line(
    tmp_path: Path, database: str, message: str
) -> None:
    (tmp_path / "file").write_text("")
    url = f"sqlite+aiosqlite:///{database.format(tmp_path=tmp_path)}"
    result = _serve(tmp_path, url)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"luthien-control: error: {message}{url}: ")
    assert result.stderr.count("\n") == 1


def test_serve_reports_a_failed_upgrade_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "luthien.db"
    url = f"sqlite+aiosqlite:///{path}"
    assert run_cli(url, "init-db").returncode == 0
    _set_revision(path, "0099")
    result = _serve(tmp_path, url)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"luthien-control: error: cannot upgrade the database at {url}: "
        "Can't locate revision identified by '0099'\n"
    )
