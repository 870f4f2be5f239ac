"""Demo mode as a user meets it: ``luthien-control serve`` with no backend configured.

SPEC: "With no backend configured (no ``BACKEND_URL``, no ``OPENAI_API_KEY``), the run
command starts in a clearly announced demo mode, using the built-in mock backend, and
prints a client key and a copy-paste ``curl`` and OpenAI SDK example that work." The
test runs the printed commands exactly as printed, then stops the server with Ctrl-C
and checks that the mock backend it started went with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from luthien_control.mock_backend.content import GREETING
from tests.conftest import free_port, python_env

BANNER_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
END_OF_BANNER = "=" * 20


def luthien_control_command() -> list[str]:
    script = Path(sys.executable).with_name("luthien-control")
    return [str(script)] if script.exists() else [sys.executable, "-m", "luthien_control"]


@dataclass
class DemoServer:
    process: subprocess.Popen[str]
    url: str
    cwd: Path
    stderr_path: Path
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def banner(self) -> str:
        """Stdout up to the end of the banner (the ``====`` line after the client key)."""
        seen: list[str] = []
        deadline = time.monotonic() + BANNER_TIMEOUT
        key_seen = False
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break  # stdout closed: the server exited
            seen.append(line)
            key_seen = key_seen or "Client API key:" in line
            if key_seen and line.strip().startswith(END_OF_BANNER):
                break
        return "".join(seen)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoServer]:
    """``luthien-control serve --port P`` in an empty directory, no backend in the env."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = python_env()
    assert "BACKEND_URL" not in env and "OPENAI_API_KEY" not in env
    port = free_port()
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [*luthien_control_command(), "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # so that teardown can reach the mock child too
        )
    server = DemoServer(process, f"http://127.0.0.1:{port}", tmp_path, stderr_path)
    assert process.stdout is not None
    stdout = process.stdout

    def read_stdout() -> None:
        for line in stdout:
            server.lines.put(line)
        server.lines.put(None)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    yield server
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Whatever the test saw, nothing this test started may outlive it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=5)
    stdout.close()


def wait_until_healthy(url: str) -> int | None:
    """The status of ``GET url/health`` once the server answers (bounded); None if never."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code
        except httpx.TransportError:
            time.sleep(0.05)
    return None


def printed_command(banner: str, start: str) -> str:
    """The command in ``banner`` that begins with ``start``, continuation lines joined."""
    lines = banner.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    parts = []
    for line in lines[first:]:
        text = line.strip()
        if text.endswith("\\"):
            parts.append(text[:-1].rstrip())
        else:
            parts.append(text)
            break
    return " ".join(parts)


def run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_demo_mode_prints_working_examples_and_stops_its_mock(demo: DemoServer) -> None:
    banner = demo.banner()
    assert "DEMO MODE" in banner, f"stdout:\n{banner}\nstderr:\n{demo.stderr()}"
    key_match = re.search(r"Client API key: (\S+)", banner)
    mock_match = re.search(r"built-in mock backend at (http://127\.0\.0\.1:\d+)/v1", banner)
    assert key_match is not None and mock_match is not None, banner
    key, mock_url = key_match.group(1), mock_match.group(1)
    assert wait_until_healthy(demo.url) == 200, demo.stderr()
    assert httpx.get(f"{mock_url}/health", timeout=5).status_code == 200
    # The default SQLite database landed in the working directory.
    assert (demo.cwd / "luthien_control.db").is_file()

    curl = printed_command(banner, "curl -N ")
    assert key in curl and f"{demo.url}/v1/chat/completions" in curl
    result = run(curl)
    assert result.returncode == 0, result.stderr
    completion = json.loads(result.stdout)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == GREETING + "Hello!"

    sdk = printed_command(banner, "python -c ")
    result = run(shlex.quote(sys.executable) + sdk.removeprefix("python"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == GREETING + "Hello!"

    demo.process.send_signal(signal.SIGINT)  # Ctrl-C, to the server process alone
    assert demo.process.wait(timeout=30) == 0, demo.stderr()
    with pytest.raises(httpx.ConnectError):  # nothing listens where the mock was
        httpx.get(f"{mock_url}/health", timeout=5)
