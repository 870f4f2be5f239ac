"""The coding-agent CLIs from the npm registry, run through a real proxy process.

``make test`` installs the versions pinned in ``package-lock.json`` (``npm ci --prefix
tests/agents``). Each run gets a fresh HOME and config directory, an environment of only
the variables set here (nothing inherited but ``PATH``), and the switches that stop the
CLI's own calls home, so that nothing leaves the loopback interface: the CLI talks to a
``luthien-control serve`` process, which forwards to the built-in mock backend.

The mock is scripted per request by ``x-mock-*`` headers, which each CLI is configured to
send (Codex: ``http_headers`` of its provider; Claude Code: ``ANTHROPIC_CUSTOM_HEADERS``).
Records are read back through the admin API (``/admin/api/transactions``), which reads
the same database as ``luthien-control logs`` without a Python start-up per look.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import (
    BACKEND_KEY,
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
)

AGENTS_DIR = Path(__file__).parent
BIN_DIR = AGENTS_DIR / "node_modules" / ".bin"
RUN_TIMEOUT = 60.0  # seconds one CLI run may take before the test fails
RECORD_TIMEOUT = 10.0  # records are written in the background: poll this long at most
ADMIN_KEY = "lc-agents-admin-key-0123456789"
MARKER = "marker.txt"  # what the scripted shell command creates in the working directory
# The shell tools of both agents: Codex's (``exec_command``, formerly ``shell`` and
# ``shell_command``) and Claude Code's (``Bash``).
DENIED_TOOLS = ["exec_command", "shell", "shell_command", "Bash"]


def agent_binary(name: str) -> Path:
    """The installed CLI ``name``; skipped when the npm step has not run, except under
    ``make test`` (LUTHIEN_REQUIRE_AGENTS=1), which installs them and so never skips."""
    path = BIN_DIR / name
    if not path.exists():
        message = f"{name} is not installed: run `npm ci --prefix tests/agents` (or `make test`)"
        if os.environ.get("LUTHIEN_REQUIRE_AGENTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def agent_policy(backend_url: str, *, action: str) -> dict[str, Any]:
    """Client keys checked, the backend key added, the request sent to the mock, and a
    ``ToolCallPolicy`` on the answer that denies the shell tools (``block``,
    ``drop_call``, or ``message``: a block with ``block_with: message``)."""
    config: dict[str, Any] = {"denied_tools": DENIED_TOOLS, "action": action}
    if action == "message":
        config.update(action="block", block_with="message")
    tools = {"type": "ToolCallPolicy", "config": config}
    policies = [
        {"type": "ClientApiKeyAuth", "config": {}},
        {"type": "AddApiKeyHeader", "config": {}},
        {"type": "SetBackendPolicy", "config": {"backend_url": backend_url}},
        {"type": "SendBackendRequest", "config": {}},
        tools,
    ]
    return {"type": "SerialPolicy", "config": {"name": f"agents-{action}", "policies": policies}}


@dataclass(frozen=True)
class GuardedProxies:
    """Two proxies whose ``ToolCallPolicy`` denies the shell tools: ``blocking`` refuses
    an answer that calls one, ``dropping`` removes the call from the answer."""

    blocking: ProxyServer
    dropping: ProxyServer
    messaging: ProxyServer  # blocks with block_with: message


@pytest.fixture(scope="session")
def guarded_proxies(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> GuardedProxies:
    # Started side by side: a start is mostly Python importing, one core each.
    def start(action: str) -> ProxyServer:
        return start_proxy(
            policy=agent_policy(mock_backend.api_base, action=action),
            env={"ADMIN_API_KEY": ADMIN_KEY, "ANTHROPIC_API_KEY": BACKEND_KEY},
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        blocking, dropping, messaging = pool.map(start, ["block", "drop_call", "message"])
    return GuardedProxies(blocking, dropping, messaging)


class Target(Protocol):
    """Where an agent is pointed: a proxy, or the mock backend itself (the control runs)."""

    @property
    def url(self) -> str: ...  # http://127.0.0.1:PORT

    @property
    def api_base(self) -> str: ...  # url + "/v1"


def mock_directives(
    *, content: str | None = None, tool_calls: list[dict[str, Any]] | None = None
) -> dict[str, str]:
    """``x-mock-*`` headers for a scripted reply (percent-encoded, as the mock reads them)."""
    headers = {}
    if content is not None:
        headers["x-mock-content"] = quote(content, safe="")
    if tool_calls is not None:
        headers["x-mock-tool-calls"] = quote(json.dumps(tool_calls), safe="")
    return headers


# --- records ----------------------------------------------------------------------------


def _admin_get(proxy: ProxyServer, path: str, **params: Any) -> Any:
    response = httpx.get(
        f"{proxy.url}/admin/api/{path}",
        params=params,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def last_seq(proxy: ProxyServer) -> int:
    """The sequence number of the proxy's newest record (0 before the first)."""
    data = _admin_get(proxy, "transactions", limit=1)["data"]
    return int(data[0]["seq"]) if data else 0


def records_after(proxy: ProxyServer, seq: int, *, count: int = 1) -> list[dict[str, Any]]:
    """The whole records (decisions included) of the transactions after ``seq``, oldest
    first, once at least ``count`` of them are stored (polled, bounded)."""
    deadline = time.monotonic() + RECORD_TIMEOUT
    while True:
        rows = [r for r in _admin_get(proxy, "transactions", limit=50)["data"] if r["seq"] > seq]
        if len(rows) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    rows.sort(key=lambda row: int(row["seq"]))
    return [_admin_get(proxy, f"transactions/{row['id']}") for row in rows]


# --- running a CLI ----------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRun:
    """What one CLI run did: its exit status (``None`` when the test stopped it, having
    seen what it waited for) and its output."""

    returncode: int | None
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_agent(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    until: Callable[[], bool] | None = None,
) -> AgentRun:
    """Run a CLI in a session of its own until it exits, ``until()`` holds, or
    ``RUN_TIMEOUT`` passes (a failure). Its whole process group (the CLI and any tool
    it started) is killed afterwards, whatever happened."""
    out_path, err_path = cwd.parent / "stdout.txt", cwd.parent / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    seen = False
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if until is not None and until():
                seen = True
                break
            time.sleep(0.05)
    finally:
        with_status = process.poll()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    run = AgentRun(
        None if seen and with_status is None else process.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )
    if with_status is None and not seen:
        pytest.fail(f"{argv[0]} did not finish within {RUN_TIMEOUT} s:\n{run}")
    return run


@dataclass
class AgentSandbox:
    """A fresh HOME, a config directory and an empty working directory for one run."""

    home: Path
    config: Path
    workdir: Path

    @property
    def marker(self) -> Path:
        return self.workdir / MARKER


@pytest.fixture
def sandbox(tmp_path: Path) -> AgentSandbox:
    box = AgentSandbox(tmp_path / "home", tmp_path / "config", tmp_path / "work")
    for directory in (box.home, box.config, box.workdir):
        directory.mkdir()
    return box


def base_env(sandbox: AgentSandbox) -> dict[str, str]:
    """Nothing of the caller's environment but ``PATH`` (node, and the shell the tools
    run in): no real API key, no proxy settings, no user configuration."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(sandbox.home)}


# --- Codex ------------------------------------------------------------------------------

CODEX_MODEL = "gpt-4o-mini"  # a model the mock knows; Codex warns that it has no metadata


def codex_config(base_url: str, *, headers: dict[str, str] | None = None) -> str:
    """``$CODEX_HOME/config.toml`` for a proxy at ``base_url`` (the README shows the
    same). Codex ignores OPENAI_BASE_URL: only a provider of its own reaches a proxy.
    It sends ``Authorization: Bearer $LUTHIEN_API_KEY`` and ``POST {base_url}/responses``."""
    lines = [
        f"model = {json.dumps(CODEX_MODEL)}",
        'model_provider = "luthien"',
        "check_for_update_on_startup = false",
        "",
        "[analytics]",
        "enabled = false",
        "",
        "[features]",
        # On by default, the plugins feature clones github.com/openai/plugins.git and asks
        # api.github.com and chatgpt.com at start-up: the only traffic that left loopback.
        "plugins = false",
        "",
        "[model_providers.luthien]",
        'name = "Luthien Control"',
        f"base_url = {json.dumps(base_url)}",
        'env_key = "LUTHIEN_API_KEY"',
        'wire_api = "responses"',
        # A blocked answer ends its stream with an error event; Codex would reconnect five
        # times before giving up.
        "stream_max_retries = 0",
        "request_max_retries = 0",
    ]
    if headers:
        pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in headers.items())
        lines.append(f"http_headers = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def run_codex(
    sandbox: AgentSandbox,
    target: Target,
    prompt: str,
    *,
    headers: dict[str, str] | None = None,
    until: Callable[[], bool] | None = None,
) -> AgentRun:
    """``codex exec PROMPT`` in the sandbox's working directory, pointed at ``target``.

    Approvals and Codex's own sandbox are off (``--dangerously-bypass-...``), so that a
    shell command the model asks for really runs unless the proxy stops it."""
    (sandbox.config / "config.toml").write_text(codex_config(target.api_base, headers=headers))
    env = base_env(sandbox) | {"CODEX_HOME": str(sandbox.config), "LUTHIEN_API_KEY": CLIENT_KEY}
    argv = [
        str(agent_binary("codex")),
        "exec",
        "--skip-git-repo-check",  # the working directory is a fresh, empty one
        "--ephemeral",  # no session files
        "--color",
        "never",
        "--dangerously-bypass-approvals-and-sandbox",
        prompt,
    ]
    return run_agent(argv, env=env, cwd=sandbox.workdir, until=until)


# --- Claude Code ------------------------------------------------------------------------


def claude_env(sandbox: AgentSandbox, target: Target, headers: dict[str, str]) -> dict[str, str]:
    """Claude Code's environment for a proxy (the README shows the same). It sends
    ``POST {ANTHROPIC_BASE_URL}/v1/messages?beta=true`` with ``x-api-key``."""
    return base_env(sandbox) | {
        "CLAUDE_CONFIG_DIR": str(sandbox.config),
        "ANTHROPIC_BASE_URL": target.url,
        "ANTHROPIC_API_KEY": CLIENT_KEY,
        # Without these three it asks api.anthropic.com (telemetry, error reports,
        # feature flags) and sends HEAD /api/hello to the proxy first.
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # An error it takes for a passing one (429, 5xx, overloaded) would be retried with
        # back-off for up to a minute: none of that here, the run stays short.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        # Extra request headers, one "Name: Value" a line: here the mock's directives.
        "ANTHROPIC_CUSTOM_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers.items()),
    }


def run_claude(
    sandbox: AgentSandbox,
    target: Target,
    prompt: str,
    *,
    headers: dict[str, str] | None = None,
    until: Callable[[], bool] | None = None,
) -> AgentRun:
    """``claude -p PROMPT`` (print mode) in the sandbox's working directory, pointed at
    ``target``, its Bash tool allowed without asking, so that a command the model asks
    for really runs unless the proxy stops it."""
    argv = [
        str(agent_binary("claude")),
        "-p",
        "--no-session-persistence",
        "--allowedTools",
        "Bash",
        "--",
        prompt,
    ]
    env = claude_env(sandbox, target, headers or {})
    return run_agent(argv, env=env, cwd=sandbox.workdir, until=until)
