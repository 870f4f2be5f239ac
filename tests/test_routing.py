"""Routing between two backends, and a database policy replaced under a running proxy.

Two mock backends in their own processes; each one's request records show exactly which
requests reached it and in what form.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import (
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    ServerProcess,
    free_port,
    python_env,
)

RELOAD_TIMEOUT = 10.0  # the proxy refreshes its database policy every second


@pytest.fixture(scope="module")
def backend_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockBackendServer]:
    """A second built-in mock backend, next to the session's ``mock_backend`` (A)."""
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "luthien_control.mock_backend", "--port", str(port)],
        python_env(),
        f"http://127.0.0.1:{port}/health",
        tmp_path_factory.mktemp("mock-b") / "mock-backend.log",
    )
    server.start()
    mock = MockBackendServer(f"http://127.0.0.1:{port}")
    yield mock
    mock.client.close()
    server.stop()


def set_backend(url: str) -> dict[str, Any]:
    return {"type": "SetBackendPolicy", "config": {"backend_url": url}}


def chain(*routing: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "routing",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                *routing,
                {"type": "SendBackendRequest", "config": {}},
            ],
        },
    }


def by_model(fast_backend: str, default_backend: str) -> dict[str, Any]:
    """Model ``fast`` goes to ``fast_backend`` as ``gpt-4o-mini``; the rest to the default."""
    return {
        "type": "BranchingPolicy",
        "config": {
            "cond_to_policy_map": [
                {
                    "condition": {
                        "type": "equals",
                        "left": {"type": "transaction_path", "path": "request.payload.model"},
                        "right": {"type": "static", "value": "fast"},
                    },
                    "policy": {
                        "type": "SerialPolicy",
                        "config": {
                            "policies": [
                                set_backend(fast_backend),
                                {
                                    "type": "ModelNameReplacement",
                                    "config": {"model_mapping": {"fast": "gpt-4o-mini"}},
                                },
                            ]
                        },
                    },
                }
            ],
            "default_policy": set_backend(default_backend),
        },
    }


@pytest.fixture(scope="module")
def routing_proxy(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, backend_b: MockBackendServer
) -> ProxyServer:
    return start_proxy(policy=chain(by_model(backend_b.api_base, mock_backend.api_base)))


def ask(proxy: ProxyServer, model: str, request_id: str, *, stream: bool = False) -> httpx.Response:
    with httpx.Client(headers={"Authorization": f"Bearer {proxy.key}"}, timeout=30) as client:
        return client.post(
            f"{proxy.api_base}/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
            headers={"x-mock-request-id": quote(request_id), "x-mock-content": "routed"},
        )


def new_id() -> str:
    return uuid.uuid4().hex


def test_fast_model_goes_to_backend_b_renamed(
    routing_proxy: ProxyServer, mock_backend: MockBackendServer, backend_b: MockBackendServer
) -> None:
    rid = new_id()
    response = ask(routing_proxy, "fast", rid)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "routed"
    assert response.json()["model"] == "gpt-4o-mini"
    record = backend_b.record(rid)
    assert record is not None and record["outcome"] == "completed"
    assert record["body"]["model"] == "gpt-4o-mini"
    assert mock_backend.record(rid) is None


def test_streamed_fast_model_goes_to_backend_b_renamed(
    routing_proxy: ProxyServer, mock_backend: MockBackendServer, backend_b: MockBackendServer
) -> None:
    rid = new_id()
    response = ask(routing_proxy, "fast", rid, stream=True)
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    record = backend_b.record(rid)
    assert record is not None and record["stream"] is True
    assert record["body"]["model"] == "gpt-4o-mini"
    assert mock_backend.record(rid) is None


def test_other_models_go_to_backend_a_unchanged(
    routing_proxy: ProxyServer, mock_backend: MockBackendServer, backend_b: MockBackendServer
) -> None:
    rid = new_id()
    response = ask(routing_proxy, "gpt-3.5-turbo", rid)
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-3.5-turbo"
    record = mock_backend.record(rid)
    assert record is not None and record["outcome"] == "completed"
    assert record["body"]["model"] == "gpt-3.5-turbo"
    assert backend_b.record(rid) is None


def test_policy_loaded_into_the_database_reaches_a_running_proxy(
    start_proxy: ProxyStarter,
    mock_backend: MockBackendServer,
    backend_b: MockBackendServer,
    tmp_path: Path,
) -> None:
    proxy = start_proxy(db_policy=chain(set_backend(mock_backend.api_base)), policy_name="live")
    first = new_id()
    assert ask(proxy, "fast", first).status_code == 404  # A knows no model "fast"
    assert mock_backend.record(first) is not None and backend_b.record(first) is None

    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(chain(by_model(backend_b.api_base, mock_backend.api_base))))
    result = proxy.cli("policy", "load", str(changed), "--name", "live")
    assert result.returncode == 0, result.stderr

    # Ask until the new policy routes "fast" to B (bounded); A answers until then.
    deadline = time.monotonic() + RELOAD_TIMEOUT
    rid = new_id()
    response = ask(proxy, "fast", rid)
    while backend_b.record(rid) is None and time.monotonic() < deadline:
        time.sleep(0.1)
        rid = new_id()
        response = ask(proxy, "fast", rid)
    assert backend_b.record(rid) is not None
    assert response.status_code == 200 and response.json()["model"] == "gpt-4o-mini"
    # From then on the new policy stays: B for "fast", A for the rest.
    fast, other = new_id(), new_id()
    assert ask(proxy, "fast", fast).status_code == 200
    assert ask(proxy, "gpt-4", other).status_code == 200
    fast_record = backend_b.record(fast)
    assert fast_record is not None and fast_record["body"]["model"] == "gpt-4o-mini"
    assert mock_backend.record(fast) is None
    assert mock_backend.record(other) is not None and backend_b.record(other) is None
