"""The processes of a benchmark run: the mock backend, the proxy, the load generator.

Each is started on 127.0.0.1, pinned to its cores, waited for with a deadline, and
stopped by its own id (SIGTERM, then SIGKILL) when the run ends, on Ctrl-C too. Memory
and CPU of a server are read from ``/proc/PID/status`` and ``/proc/PID/stat``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luthien_control.bench.procfs import cpu_seconds, pin, rss_bytes, settled_cpu_seconds

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
SAMPLE_INTERVAL = 0.025
CLIENT_KEY_NAME = "bench"
_CLI = [sys.executable, "-m", "luthien_control"]
_READY_LINE = re.compile(rb"listening on (http://127\.0\.0\.1:\d+/v1)")


class BenchError(Exception):
    """The run itself is broken: a server would not start, the load generator crashed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process we started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"the {self.name} exited (status {self.process.returncode}):\n{self.log_tail()}"
            )

    def stop(self) -> None:
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; only this process, by its id."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def _spawn(
    args: list[str], *, log_path: Path, env: dict[str, str], cwd: Path, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        # A process group of its own: Ctrl-C reaches only the bench, which stops it in order.
        return subprocess.Popen(
            args,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            process_group=0,
        )


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return 200 <= status < 300
    except (OSError, urllib.error.URLError):
        return False


def wait_http(server: Server, url: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        if _http_ok(url):
            return
        time.sleep(0.05)
    raise BenchError(f"the {server.name} did not answer {url} within {timeout:.0f} s")


def start_mock(workdir: Path, *, api_key: str, cores: tuple[int, ...] | None) -> tuple[Server, str]:
    """The built-in mock backend on a free port; returns it and its base URL (``/v1``)."""
    env = dict(os.environ, MOCK_BACKEND_API_KEY=api_key)
    process = _spawn(
        [sys.executable, "-m", "luthien_control.mock_backend", "--port", "0"],
        log_path=workdir / "mock.log",
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
    )
    server = Server("mock backend", process, workdir / "mock.log")
    pin(process.pid, cores)
    assert process.stdout is not None
    try:
        return _announced_url(server, process.stdout.fileno(), cores)
    except BaseException:
        server.stop()
        raise


def _announced_url(server: Server, fd: int, cores: tuple[int, ...] | None) -> tuple[Server, str]:
    """Read the mock's "listening on" line (it picked a free port) and wait for it."""
    deadline = time.monotonic() + READY_TIMEOUT
    output = b""
    while time.monotonic() < deadline:
        server.check_alive()
        readable, _, _ = select.select([fd], [], [], 0.1)
        if readable:
            output += os.read(fd, 4096)
            match = _READY_LINE.search(output)
            if match:
                url = match.group(1).decode()
                wait_http(server, url.removesuffix("/v1") + "/health")
                pin(server.pid, cores)
                return server, url
    raise BenchError(f"the mock backend did not announce its port (output: {output[-200:]!r})")


def policy_document(backend_url: str) -> dict[str, Any]:
    """The realistic chain: authenticate, scan the request, add the backend key, choose
    the backend, send, scan the response."""
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "bench",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {}},
                {
                    "type": "AddApiKeyHeaderFromEnv",
                    "config": {"api_key_env_var_name": "OPENAI_API_KEY"},
                },
                {"type": "SetBackendPolicy", "config": {"backend_url": backend_url}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {}},
            ],
        },
    }


def prepare_proxy(
    workdir: Path, *, backend_url: str, backend_key: str, client_key: str
) -> dict[str, str]:
    """Write the policy file, create the SQLite database with one client key, and return
    the environment ``luthien-control serve`` runs with."""
    policy_path = workdir / "policy.json"
    policy_path.write_text(json.dumps(policy_document(backend_url), indent=2))
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("BACKEND_URL", "TOP_LEVEL_POLICY_NAME", "TEST_CLIENT_API_KEY")
    }
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'db.sqlite'}",
        POLICY_FILEPATH=str(policy_path),
        OPENAI_API_KEY=backend_key,
        RUN_MODE="prod",
    )
    keys = subprocess.run(
        [*_CLI, "keys", "add", "--name", CLIENT_KEY_NAME, "--key", client_key],
        env=env,
        cwd=workdir,
        capture_output=True,
        timeout=READY_TIMEOUT,
        check=False,
    )
    if keys.returncode != 0:
        raise BenchError(
            f"could not add the client key: {keys.stderr.decode(errors='replace').strip()}"
        )
    return env


def start_proxy(
    workdir: Path, env: dict[str, str], *, cores: tuple[int, ...] | None
) -> tuple[Server, str]:
    """``luthien-control serve`` on a free port (cwd: ``workdir``, so no stray ``.env``);
    returns it and its base URL (``/v1``) once ``/health`` answers."""
    port = free_port()
    log_path = workdir / f"proxy-{port}.log"
    process = _spawn(
        [*_CLI, "serve", "--host", "127.0.0.1", "--port", str(port)],
        log_path=log_path,
        env=env,
        cwd=workdir,
    )
    server = Server("proxy", process, log_path)
    pin(process.pid, cores)
    try:
        wait_http(server, f"http://127.0.0.1:{port}/health")
    except BaseException:
        stop_process(process)
        raise
    pin(process.pid, cores)
    return server, f"http://127.0.0.1:{port}/v1"


@dataclass
class Sample:
    """What the load generator reported, and what we saw of the server meanwhile."""

    result: dict[str, Any]
    rss: list[tuple[float, int]] = field(default_factory=list)
    cpu_s: float | None = None
    settle_s: float = 0.0  # after the load, until the server's CPU time went quiet


class LoadGenerator:
    """The load-generator process, kept for the whole run: a spec in on stdin, a result
    out on stdout; meanwhile the server under test is sampled from ``/proc``."""

    def __init__(self, workdir: Path, cores: tuple[int, ...] | None) -> None:
        self._stderr_path = workdir / "load.log"
        self._cores = cores
        with self._stderr_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "luthien_control.bench.load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                process_group=0,
            )
        pin(self.process.pid, cores)
        self._buffer = b""

    def measure(self, spec_json: str, *, timeout: float, watch_pid: int | None) -> Sample:
        """Run one measurement, sampling ``watch_pid``'s RSS meanwhile and its CPU time
        around it."""
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        self._check_alive()
        cpu_before = cpu_seconds(watch_pid) if watch_pid is not None else None
        try:
            process.stdin.write(spec_json.encode() + b"\n")
            process.stdin.flush()
        except BrokenPipeError:
            self._check_alive()
            raise
        rss: list[tuple[float, int]] = []
        deadline = time.monotonic() + timeout
        fd = process.stdout.fileno()
        while b"\n" not in self._buffer:
            if time.monotonic() > deadline:
                raise BenchError(f"the load generator did not finish within {timeout:.0f} s")
            readable, _, _ = select.select([fd], [], [], SAMPLE_INTERVAL)
            if readable:
                data = os.read(fd, 65536)
                if not data:
                    self._check_alive(wait=True)
                    raise BenchError("the load generator closed its output")
                self._buffer += data
            if watch_pid is not None and (value := rss_bytes(watch_pid)) is not None:
                rss.append((time.monotonic(), value))
        # Counted until the server has gone quiet: what it does after the last answer
        # (records still queued for its writer) is part of the load's cost.
        cpu_after, settle = settled_cpu_seconds(watch_pid) if watch_pid is not None else (None, 0.0)
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            result = json.loads(line)
        except ValueError:
            raise BenchError(f"the load generator printed no result: {line[:200]!r}") from None
        cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
        return Sample(result=result, rss=rss, cpu_s=cpu, settle_s=settle)

    def _check_alive(self, *, wait: bool = False) -> None:
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
        if self.process.poll() is not None:
            stderr = self._stderr_path.read_text(errors="replace")
            raise BenchError(
                f"the load generator failed (status {self.process.returncode}):\n{stderr[-3000:]}"
            )

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.0)
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()
