"""The proxies the end-to-end tests talk to, and the dialects they speak to them.

By default: a real ``luthien-control serve`` process per configuration (policy file,
database policy) in front of the built-in mock backend, all on free loopback ports.
With ``--e2e-target-url URL``: an already running proxy (its client key from
``TEST_CLIENT_API_KEY``). With ``E2E_REAL_BACKEND=1`` and ``OPENAI_API_KEY``: the
started proxies forward to the real OpenAI API instead of the mock, and only chat
completions are tried (OpenAI does not serve Anthropic's Messages API).

``dialect`` runs a test on chat completions and on the Messages API (``/v1/messages``,
model ``$E2E_MESSAGES_MODEL``, default ``claude-sonnet-4-5``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import (
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    e2e_policy,
)
from tests.e2e.dialects import DIALECTS, Dialect, Messages

REAL_BACKEND = os.environ.get("E2E_REAL_BACKEND") == "1"
MESSAGES_MODEL = os.environ.get("E2E_MESSAGES_MODEL", "claude-sonnet-4-5")


@dataclass
class Backend:
    """What stands behind the proxy: the mock (scriptable, observable) or a real API."""

    mock: MockBackendServer | None
    model: str

    def directives(self, **values: Any) -> dict[str, str]:
        """Mock-backend directives as request headers (a real backend ignores them)."""
        headers = {}
        for name, value in values.items():
            headers["x-mock-" + name.replace("_", "-")] = quote(str(value), safe=":")
        return headers

    @staticmethod
    def request_id() -> str:
        return uuid.uuid4().hex


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    target = request.config.getoption("--e2e-target-url")
    if REAL_BACKEND and not target:
        yield Backend(mock=None, model=os.environ.get("E2E_MODEL", "gpt-4o-mini"))
        return
    if not target:
        yield Backend(mock=request.getfixturevalue("mock_backend"), model="gpt-3.5-turbo")
        return
    model = os.environ.get("E2E_MODEL", "gpt-3.5-turbo")
    mock_url = request.config.getoption("--e2e-mock-url")
    if not mock_url:
        yield Backend(mock=None, model=model)
        return
    mock = MockBackendServer(mock_url.rstrip("/"))
    with mock.client:  # the mock is another process's: only our client to close
        yield Backend(mock=mock, model=model)


def _backend_url(backend: Backend) -> str:
    return backend.mock.api_base if backend.mock is not None else "https://api.openai.com/v1"


def _env() -> dict[str, str]:
    if REAL_BACKEND:
        return {"OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]}
    return {}


@pytest.fixture(scope="session")
def file_proxy(request: pytest.FixtureRequest, backend: Backend) -> ProxyServer:
    """The proxy configured from a policy file (SPEC's minimal e2e policy)."""
    target = request.config.getoption("--e2e-target-url")
    if target:
        return ProxyServer(target.rstrip("/"), CLIENT_KEY)
    start: ProxyStarter = request.getfixturevalue("start_proxy")
    return start(policy=e2e_policy(_backend_url(backend)), env=_env())


_db_proxies: dict[str, ProxyServer] = {}


def _db_proxy(request: pytest.FixtureRequest, backend: Backend, database: str) -> ProxyServer:
    """The proxy configured from the same policy stored in the database: SQLite, or a
    real PostgreSQL server started for the suite. One per database for the session."""
    target = request.config.getoption("--e2e-target-url")
    if target:
        return ProxyServer(target.rstrip("/"), CLIENT_KEY)
    if database not in _db_proxies:
        start: ProxyStarter = request.getfixturevalue("start_proxy")
        url = None
        if database == "postgres":
            url = request.getfixturevalue("postgres").create_database("e2e")
        _db_proxies[database] = start(
            db_policy=e2e_policy(_backend_url(backend)),
            policy_name="e2e_root",
            env=_env(),
            database_url=url,
        )
    return _db_proxies[database]


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def db_proxy(request: pytest.FixtureRequest, backend: Backend) -> ProxyServer:
    """The database-configured proxy, on SQLite and on PostgreSQL."""
    return _db_proxy(request, backend, request.param)


@pytest.fixture(params=["file", "sqlite", "postgres"])
def proxy(request: pytest.FixtureRequest, backend: Backend) -> ProxyServer:
    """Each test runs against every configuration."""
    if request.param == "file":
        proxy: ProxyServer = request.getfixturevalue("file_proxy")
        return proxy
    return _db_proxy(request, backend, request.param)


@pytest.fixture(params=list(DIALECTS))
def dialect(request: pytest.FixtureRequest, backend: Backend) -> Dialect:
    """Each test that takes it runs on chat completions and on the Messages API."""
    kind = DIALECTS[request.param]
    if kind is Messages:
        if REAL_BACKEND and not request.config.getoption("--e2e-target-url"):
            pytest.skip("the real backend is OpenAI's, which has no Messages API")
        return kind(MESSAGES_MODEL)
    return kind(backend.model)
