"""Real coding agents, installed from the npm registry, controlled by a real proxy.

Each agent answers a prompt through the proxy, and is stopped by ``ToolCallPolicy`` when
the mock backend makes the model call the agent's shell tool with a command that would
create a marker file: the file must not appear, and the proxy must have recorded what it
did. A control run through a proxy without that policy shows the command really runs.
"""

from __future__ import annotations

from luthien_control.mock_backend.content import GREETING
from tests.agents.conftest import (
    CODEX_MODEL,
    MARKER,
    AgentSandbox,
    last_seq,
    mock_directives,
    records_after,
    run_codex,
)
from tests.conftest import ProxyServer

MARKER_COMMAND = f"echo ran > {MARKER}"
CODEX_SHELL = {"name": "exec_command", "arguments": {"cmd": MARKER_COMMAND}}
SAYS = "Creating the marker file."


def decisions(record: dict[str, object]) -> list[tuple[object, object]]:
    return [(d["policy"], d["action"]) for d in record["decisions"]]  # type: ignore[index, attr-defined]


# --- Codex (the Responses API) ------------------------------------------------------------


def test_codex_answers_through_the_proxy(sandbox: AgentSandbox, open_proxy: ProxyServer) -> None:
    before = last_seq(open_proxy)
    prompt = "Say hello to the proxy"

    run = run_codex(sandbox, open_proxy, prompt)

    assert run.returncode == 0, run
    assert run.stdout.strip() == GREETING + prompt, run
    [record] = records_after(open_proxy, before)
    assert record["endpoint"] == "/responses"
    assert (record["status"], record["outcome"], record["streamed"]) == (200, "ok", True)
    assert record["model"] == CODEX_MODEL
    assert record["client_key_name"] == "e2e"


def test_codex_runs_the_shell_command_without_the_policy(
    sandbox: AgentSandbox, open_proxy: ProxyServer
) -> None:
    """The control: nothing but the proxy stands between this scripted call and the shell.
    (The mock scripts the call on every turn, so Codex would go on; it is stopped once the
    marker exists.)"""
    headers = mock_directives(content=SAYS, tool_calls=[CODEX_SHELL])

    run_codex(sandbox, open_proxy, "Create it", headers=headers, until=sandbox.marker.exists)

    assert sandbox.marker.read_text() == "ran\n"


def test_codex_shell_call_is_dropped_by_tool_call_policy(
    sandbox: AgentSandbox, dropping_proxy_for_agents: ProxyServer
) -> None:
    proxy = dropping_proxy_for_agents
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
    sandbox: AgentSandbox, blocking_proxy_for_agents: ProxyServer
) -> None:
    proxy = blocking_proxy_for_agents
    before = last_seq(proxy)
    headers = mock_directives(tool_calls=[CODEX_SHELL])

    run = run_codex(sandbox, proxy, "Create the marker", headers=headers)

    assert run.returncode != 0, run
    assert "blocked by ToolCallPolicy" in run.stderr, run
    assert not sandbox.marker.exists()
    records = records_after(proxy, before)
    assert [r["outcome"] for r in records] == ["blocked"], records
    assert decisions(records[0]) == [("ToolCallPolicy", "blocked")]
