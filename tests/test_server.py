"""The ASGI app driven by hand-written ``receive``/``send`` (as Starlette tests do).

These show what sockets cannot: exactly which ASGI messages the app sends, and that a
disconnect arriving through ``receive`` cancels the work at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from luthien_control.server import LuthienProxy, api_path
from luthien_control.settings import Settings
from tests.conftest import CLIENT_KEY, MockBackendServer, e2e_policy, run_cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def app(
    tmp_path: Path, mock_backend: MockBackendServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LuthienProxy]:
    monkeypatch.setenv("OPENAI_API_KEY", "backend-key")
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    assert run_cli(database_url, "keys", "add", "--name", "t", "--key", CLIENT_KEY).returncode == 0
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(e2e_policy(mock_backend.api_base)))
    settings = Settings(
        database_url=database_url, policy_filepath=policy_file, openai_api_key="backend-key"
    )
    proxy = LuthienProxy(settings)
    startup: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}])

    async def lifespan_receive() -> dict[str, Any]:
        return next(messages)

    async def lifespan_send(message: dict[str, Any]) -> None:
        startup.append(message)
        raise _StartupDone

    with pytest.raises(_StartupDone):
        await proxy({"type": "lifespan"}, lifespan_receive, lifespan_send)
    assert startup == [{"type": "lifespan.startup.complete"}]
    yield proxy
    assert proxy.services is not None
    await proxy.services.stop()


class _StartupDone(Exception):
    pass


def scope(headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
            (b"content-type", b"application/json"),
            *((k.encode(), v.encode()) for k, v in headers.items()),
        ],
    }


def body(stream: bool) -> bytes:
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    ).encode()


class Client:
    """The client side of one ASGI request: sends the body, then disconnects on demand."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sent: list[dict[str, Any]] = []
        self.disconnect = anyio.Event()
        self.receive_calls = 0
        self._body_given = False
        self._sent_event = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        self.receive_calls += 1
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self.payload, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self._sent_event.set()
        self._sent_event = anyio.Event()

    async def wait_until(self, condition: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Wait for the app to have sent what ``condition`` wants (callers bound the wait)."""
        while not condition(self.sent):
            await self._sent_event.wait()


def test_api_path() -> None:
    assert api_path("/v1/chat/completions") == "/chat/completions"
    assert api_path("/api/v1/models") == "/models"
    assert api_path("/v1") == "/"
    assert api_path("/v10/models") is None
    assert api_path("/health") is None


async def test_disconnect_before_the_first_byte_cancels_the_backend(
    app: LuthienProxy, mock_backend: MockBackendServer
) -> None:
    client = Client(body(stream=True))
    headers = {"x-mock-first-byte-delay-ms": "5000", "x-mock-request-id": "asgi-early"}
    with anyio.fail_after(4):  # far less than the backend's delay: the proxy gave up at once
        async with anyio.create_task_group() as group:
            group.start_soon(app, scope(headers), client.receive, client.send)
            record = await anyio.to_thread.run_sync(
                lambda: mock_backend.wait_for_record("asgi-early", lambda r: True)
            )
            assert record is not None and record["outcome"] == "in_progress"
            client.disconnect.set()
    assert client.sent == []  # nothing was sent to a client that is gone
    record = await anyio.to_thread.run_sync(
        lambda: mock_backend.wait_for_record("asgi-early", lambda r: r["outcome"] != "in_progress")
    )
    assert record is not None and record["outcome"] == "cancelled"


async def test_disconnect_mid_stream_cancels_the_backend(
    app: LuthienProxy, mock_backend: MockBackendServer
) -> None:
    client = Client(body(stream=True))
    headers = {"x-mock-words": "200", "x-mock-delay-ms": "20", "x-mock-request-id": "asgi-mid"}
    with anyio.fail_after(4):
        async with anyio.create_task_group() as group:
            group.start_soon(app, scope(headers), client.receive, client.send)
            await client.wait_until(lambda sent: len(sent) >= 3)
            client.disconnect.set()
    start = client.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert all(m["more_body"] for m in client.sent[1:])  # cut short: never a final message
    assert b"[DONE]" not in b"".join(m.get("body", b"") for m in client.sent)
    record = await anyio.to_thread.run_sync(
        lambda: mock_backend.wait_for_record("asgi-mid", lambda r: r["outcome"] != "in_progress")
    )
    assert record is not None and record["outcome"] == "cancelled"
    assert record["chunks_sent"] < 200


async def test_receive_is_only_read_for_the_body_and_the_disconnect(app: LuthienProxy) -> None:
    client = Client(body(stream=True))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(app, scope({"x-mock-content": "fine"}), client.receive, client.send)
            await client.wait_until(lambda sent: bool(sent) and not sent[-1].get("more_body", True))
            client.disconnect.set()  # uvicorn says "disconnect" once the response is complete
    assert client.receive_calls == 2
    raw = b"".join(m.get("body", b"") for m in client.sent)
    assert raw.endswith(b"data: [DONE]\n\n")
    headers = dict(client.sent[0]["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"x-accel-buffering"] == b"no"
