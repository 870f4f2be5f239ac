"""``luthien-control mock-backend``, as a user starts it: ``--scenario`` scripts the
answer to every request that brings no directive of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import orjson
import pytest

from .conftest import RunningMock, _read_banner

SCRIPTED = "Scripted by the command line."
SCENARIO = orjson.dumps({"x-mock-content": SCRIPTED, "x-mock-chunk-size": 6}).decode()
# The luthien-control entry point, as ``python -m`` (the console script runs the same main).
COMMAND = [sys.executable, "-m", "luthien_control", "mock-backend"]


def clean_env() -> dict[str, str]:
    """This environment without the variables that would set the mock's key or scenario."""
    return {
        k: v for k, v in os.environ.items() if k not in ("MOCK_BACKEND_API_KEY", "MOCK_SCENARIO")
    }


@pytest.fixture(scope="module")
def cli_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMock]:
    """``luthien-control mock-backend --port 0 --scenario JSON``; the port from its banner."""
    log = tmp_path_factory.mktemp("mock_cli") / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*COMMAND, "--port", "0", "--scenario", SCENARIO],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=clean_env(),
        )
    assert process.stdout is not None
    try:
        banner = _read_banner(process, log)
        prefix = "mock backend listening on "
        assert banner.startswith(prefix), banner
        yield RunningMock(url=banner.removeprefix(prefix).removesuffix("/v1"), log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def test_scenario_answers_requests_without_directives(cli_mock: RunningMock) -> None:
    with httpx.Client(base_url=cli_mock.api_url, timeout=10) as client:
        messages = client.post(
            "/messages",
            json={
                "model": "claude-sonnet-4-5",
                "max_tokens": 256,
                "messages": [{"role": "user", "content": "anything"}],
            },
        )
        chat = client.post(
            "/chat/completions",
            json={
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "anything"}],
                "stream": True,
            },
        )
        # A request's own directives still win over the scenario.
        own = client.post(
            "/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            headers={"x-mock-content": "mine"},
        )
    assert messages.status_code == 200
    assert messages.json()["content"] == [{"type": "text", "text": SCRIPTED}]
    assert chat.status_code == 200
    deltas = [
        orjson.loads(line[6:])["choices"][0]["delta"].get("content")
        for line in chat.text.splitlines()
        if line.startswith("data: {")
    ]
    pieces = [delta for delta in deltas if delta]
    assert "".join(pieces) == SCRIPTED
    assert pieces[0] == SCRIPTED[:6]  # the scenario's chunk size
    assert own.json()["choices"][0]["message"]["content"] == "mine"


def test_a_bad_scenario_is_one_line_on_stderr() -> None:
    finished = subprocess.run(
        [*COMMAND, "--port", "0", "--scenario", '{"x-mock-wordz": 3}'],
        env=clean_env(),
        capture_output=True,
        timeout=30,
    )
    assert finished.returncode == 2
    assert finished.stdout == b""
    assert finished.stderr.decode().splitlines() == [
        "luthien-control: error: mock backend scenario: "
        "Invalid scenario: 'x-mock-wordz' is not a directive a scenario can set"
    ]
