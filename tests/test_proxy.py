"""The proxy over real sockets: routes, error shapes, headers, streaming rules.

A real ``luthien-control serve`` process in front of the built-in mock backend; the
mock's request records show what the backend really received.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from tests.conftest import (
    BACKEND_KEY,
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    free_port,
)
from tests.e2e.sse import collect_sse_events

MODEL = "gpt-4o-mini"
SECRET = "sk-proj-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"


def chain(
    *middle: dict[str, Any], after: list[dict[str, Any]] | None = None, backend: str
) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "test",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                *middle,
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                *(after or []),
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """Secrets blocked on the way in and on the way out."""
    leak = {"type": "LeakedApiKeyDetection", "config": {}}
    return start_proxy(policy=chain(leak, after=[leak], backend=mock_backend.api_base))


@pytest.fixture(scope="module")
def answer_blocking_proxy(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> ProxyServer:
    """Secrets blocked in answers only: a request that scripts one into the mock's answer
    carries it in a header, which a request-side check refuses."""
    leak = {"type": "LeakedApiKeyDetection", "config": {}}
    return start_proxy(policy=chain(after=[leak], backend=mock_backend.api_base))


@pytest.fixture(scope="module")
def redacting_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    leak = {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}}
    return start_proxy(policy=chain(after=[leak], backend=mock_backend.api_base))


@pytest.fixture
def client(proxy: ProxyServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=proxy.url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=30
    ) as c:
        yield c


def directives(**values: Any) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): quote(str(v), safe=":") for k, v in values.items()}


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


# --- routes and errors -----------------------------------------------------------------


def test_health_and_ready(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert "x-luthien-transaction-id" in health.headers
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "problems": []}


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
def test_chat_completion_under_both_prefixes(client: httpx.Client, prefix: str) -> None:
    response = client.post(
        f"{prefix}/chat/completions", json=chat(), headers=directives(content="ok")
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "ok"
    assert len(response.headers["x-luthien-transaction-id"]) == 32


def test_other_v1_paths_pass_through(client: httpx.Client) -> None:
    models = client.get("/v1/models")
    assert models.status_code == 200 and models.json()["object"] == "list"
    embeddings = client.post(
        "/api/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}
    )
    assert embeddings.status_code == 200 and embeddings.json()["data"][0]["object"] == "embedding"


def test_a_path_cannot_smuggle_a_second_request_to_the_backend(
    client: httpx.Client, mock_backend: MockBackendServer
) -> None:
    # Percent-encoded line ends: the path goes to the backend as the client wrote it,
    # never decoded into the request line (it would end it, and start a DELETE).
    smuggled = "/v1/models%20HTTP/1.1%0D%0Ahost:%20x%0D%0A%0D%0ADELETE%20/v1/files/file-abc"
    request_id = f"smuggle-{uuid.uuid4().hex}"
    response = client.get(smuggled, headers={"x-mock-request-id": request_id})
    assert response.status_code == 404  # the backend's own answer for that path
    record = mock_backend.record(request_id)
    assert record is not None
    assert (record["method"], record["path"]) == (
        "GET",
        "/v1/models HTTP/1.1\r\nhost: x\r\n\r\nDELETE /v1/files/file-abc",
    )
    everything = mock_backend.client.get(f"{mock_backend.url}/_mock/requests").json()
    assert not [r for r in everything if r["method"] == "DELETE"]


def test_unknown_route_is_404_in_openai_shape(client: httpx.Client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing client API key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid client API key"),
    ],
)
def test_missing_or_unknown_key_is_401(
    proxy: ProxyServer, headers: dict[str, str], message: str
) -> None:
    response = httpx.post(f"{proxy.api_base}/chat/completions", json=chat(), headers=headers)
    assert response.status_code == 401
    error = error_of(response)
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert error["message"].startswith(message)
    assert len(response.headers["x-luthien-transaction-id"]) == 32


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": 3, "messages": []}', "model"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "stream"),
        (b"[1, 2]", None),
    ],
)
def test_malformed_request_is_400(client: httpx.Client, body: bytes, param: str | None) -> None:
    response = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_secret_in_request_is_403_and_never_sent(
    client: httpx.Client, mock_backend: MockBackendServer
) -> None:
    request_id = "secret-request"
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"use {SECRET}"}]}
    response = client.post(
        "/v1/chat/completions", json=body, headers=directives(request_id=request_id)
    )
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "policy_blocked" and SECRET not in response.text
    assert mock_backend.record(request_id) is None


def test_backend_errors_pass_through_with_status_body_and_retry_after(client: httpx.Client) -> None:
    limited = client.post(
        "/v1/chat/completions", json=chat(), headers=directives(fail="status:429", retry_after=11)
    )
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "11"
    assert error_of(limited)["code"] == "rate_limit_exceeded"
    broken = client.post(
        "/v1/chat/completions", json=chat(stream=True), headers=directives(fail="status:500")
    )
    assert broken.status_code == 500
    assert broken.headers["content-type"].startswith("application/json")
    assert error_of(broken)["type"] == "server_error"
    unknown = client.post("/v1/chat/completions", json={**chat(), "model": "nope-model"})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"


def test_unreachable_backend_is_502(start_proxy: ProxyStarter) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proxy = start_proxy(policy=chain(backend=dead))
    response = httpx.post(
        f"{proxy.api_base}/chat/completions",
        json=chat(),
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert response.status_code == 502
    assert error_of(response)["code"] == "backend_unreachable"


def test_backend_timeout_is_504(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> None:
    proxy = start_proxy(
        policy=chain(backend=mock_backend.api_base), env={"BACKEND_READ_TIMEOUT": "0.3"}
    )
    response = httpx.post(
        f"{proxy.api_base}/chat/completions",
        json=chat(stream=True),
        headers={"Authorization": f"Bearer {CLIENT_KEY}", **directives(first_byte_delay_ms=3000)},
        timeout=30,
    )
    assert response.status_code == 504
    assert error_of(response)["code"] == "backend_timeout"


# --- what reaches the backend ----------------------------------------------------------


def test_backend_sees_backend_key_query_and_no_hop_headers(
    client: httpx.Client, mock_backend: MockBackendServer
) -> None:
    response = client.post(
        "/v1/chat/completions?api-version=2024-01-01",
        json=chat(),
        headers={
            **directives(request_id="headers-check"),
            "x-custom": "kept",
            "connection": "keep-alive",
        },
    )
    assert response.status_code == 200
    record = mock_backend.record("headers-check")
    assert record is not None
    assert record["query"] == "api-version=2024-01-01"
    headers = record["headers"]
    assert headers["authorization"] == f"Bearer {BACKEND_KEY}"  # never the client's key
    assert CLIENT_KEY not in orjson.dumps(record).decode()
    assert headers["x-custom"] == "kept"
    assert headers["accept-encoding"] == "identity"
    assert "x-luthien-transaction-id" not in headers


# --- streaming -------------------------------------------------------------------------


def direct_stream(
    mock_backend: MockBackendServer, body: dict[str, Any], headers: dict[str, str]
) -> bytes:
    with httpx.stream(
        "POST", f"{mock_backend.api_base}/chat/completions", json=body, headers=headers
    ) as r:
        return r.read()


def test_stream_is_byte_for_byte_what_the_backend_sent(
    client: httpx.Client, mock_backend: MockBackendServer
) -> None:
    tools = orjson.dumps(
        [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]
    ).decode()
    headers = directives(content="Checking the weather.", tool_calls=tools)
    # Through the proxy the client asked for no usage; the proxy asked for it and hid it.
    with client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as response:
        via_proxy = response.read()
    direct = direct_stream(mock_backend, chat(stream=True), headers)

    def normalized(raw: bytes) -> list[Any]:
        # ids and timestamps differ between two answers; everything else must be equal.
        events = collect_sse_events([raw]).events
        for event in events:
            event.pop("id"), event.pop("created")
        return events

    assert normalized(via_proxy) == normalized(direct)
    assert via_proxy.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in via_proxy
    calls = [
        call
        for event in collect_sse_events([via_proxy]).events
        for call in event["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert (
        "".join(c["function"].get("arguments", "") for c in calls) == '{"city":"Paris","unit":"C"}'
    )


def test_usage_injected_for_the_backend_and_recorded(
    client: httpx.Client, mock_backend: MockBackendServer
) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat(stream=True),
        headers=directives(request_id="usage-hidden"),
    ) as response:
        raw = response.read()
    record = mock_backend.record("usage-hidden")
    assert record is not None and record["body"]["stream_options"] == {"include_usage": True}
    assert b"usage" not in raw


def test_usage_chunk_kept_when_the_client_asks(client: httpx.Client) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result = collect_sse_events(response.iter_bytes())
    assert result.done
    last = result.events[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert all(e.get("usage", "missing") is None for e in result.events[:-1])


def test_backend_drop_mid_stream_ends_with_error_event_and_no_done(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat(stream=True),
        headers=directives(words=50, fail="drop:5"),
    ) as response:
        assert response.status_code == 200
        result = collect_sse_events(response.iter_bytes())
    assert not result.done
    assert result.errors and result.errors[-1]["code"] == "backend_broken"
    assert result.raw.endswith(b"\n\n") and b"[DONE]" not in result.raw
    assert result.content == "word0 word1 word2 word3 word4"


def test_secret_in_a_buffered_answer_is_a_403(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", json=chat(), headers=directives(content=f"{SECRET} here")
    )
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/json")
    assert error_of(response)["code"] == "policy_blocked"
    assert SECRET[:10] not in response.text


def test_secret_after_the_stream_began_ends_it_with_an_error_event(
    answer_blocking_proxy: ProxyServer,
) -> None:
    text = "Here is some harmless text first. And now the key: " + SECRET + " trailing"
    with (
        httpx.Client(headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=30) as c,
        c.stream(
            "POST",
            f"{answer_blocking_proxy.api_base}/chat/completions",
            json=chat(stream=True),
            headers=directives(content=text, chunk_size=5),
        ) as response,
    ):
        assert response.status_code == 200
        result = collect_sse_events(response.iter_bytes())
    assert not result.done
    assert result.errors[-1]["code"] == "policy_blocked"
    assert "sk-p" not in result.content and SECRET[:12] not in result.raw.decode()
    assert result.content.startswith("Here is some harmless text first.")


def test_redacted_secret_split_across_chunks(redacting_proxy: ProxyServer) -> None:
    text = "Key: " + SECRET + ". Done."
    with (
        httpx.Client(headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=30) as c,
        c.stream(
            "POST",
            f"{redacting_proxy.api_base}/chat/completions",
            json=chat(stream=True),
            headers=directives(content=text, chunk_size=3),
        ) as response,
    ):
        result = collect_sse_events(response.iter_bytes())
    assert result.done
    assert result.content == "Key: [REDACTED]. Done."
    assert SECRET[:6] not in result.raw.decode()
