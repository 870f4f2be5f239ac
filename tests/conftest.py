"""Fixtures shared by the whole suite: real servers on free loopback ports.

``mock_backend`` is the built-in mock backend in its own process; ``start_proxy``
starts ``luthien-control serve`` as a user would, with a policy file or a database
policy, and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn

from tests.postgres import PostgresServer, find_bindir, remove, start_postgres

CLIENT_KEY = os.environ.get("TEST_CLIENT_API_KEY") or "lc-test-client-key-0123456789"
BACKEND_KEY = "mock-backend-key"
READY_TIMEOUT = 30.0


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, as the proxy does (uvloop is asyncio's loop). Trio is
    installed (Selenium needs it), and anyio's own default would run each test on it too."""
    return "asyncio"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("luthien", "Luthien Control end-to-end tests")
    group.addoption(
        "--e2e-target-url",
        default=None,
        help="run the e2e tests against this already running proxy (e.g. http://127.0.0.1:8000)",
    )
    group.addoption(
        "--e2e-mock-url",
        default=None,
        help="with --e2e-target-url: the mock backend behind that proxy, so that the "
        "disconnect test can see the cancellation reach it",
    )


# `make test` runs the suite on pytest-xdist workers (`-n 3 --dist loadgroup`, Makefile).
# Each module is one unit of work, run whole by one worker, so that its module- and
# session-scoped servers start once there; a module may split itself into several units
# with `xdist_group` marks (tests/test_red_team.py). The modules that take longest are
# handed out first (in this order), so that no worker starts one near the end; the rest
# follow in collection order. A stale list costs balance, not coverage.
SLOW_FIRST = (
    "tests/test_recording.py",
    "tests/test_red_team.py",
    "tests/test_egress_hygiene.py",
    "tests/test_operations.py",
    "tests/test_messages_api.py",
    "tests/test_serve_db.py",
    "tests/test_recorder_faults.py",
    "tests/test_review_queue.py",
    "tests/test_responses_tool_calls.py",
    "tests/test_proxy.py",
    "tests/bench/test_bench.py",
    "tests/test_console.py",
    "tests/hardening/test_backend_faults.py",
    "tests/upstream/test_connect.py",
    "tests/test_tool_calls.py",
    "tests/agents/test_agents.py",
)


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the slow modules first (``SLOW_FIRST``), each kept in order."""
    if hasattr(config, "workerinput"):
        rank = {module: n for n, module in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(module_of(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: a module is one group, unless its tests name their own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):
                return str(super()._split_scope(nodeid))
            return module_of(nodeid)

    config.option.loadscopereorder = False  # the order is the workers' (SLOW_FIRST)
    return ModuleScheduling(config, log)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A server in its own process, its output in a log file shown when a test fails."""

    args: list[str]
    env: dict[str, str]
    ready_url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready within {READY_TIMEOUT} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (skipped only where it is not installed and not required:
    ``make test`` sets LUTHIEN_REQUIRE_POSTGRES=1, so CI never skips it)."""
    if find_bindir() is None and os.environ.get("LUTHIEN_REQUIRE_POSTGRES") != "1":
        pytest.skip("PostgreSQL is not installed")
    server = start_postgres(free_port())
    yield server
    remove(server)


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


@dataclass
class MockBackendServer:
    url: str  # http://127.0.0.1:PORT
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def record(self, request_id: str) -> dict[str, Any] | None:
        response = self.client.get(f"{self.url}/_mock/requests/{request_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        record: dict[str, Any] = response.json()
        return record

    def wait_for_record(
        self, request_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any] | None:
        """Poll the mock's record of a request until ``until`` holds (bounded); the last seen."""
        deadline = time.monotonic() + timeout
        record = self.record(request_id)
        while time.monotonic() < deadline and (record is None or not until(record)):
            time.sleep(0.02)
            record = self.record(request_id)
        return record


def python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "POLICY_"))}
    for name in ("OPENAI_API_KEY", "DATABASE_URL", "TOP_LEVEL_POLICY_NAME", "RUN_MODE"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def mock_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockBackendServer]:
    """The built-in mock backend, in its own process on a free loopback port."""
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "luthien_control.mock_backend", "--port", str(port)],
        python_env(),
        f"http://127.0.0.1:{port}/health",
        tmp_path_factory.mktemp("mock") / "mock-backend.log",
    )
    server.start()
    mock = MockBackendServer(f"http://127.0.0.1:{port}")
    yield mock
    mock.client.close()
    server.stop()


def e2e_policy(backend_url: str) -> dict[str, Any]:
    """SPEC's minimal policy, pointed at ``backend_url``."""
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "E2E",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {}},
                {
                    "type": "AddApiKeyHeaderFromEnv",
                    "config": {"api_key_env_var_name": "OPENAI_API_KEY"},
                },
                {"type": "SetBackendPolicy", "config": {"backend_url": backend_url}},
                {"type": "SendBackendRequest", "config": {}},
            ],
        },
    }


@dataclass
class ProxyServer:
    url: str  # http://127.0.0.1:PORT
    key: str
    server: ServerProcess | None = None
    database_url: str = ""

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a ``luthien-control`` command against this proxy's database."""
        return run_cli(self.database_url, *args)

    def record(self, transaction_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The stored record of a transaction, through ``luthien-control logs
        --transaction ID --json``; records are written in the background, so this polls
        (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.cli("logs", "--transaction", transaction_id, "--json")
            if result.returncode == 0:
                record: dict[str, Any] = json.loads(result.stdout)
                return record
            assert "no transaction" in result.stderr, result.stderr
            assert time.monotonic() < deadline, f"transaction {transaction_id} never recorded"
            time.sleep(0.1)


def run_cli(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "luthien_control", *args],
        env=python_env(DATABASE_URL=database_url, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


ProxyStarter = Callable[..., ProxyServer]


@pytest.fixture(scope="session")
def start_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStarter]:
    """Start ``luthien-control serve`` with a policy file (``policy=``) or a database policy
    (``db_policy=``), a fresh SQLite database and the test client key."""
    started: list[ServerProcess] = []
    template: list[Path] = []
    template_lock = threading.Lock()

    def fresh_sqlite(directory: Path) -> str:
        """A new SQLite database with the schema and the test client key. The first is made
        by ``luthien-control keys add``, as a user would; the others are copies of it,
        which saves a Python start-up and the migrations for each proxy."""
        with template_lock:
            if not template:
                made = tmp_path_factory.mktemp("template") / "luthien.db"
                url = f"sqlite+aiosqlite:///{made}"
                result = run_cli(url, "keys", "add", "--name", "e2e", "--key", CLIENT_KEY)
                assert result.returncode == 0, result.stderr
                template.append(made)
        shutil.copyfile(template[0], directory / "luthien.db")
        return f"sqlite+aiosqlite:///{directory / 'luthien.db'}"

    def start(
        *,
        policy: dict[str, Any] | None = None,
        db_policy: dict[str, Any] | None = None,
        policy_name: str = "root",
        env: dict[str, str] | None = None,
        workers: int = 1,
        database_url: str | None = None,
    ) -> ProxyServer:
        directory = tmp_path_factory.mktemp("proxy")
        if database_url is None:
            database_url = fresh_sqlite(directory)
        else:
            result = run_cli(database_url, "keys", "add", "--name", "e2e", "--key", CLIENT_KEY)
            assert result.returncode == 0, result.stderr
        # The caller's env wins (a real backend's OPENAI_API_KEY under E2E_REAL_BACKEND).
        given = {"OPENAI_API_KEY": BACKEND_KEY, **(env or {})}
        server_env = python_env(
            DATABASE_URL=database_url, TOP_LEVEL_POLICY_NAME=policy_name, **given
        )
        if policy is not None:
            policy_file = directory / "policy.json"
            policy_file.write_text(json.dumps(policy))
            server_env["POLICY_FILEPATH"] = str(policy_file)
        if db_policy is not None:
            policy_file = directory / "db-policy.json"
            policy_file.write_text(json.dumps(db_policy))
            result = run_cli(
                database_url, "policy", "load", str(policy_file), "--name", policy_name
            )
            assert result.returncode == 0, result.stderr
        port = free_port()
        server = ServerProcess(
            [
                sys.executable,
                "-m",
                "luthien_control",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            server_env,
            f"http://127.0.0.1:{port}/ready",
            directory / "proxy.log",
        )
        server.start()
        started.append(server)
        return ProxyServer(f"http://127.0.0.1:{port}", CLIENT_KEY, server, database_url)

    yield start
    for server in started:
        server.stop()


def tool_call_policy(backend: str, *, action: str) -> dict[str, Any]:
    """``ToolCallPolicy`` (no ``shell``, no ``/etc/`` in arguments) on both sides."""
    tools = {
        "type": "ToolCallPolicy",
        "config": {"denied_tools": ["shell"], "argument_patterns": [r"/etc/"], "action": action},
    }
    return {
        "type": "SerialPolicy",
        "config": {
            "name": f"tools-{action}",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                tools,
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                tools,
            ],
        },
    }


@pytest.fixture(scope="session")
def blocking_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """A proxy whose ToolCallPolicy blocks forbidden calls (chat and Responses API)."""
    return start_proxy(policy=tool_call_policy(mock_backend.api_base, action="block"))


@pytest.fixture(scope="session")
def dropping_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """A proxy whose ToolCallPolicy drops forbidden calls."""
    return start_proxy(policy=tool_call_policy(mock_backend.api_base, action="drop_call"))


def scripted(
    *calls: dict[str, Any], chunk_size: int = 5, content: str | None = None
) -> dict[str, str]:
    """The mock's directives for a reply with these tool calls (and text before them)."""
    headers = {
        "x-mock-tool-calls": quote(json.dumps(list(calls)), safe=""),
        "x-mock-chunk-size": str(chunk_size),
        "x-mock-request-id": uuid.uuid4().hex,
    }
    if content is not None:
        headers["x-mock-content"] = quote(content, safe="")
    return headers


def compact(arguments: dict[str, Any]) -> str:
    """The arguments as the mock writes them."""
    return json.dumps(arguments, separators=(",", ":"))


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port in a thread (a backend
    or a judge a test scripts itself); yields its /v1 URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def content_judge_url() -> Iterator[str]:
    """The mock backend as a trusted-model judge that flags or blocks any text containing
    ``FORBIDDEN`` (``tests.policies.test_judge.ContentJudge``)."""
    from tests.policies.test_judge import ContentJudge

    with serve_in_thread(ContentJudge()) as url:
        yield url
