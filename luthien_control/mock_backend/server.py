"""Serving the mock backend with uvicorn (uvloop + httptools, quiet logs).

``run`` takes the backend key (default ``$MOCK_BACKEND_API_KEY``) and a server-wide default
scenario (default ``$MOCK_SCENARIO``): a JSON object of ``x-mock-*`` directives applied to
every request that brings none of its own, for clients that cannot send headers, such as
``{"x-mock-tool-calls": "[{\"name\": \"Bash\", \"arguments\": {\"command\": \"ls\"}}]"}``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import uvicorn

from luthien_control.exceptions import ConfigurationError
from luthien_control.mock_backend.app import MockBackend
from luthien_control.mock_backend.exchange import ConnectionDropped
from luthien_control.mock_backend.scenario import (
    DEFAULT_SCENARIO,
    DirectiveError,
    Scenario,
    scenario_from_json,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
API_KEY_ENV = "MOCK_BACKEND_API_KEY"
SCENARIO_ENV = "MOCK_SCENARIO"
READY_MESSAGE = "mock backend listening on http://{host}:{port}/v1"


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every stream dropped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


class _Server(uvicorn.Server):
    """Announces the bound address (the real port when asked for port 0) once listening."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        print(READY_MESSAGE.format(host=host, port=port), flush=True)


def run(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    scenario: str | None = None,
) -> None:
    """Serve ``MockBackend()`` until interrupted; ``api_key`` defaults to
    ``$MOCK_BACKEND_API_KEY`` (no authentication when neither is set), ``scenario`` (the
    default scenario's JSON) to ``$MOCK_SCENARIO``.

    Raises ``ConfigurationError`` when the scenario is not one.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if scenario is None:
        scenario = os.environ.get(SCENARIO_ENV) or None
    config = uvicorn.Config(
        MockBackend(api_key=api_key, scenario=default_scenario(scenario)),
        host=host,
        port=port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    _Server(config).run()


def default_scenario(text: str | None) -> Scenario:
    """The scenario of a ``--scenario`` or ``$MOCK_SCENARIO`` JSON text (None: the default)."""
    if text is None:
        return DEFAULT_SCENARIO
    try:
        return scenario_from_json(text)
    except DirectiveError as exc:
        raise ConfigurationError(f"mock backend scenario: {exc}") from exc
