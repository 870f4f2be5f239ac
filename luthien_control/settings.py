"""One typed, immutable settings object, loaded once at start-up.

Values come from the environment and a ``.env`` file in the working directory
(``load_settings`` reads them and turns a bad value into one clear error).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from luthien_control.exceptions import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./luthien_control.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MOCK_PORT = 9000
DEFAULT_POLICY_NAME = "root"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 600.0
DEFAULT_POOL_SIZE = 1000
# The proxy's own calls (judges): a pool apart from the clients' requests, which hold
# their slots while a judge decides (app.Services).
DEFAULT_JUDGE_POOL_SIZE = 100
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
DEFAULT_REFRESH_INTERVAL = 1.0
DEFAULT_RECORDER_BACKLOG = 50_000
# Clients (docs/operations.md#limits): the time to send a request's head, and then its
# whole body; the time an answer may wait for a client that reads none of it; the
# connections one worker holds open; how long a shutdown lets the requests in flight
# finish before it ends them.
DEFAULT_CLIENT_HEADER_TIMEOUT = 30.0
DEFAULT_CLIENT_BODY_TIMEOUT = 120.0
DEFAULT_CLIENT_SEND_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_SHUTDOWN_GRACE = 30
DEFAULT_RECORDER_BACKLOG_BYTES = 256 * 1024 * 1024  # the queued rows' text, together
DEFAULT_DNS_TTL = 300.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Backend timeouts in seconds: to open a connection, and between two reads."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits: a backend connection pool and the largest accepted request body."""

    pool_size: int = DEFAULT_POOL_SIZE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class Network:
    """How backend connections are opened: how long a host name's addresses are reused
    (0: resolved for every connection), the CA bundle that replaces the system trust
    store, the client certificate shown to backends that ask for one, and the egress
    proxies, as ``urllib.request.getproxies_environment()`` reads ``HTTPS_PROXY``,
    ``HTTP_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (keys ``https``, ``http``, ``all``,
    ``no``)."""

    dns_ttl: float = DEFAULT_DNS_TTL
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    proxies: Mapping[str, str] = field(default_factory=dict)


class Settings(BaseSettings):
    """Everything the proxy reads from its environment (see docs/configuration.md)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    policy_filepath: Path | None = None
    top_level_policy_name: str = DEFAULT_POLICY_NAME
    database_url: str = DEFAULT_DATABASE_URL
    backend_url: str | None = None
    openai_api_key: str | None = None
    anthropic_api_key: str | None = None  # AddApiKeyHeader's key on the Messages API
    test_client_api_key: str | None = None
    run_mode: Literal["dev", "prod"] = "prod"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    backend_connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    backend_read_timeout: float = Field(DEFAULT_READ_TIMEOUT, gt=0)
    backend_pool_size: int = Field(DEFAULT_POOL_SIZE, ge=1)
    judge_pool_size: int = Field(DEFAULT_JUDGE_POOL_SIZE, ge=1)
    backend_dns_ttl: float = Field(DEFAULT_DNS_TTL, ge=0)
    backend_ca_bundle: Path | None = None
    backend_client_cert: Path | None = None
    backend_client_key: Path | None = None
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=1024)
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)
    refresh_interval: float = Field(DEFAULT_REFRESH_INTERVAL, gt=0)
    recorder_backlog: int = Field(DEFAULT_RECORDER_BACKLOG, ge=1)
    client_header_timeout: float = Field(DEFAULT_CLIENT_HEADER_TIMEOUT, gt=0)
    client_body_timeout: float = Field(DEFAULT_CLIENT_BODY_TIMEOUT, gt=0)
    client_send_timeout: float = Field(DEFAULT_CLIENT_SEND_TIMEOUT, ge=0)  # 0: none
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1)
    shutdown_grace_seconds: int = Field(DEFAULT_SHUTDOWN_GRACE, ge=0)
    recorder_backlog_bytes: int = Field(DEFAULT_RECORDER_BACKLOG_BYTES, ge=1024 * 1024)
    # Where the recorder writes the records the database refuses (one JSON line each);
    # unset: next to the SQLite file, or in the working directory (recording.py).
    recorder_dead_letter: Path | None = None
    admin_api_key: str | None = None
    # How long a console sign-in lasts, in seconds (8 hours: a working day).
    admin_session_lifetime: float = Field(8 * 3600, gt=0, le=30 * 24 * 3600)

    @field_validator(
        "policy_filepath",
        "recorder_dead_letter",
        "backend_ca_bundle",
        "backend_client_cert",
        "backend_client_key",
        "backend_url",
        "openai_api_key",
        "anthropic_api_key",
        "admin_api_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("backend_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @cached_property
    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.backend_connect_timeout, read=self.backend_read_timeout)

    @cached_property
    def limits(self) -> Limits:
        return Limits(pool_size=self.backend_pool_size, max_request_bytes=self.max_request_bytes)

    @cached_property
    def network(self) -> Network:
        """How backend connections are opened; the proxies from the process environment."""
        return Network(
            dns_ttl=self.backend_dns_ttl,
            ca_bundle=self.backend_ca_bundle,
            client_cert=self.backend_client_cert,
            client_key=self.backend_client_key,
            proxies=urllib.request.getproxies_environment(),
        )

    @cached_property
    def judge_limits(self) -> Limits:
        """The pool of the calls the proxy makes for itself (judges)."""
        return Limits(pool_size=self.judge_pool_size, max_request_bytes=self.max_request_bytes)

    @property
    def demo_mode(self) -> bool:
        """No backend configured at all: run against the built-in mock backend."""
        return self.backend_url is None and self.openai_api_key is None

    @property
    def dev(self) -> bool:
        return self.run_mode == "dev"


def load_settings() -> Settings:
    """The settings from the environment; a bad value is a ``ConfigurationError``. (TLS
    files and proxy URLs are checked by ``serve``: ``upstream.connect.check_network``.)"""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]).upper() if error["loc"] else "setting"
        raise ConfigurationError(f"invalid {name}: {error['msg']}") from exc
