"""The database engine: URL translation, connection set-up, and error translation.

Users give ordinary URLs (``sqlite:///./x.db``, ``postgresql://user:pw@host/db``);
``normalize_url`` picks the async driver for them. Every driver error is translated into
``StorageError`` in one place, ``translate_errors``, with the password masked: into
``StorageRefused`` when the database answered that the data cannot be stored (retrying
it cannot help), into a plain ``StorageError`` when it is locked, busy, unreachable or
failing as a whole (retrying may).
"""

from __future__ import annotations

import re
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from luthien_control.exceptions import (
    ConfigurationError,
    LuthienError,
    StorageError,
    StorageRefused,
)

if TYPE_CHECKING:
    import aiosqlite


class SerializedJSON(str):
    """JSON text already serialized (and redacted) by its producer: a JSON column stores
    it as it is instead of serializing it again."""

    __slots__ = ()


def _json_dumps(value: Any) -> str:
    if type(value) is SerializedJSON:
        return value
    return orjson.dumps(value).decode()


# JSON columns through orjson: the recorder writes thousands of rows a second.
JSON_CODEC: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}

SQLITE_DRIVER = "sqlite+aiosqlite"
POSTGRESQL_DRIVER = "postgresql+asyncpg"
SQLITE_BUSY_TIMEOUT_MS = 5000
SQLITE_WAL_ATTEMPTS = 20
POSTGRESQL_POOL_SIZE = 5
POSTGRESQL_MAX_OVERFLOW = 10
POSTGRESQL_POOL_RECYCLE = 1800.0  # seconds: renew before idle-connection timeouts cut them
POSTGRESQL_CONNECT_TIMEOUT = 10.0  # seconds

# The URL schemes users may write, and the async driver each one runs on.
_DRIVERS = {
    "sqlite": SQLITE_DRIVER,
    SQLITE_DRIVER: SQLITE_DRIVER,
    "postgresql": POSTGRESQL_DRIVER,
    "postgres": POSTGRESQL_DRIVER,
    POSTGRESQL_DRIVER: POSTGRESQL_DRIVER,
}
_SUPPORTED = "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DATABASE"
# Masks the password of a URL that SQLAlchemy cannot even parse.
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


def describe_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return _PASSWORD.sub(r"\1***@", str(url))
    return parsed.render_as_string(hide_password=True)


def normalize_url(url: str) -> str:
    """The URL with the async driver this project uses for its database.

    ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://`` (libpq's
    ``sslmode`` becomes asyncpg's ``ssl``); ``sqlite:///PATH`` becomes
    ``sqlite+aiosqlite:///PATH``. Anything else is a ``ConfigurationError``.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(
            f"invalid database URL {describe_url(url)!r}: {_SUPPORTED}"
        ) from exc
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigurationError(f"unsupported database URL {describe_url(url)!r}: {_SUPPORTED}")
    parsed = parsed.set(drivername=driver)
    if driver == POSTGRESQL_DRIVER and "sslmode" in parsed.query:
        query: dict[str, str | tuple[str, ...]] = dict(parsed.query)
        query.setdefault("ssl", query.pop("sslmode"))
        parsed = parsed.set(query=query)
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``; nothing connects until the first query.

    A SQLite file's directory is created; every SQLite connection runs in WAL mode,
    waits for locks instead of failing at once, and enforces foreign keys.
    """
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        _create_parent_directory(parsed)
        engine = create_async_engine(parsed, **JSON_CODEC)
        event.listen(engine.sync_engine, "do_connect", _use_sqlite_opener)
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
        return engine
    return create_async_engine(
        parsed,
        pool_size=POSTGRESQL_POOL_SIZE,
        max_overflow=POSTGRESQL_MAX_OVERFLOW,
        pool_recycle=POSTGRESQL_POOL_RECYCLE,
        pool_pre_ping=True,
        connect_args={"timeout": POSTGRESQL_CONNECT_TIMEOUT},
        **JSON_CODEC,
    )


@asynccontextmanager
async def translate_errors(
    engine: AsyncEngine, *, conflict: LuthienError | None = None
) -> AsyncIterator[None]:
    """Turn driver and connection errors raised inside the block into ``StorageError``.

    A violated unique constraint becomes ``conflict`` when one is given: the caller
    knows what a duplicate means, the driver does not. Any other refusal of the data
    (``refused``) becomes ``StorageRefused``; the rest (locked, busy, unreachable, a
    permission or a table missing) a plain ``StorageError``.
    """
    try:
        yield
    except IntegrityError as exc:
        if conflict is not None:
            raise conflict from exc
        raise StorageRefused(
            f"database error at {describe_url(engine.url)}: {_reason(exc)}"
        ) from exc
    except Exception as exc:
        if refused(exc):
            raise StorageRefused(
                f"database error at {describe_url(engine.url)}: {_reason(exc)}"
            ) from exc
        if isinstance(exc, ProgrammingError):
            raise StorageError(
                f"database error at {describe_url(engine.url)}: {_reason(exc)}"
            ) from exc
        if isinstance(exc, _unreachable_errors()):
            raise StorageError(
                f"cannot reach the database at {describe_url(engine.url)}: {_reason(exc)}"
            ) from exc
        raise


# SQLSTATE classes of an answer about the data itself: 22 data exception (a value out of
# range, a character the encoding cannot hold), 23 integrity constraint violation.
_REFUSED_SQLSTATE_CLASSES = frozenset({"22", "23"})


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` says that the data cannot be stored, whatever the database's
    state: a constraint or a trigger refused it, or a value cannot be bound or held.
    Being locked, busy, unreachable, out of space or without permission is not a refusal:
    the same data may be stored later."""
    if isinstance(exc, (IntegrityError, DataError, OverflowError)):
        return True  # OverflowError: an integer sqlite3 cannot bind
    if not isinstance(exc, StatementError):
        return False
    if not isinstance(exc, DBAPIError):
        return True  # a column type's bind processor refused the value
    cause = _driver_error(exc)
    sqlstate = getattr(cause, "sqlstate", None)  # asyncpg's server errors
    if isinstance(sqlstate, str) and sqlstate[:2] in _REFUSED_SQLSTATE_CLASSES:
        return True
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(cause, asyncpg.exceptions._base.DataError):
        return True  # asyncpg cannot encode the value (an integer beyond the column's range)
    # sqlite3 cannot bind a value of this type (it names no error class of its own)
    return isinstance(cause, sqlite3.ProgrammingError) and str(cause).startswith(
        "Error binding parameter"
    )


@asynccontextmanager
async def transaction(
    engine: AsyncEngine, *, conflict: LuthienError | None = None
) -> AsyncIterator[AsyncSession]:
    """A session inside one transaction: committed when the block succeeds, else rolled
    back; errors are translated as by ``translate_errors``."""
    async with (
        translate_errors(engine, conflict=conflict),
        AsyncSession(engine, expire_on_commit=False) as session,
        session.begin(),
    ):
        yield session


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What "cannot reach the database" is made of. The drivers are imported only with
    the dialect that needs them (a SQLite proxy never loads asyncpg: ~2 MB of RSS), and
    a driver never imported cannot have raised."""
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None:
        return (OSError, SQLAlchemyError)
    return (OSError, SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _driver_error(exc: StatementError) -> BaseException:
    """The driver's (or a bind processor's) own exception behind a SQLAlchemy one."""
    cause: BaseException = exc if exc.orig is None else exc.orig
    # SQLAlchemy's asyncpg adapter wraps the driver's exception; name the original.
    if type(cause).__module__.startswith("sqlalchemy") and cause.__cause__ is not None:
        cause = cause.__cause__
    return cause


def _reason(exc: BaseException) -> str:
    cause = _driver_error(exc) if isinstance(exc, StatementError) else exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def _create_parent_directory(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the directory of the database at {describe_url(url)}: {exc}"
        ) from exc


def _use_sqlite_opener(
    dialect: Any, connection_record: Any, cargs: Any, cparams: dict[str, Any]
) -> None:
    cparams["async_creator_fn"] = _open_sqlite


async def _open_sqlite(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
    # aiosqlite.connect as SQLAlchemy calls it, except when opening fails: aiosqlite then
    # tells its worker thread to stop without waiting for it, and the thread, reporting
    # back to an event loop that may be closed by then, dies with a traceback on stderr.
    import aiosqlite

    connection = aiosqlite.connect(*args, **kwargs)
    worker = connection._thread
    worker.daemon = True  # as SQLAlchemy sets it: a lost connection must not block exit
    try:
        return await connection
    except BaseException:
        worker.join()  # its last task is trivial: it ends at once
        raise


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL itself may have to wait for a lock.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    # Switching a new file to WAL needs an exclusive lock. When several connections
    # open it at the same moment (workers starting together), they deadlock on it and
    # SQLite fails all but one at once, without waiting for busy_timeout. Each round
    # lets at least one through, and once one has switched the file, it stays switched.
    for attempt in range(1, SQLITE_WAL_ATTEMPTS + 1):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == SQLITE_WAL_ATTEMPTS:
                raise
