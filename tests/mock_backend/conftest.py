"""Fixtures: the mock backend in process (``backend``, ``client``) and as a real server."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from luthien_control.mock_backend import MockBackend

STARTUP_TIMEOUT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def backend() -> MockBackend:
    return MockBackend()


@pytest.fixture
async def client(backend: MockBackend) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=backend)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        yield client


@dataclass(frozen=True)
class RunningMock:
    """A mock backend process listening on a loopback port."""

    url: str  # http://127.0.0.1:PORT
    log: Path  # its stderr

    @property
    def api_url(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="module")
def mock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMock]:
    """``python -m luthien_control.mock_backend --port 0``; the port comes from its banner."""
    log = tmp_path_factory.mktemp("mock_backend") / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "MOCK_BACKEND_API_KEY"}
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "luthien_control.mock_backend", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    assert process.stdout is not None
    try:
        banner = _read_banner(process, log)
        prefix = "mock backend listening on "
        assert banner.startswith(prefix), banner
        url = banner[len(prefix) :].removesuffix("/v1")
        yield RunningMock(url=url, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def _read_banner(process: subprocess.Popen[bytes], log: Path) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline().decode().strip()
            if line:
                return line
        if process.poll() is not None:
            break
    raise RuntimeError(f"mock backend did not start: {log.read_text()}")
