from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from luthien_control.db.engine import create_engine, describe_url, normalize_url, translate_errors
from luthien_control.exceptions import ConfigurationError, StorageError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://user:pw@db.example/luthien",
            "postgresql+asyncpg://user:pw@db.example/luthien",
        ),
        (
            "postgres://user:pw@db.example:6543/luthien",
            "postgresql+asyncpg://user:pw@db.example:6543/luthien",
        ),
        ("postgresql+asyncpg://user:pw@host/db", "postgresql+asyncpg://user:pw@host/db"),
        ("postgresql://host/db?sslmode=require", "postgresql+asyncpg://host/db?ssl=require"),
        ("sqlite:///./luthien_control.db", "sqlite+aiosqlite:///./luthien_control.db"),
        ("sqlite:////var/lib/luthien/x.db", "sqlite+aiosqlite:////var/lib/luthien/x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ],
)
def test_normalize_url_picks_the_async_driver(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_normalize_url_keeps_special_characters_of_a_password() -> None:
    url = "postgresql://user:p%40ss%2Fword@host/db"
    assert normalize_url(url) == "postgresql+asyncpg://user:p%40ss%2Fword@host/db"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:s3cret@host/db",
        "postgresql+psycopg2://user:s3cret@host/db",
        "sqlite+pysqlite:///x.db",
        "not a url",
        "",
    ],
)
def test_normalize_url_rejects_other_databases_in_one_line(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_url(url)
    message = caught.value.message
    assert "\n" not in message
    assert "s3cret" not in message
    assert "sqlite:///PATH" in message
    assert "postgresql://" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:s3cret@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite+aiosqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("nonsense://user:s3cret@host/db with spaces", "nonsense://user:***@host/db with spaces"),
    ],
)
def test_describe_url_masks_the_password(url: str, expected: str) -> None:
    assert describe_url(url) == expected


@pytest.mark.anyio
async def test_sqlite_engine_creates_the_directory_and_sets_the_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "x.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        async with engine.connect() as connection:
            journal_mode = await connection.scalar(text("PRAGMA journal_mode"))
            busy_timeout = await connection.scalar(text("PRAGMA busy_timeout"))
            foreign_keys = await connection.scalar(text("PRAGMA foreign_keys"))
    finally:
        await engine.dispose()
    assert path.is_file()
    assert (journal_mode, busy_timeout, foreign_keys) == ("wal", 5000, 1)


def test_an_uncreatable_sqlite_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the directory"):
        create_engine(f"sqlite:///{blocker}/x.db")


@pytest.mark.anyio
async def test_an_unreachable_postgresql_is_a_storage_error_without_the_password(
    closed_port: int,
) -> None:
    engine = create_engine(f"postgresql://luthien:s3cret@127.0.0.1:{closed_port}/luthien")
    try:
        with pytest.raises(StorageError) as caught:
            async with translate_errors(engine), engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    message = caught.value.message
    where = f"postgresql+asyncpg://luthien:***@127.0.0.1:{closed_port}/luthien"
    assert message.startswith(f"cannot reach the database at {where}: ")
    assert "s3cret" not in message
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.anyio
async def test_an_unopenable_sqlite_file_is_a_storage_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}")  # a directory, not a file
    try:
        with pytest.raises(StorageError) as caught:
            async with translate_errors(engine), engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    where = f"sqlite+aiosqlite:///{tmp_path}"
    assert (
        caught.value.message
        == f"cannot reach the database at {where}: unable to open database file"
    )
