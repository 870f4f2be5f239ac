"""Real coding agents, installed from the npm registry, controlled by a real proxy.

Each agent answers a prompt through the proxy, and is stopped by ``ToolCallPolicy`` when
the mock backend makes the model call the agent's shell tool with a command that would
create a marker file: the file must not appear, and the proxy must have recorded what it
did, a ``blocked`` outcome or a ``dropped`` decision. A control run, pointed at the mock
backend itself, shows that the same scripted call really runs the command.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from luthien_control.mock_backend.content import GREETING
from tests.agents.conftest import (
    CODEX_MODEL,
    MARKER,
    AgentSandbox,
    GuardedProxies,
    claude_env,
    codex_config,
    last_seq,
    mock_directives,
    records_after,
    run_claude,
    run_codex,
)
from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer

MARKER_COMMAND = f"echo ran > {MARKER}"
SAYS = "Creating the marker file."
PROMPT = "Say hello to the proxy"
CODEX_SHELL = {"name": "exec_command", "arguments": {"cmd": MARKER_COMMAND}}
CLAUDE_BASH = {"name": "Bash", "arguments": {"command": MARKER_COMMAND, "description": SAYS}}


README = Path(__file__).resolve().parents[2] / "README.md"


def decisions(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(d["policy"], d["action"]) for d in record["decisions"]]


def assert_every_attempt_blocked(records: list[dict[str, Any]]) -> None:
    """The agent's requests (one, or more if it asked again) were all blocked by the policy."""
    assert records, "no transaction recorded"
    assert {r["outcome"] for r in records} == {"blocked"}, records
    assert {d for r in records for d in decisions(r)} == {("ToolCallPolicy", "blocked")}


def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A TOML document as dotted keys: ``{"model_providers.luthien.base_url": ...}``."""
    items: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            items |= flat(value, f"{prefix}{key}.")
        else:
            items[prefix + key] = value
    return items


def test_the_readme_configures_the_agents_as_these_tests_do(sandbox: AgentSandbox) -> None:
    section = README.read_text().split("## Coding agents", 1)[1].split("\n## ", 1)[0]
    [toml] = re.findall(r"```toml\n(.*?)```", section, re.S)
    tested = flat(tomllib.loads(codex_config("http://127.0.0.1:8000/v1")))
    assert flat(tomllib.loads(toml)).items() <= tested.items()
    [bash] = re.findall(r"```bash\n(.*?)```", section, re.S)
    exported = dict(
        re.findall(r"\b([A-Z_]+)=(\S+)", "\n".join(re.findall(r"^export (.*)", bash, re.M)))
    )
    env = claude_env(sandbox, ProxyServer("http://127.0.0.1:8000", CLIENT_KEY), {})
    exported["ANTHROPIC_API_KEY"] = CLIENT_KEY  # "<client key>" in the README
    assert exported.items() <= env.items()


# --- Codex (the Responses API) ------------------------------------------------------------


def test_codex_answers_through_the_proxy(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.blocking
    before = last_seq(proxy)

    run = run_codex(sandbox, proxy, PROMPT)

    assert run.returncode == 0, run
    assert run.stdout.strip() == GREETING + PROMPT, run
    [record] = records_after(proxy, before)
    assert (record["method"], record["endpoint"], record["model"]) == (
        "POST",
        "/responses",
        CODEX_MODEL,
    )
    assert (record["status"], record["outcome"], record["streamed"]) == (200, "ok", True)
    assert record["client_key_name"] == "e2e"
    assert record["decisions"] == []


def test_codex_runs_the_scripted_shell_call_without_a_proxy(
    sandbox: AgentSandbox, mock_backend: MockBackendServer
) -> None:
    """The control: pointed at the mock itself, Codex runs the command. (Should the mock
    script the call on every turn, Codex would go on: it is stopped once the marker is
    there.)"""
    headers = mock_directives(content=SAYS, tool_calls=[CODEX_SHELL])

    run_codex(sandbox, mock_backend, "Create it", headers=headers, until=sandbox.marker.exists)

    assert sandbox.marker.read_text() == "ran\n"


def test_codex_shell_call_is_dropped_by_tool_call_policy(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.dropping
    before = last_seq(proxy)
    headers = mock_directives(content=SAYS, tool_calls=[CODEX_SHELL])

    run = run_codex(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode == 0, run
    assert run.stdout.strip() == SAYS, run
    assert not sandbox.marker.exists()
    [record] = records_after(proxy, before)
    assert record["outcome"] == "ok"
    assert decisions(record) == [("ToolCallPolicy", "dropped")]
    assert "exec_command" in record["decisions"][0]["detail"]


def test_codex_is_stopped_by_a_blocking_tool_call_policy(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.blocking
    before = last_seq(proxy)
    headers = mock_directives(tool_calls=[CODEX_SHELL])

    run = run_codex(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode != 0, run
    assert "blocked by ToolCallPolicy" in run.stderr, run
    assert not sandbox.marker.exists()
    assert_every_attempt_blocked(records_after(proxy, before))


# --- Claude Code (Anthropic's Messages API) ------------------------------------------------


def test_claude_code_answers_through_the_proxy(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.blocking
    before = last_seq(proxy)

    run = run_claude(sandbox, proxy, PROMPT)

    assert run.returncode == 0, run
    # The mock echoes the last user message, where Claude Code puts reminders first.
    assert run.stdout.startswith(GREETING), run
    assert run.stdout.rstrip().endswith(PROMPT), run
    [record] = records_after(proxy, before)
    assert (record["method"], record["endpoint"]) == ("POST", "/messages")
    assert record["model"].startswith("claude-")
    assert (record["status"], record["outcome"], record["streamed"]) == (200, "ok", True)
    assert record["client_key_name"] == "e2e"  # from x-api-key
    assert record["decisions"] == []


def test_claude_code_runs_the_scripted_bash_call_without_a_proxy(
    sandbox: AgentSandbox, mock_backend: MockBackendServer
) -> None:
    """The control: pointed at the mock itself, Claude Code runs the command."""
    headers = mock_directives(content=SAYS, tool_calls=[CLAUDE_BASH])

    run_claude(sandbox, mock_backend, "Create it", headers=headers, until=sandbox.marker.exists)

    assert sandbox.marker.read_text() == "ran\n"


def test_claude_code_bash_call_is_dropped_by_tool_call_policy(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.dropping
    before = last_seq(proxy)
    headers = mock_directives(content=SAYS, tool_calls=[CLAUDE_BASH])

    run = run_claude(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode == 0, run
    assert run.stdout.strip() == SAYS, run
    assert not sandbox.marker.exists()
    [record] = records_after(proxy, before)
    assert record["outcome"] == "ok"
    assert decisions(record) == [("ToolCallPolicy", "dropped")]
    assert "Bash" in record["decisions"][0]["detail"]


def test_claude_code_is_stopped_by_a_blocking_tool_call_policy(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    """The streamed answer ends in an error event; Claude Code asks once more without
    streaming, gets the proxy's 403 and stops, saying why."""
    proxy = guarded_proxies.blocking
    before = last_seq(proxy)
    headers = mock_directives(tool_calls=[CLAUDE_BASH])

    run = run_claude(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode != 0, run
    assert "403 blocked by ToolCallPolicy" in run.stdout + run.stderr, run
    assert not sandbox.marker.exists()
    assert_every_attempt_blocked(records_after(proxy, before))


# --- a block both agents take as the model's reply (block_with: message) ----------------

NOTICE = "blocked by ToolCallPolicy: a tool call in the response: the tool is in denied_tools"


def test_claude_code_shows_a_block_with_message_and_does_not_retry(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.messaging
    before = last_seq(proxy)
    headers = mock_directives(content=SAYS, tool_calls=[CLAUDE_BASH])

    run = run_claude(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode == 0, run
    assert NOTICE in run.stdout, run
    assert not sandbox.marker.exists()
    [record] = records_after(proxy, before)  # one request: no retry
    assert (record["status"], record["outcome"]) == (200, "blocked")


def test_codex_shows_a_block_with_message_and_does_not_retry(
    sandbox: AgentSandbox, guarded_proxies: GuardedProxies
) -> None:
    proxy = guarded_proxies.messaging
    before = last_seq(proxy)
    headers = mock_directives(content=SAYS, tool_calls=[CODEX_SHELL])

    run = run_codex(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode == 0, run
    assert NOTICE in run.stdout, run
    assert not sandbox.marker.exists()
    [record] = records_after(proxy, before)
    assert (record["status"], record["outcome"]) == (200, "blocked")
