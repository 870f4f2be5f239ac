"""The admin API's writes and its event stream (``shared/SPEC.md``, "Admin API"), on a real
proxy process with two workers: keys created and revoked, policies stored and in force,
transactions followed live."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter

ADMIN_KEY = "admin-api-test-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def chain(backend: str, *extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "admin-test",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                *extra,
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(
        db_policy=chain(mock_backend.api_base),
        env={"ADMIN_API_KEY": ADMIN_KEY},
        workers=2,
    )


@pytest.fixture
def admin(proxy: ProxyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{proxy.url}/admin/api", headers=AUTH, timeout=10) as client:
        yield client


def chat(proxy: ProxyServer, key: str, content: str = "hi") -> httpx.Response:
    return httpx.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]},
        headers={"Authorization": f"Bearer {key}", "x-mock-content": quote(content, safe="")},
        timeout=10,
    )


def eventually(check: Any, timeout: float = 5.0) -> None:
    """Poll ``check()`` until it is true (bounded): the workers refresh every second."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not in force in time"
        time.sleep(0.1)


def test_a_created_key_is_shown_once_works_everywhere_and_is_refused_once_revoked(
    proxy: ProxyServer, admin: httpx.Client
) -> None:
    created = admin.post("/keys", json={"name": "console-made"})
    assert created.status_code == 201
    body = created.json()
    value = body["key"]
    assert value.startswith("lc-") and body["prefix"] == value[:8]
    assert body["name"] == "console-made" and body["active"] is True
    assert body["revoked_at"] is None
    listing = admin.get("/keys")
    assert value not in listing.text
    assert [k["name"] for k in listing.json()["data"]] == ["e2e", "console-made"]
    # every worker takes it within a refresh (several requests reach both workers)
    eventually(lambda: all(chat(proxy, value).status_code == 200 for _ in range(6)))

    revoked = admin.delete("/keys/console-made")
    assert revoked.status_code == 200
    assert revoked.json()["active"] is False and value not in revoked.text
    eventually(lambda: all(chat(proxy, value).status_code == 401 for _ in range(6)), 2.5)
    assert chat(proxy, CLIENT_KEY).status_code == 200

    again = admin.delete("/keys/console-made")
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "the key 'console-made' is already revoked"
    missing = admin.delete("/keys/nobody")
    assert missing.status_code == 404
    duplicate = admin.post("/keys", json={"name": "e2e"})
    assert duplicate.status_code == 400
    assert duplicate.json()["error"]["message"] == "a key named 'e2e' already exists"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"name": "x", "key": "chosen"}', 'the body must be {"name": "<key name>"}'),
        (b"[]", 'the body must be {"name": "<key name>"}'),
        (b'{"name": 3}', "the key name must be a string"),
        (b'{"name": ""}', "a key name must not be empty"),
        (b'{"name": "a", "name": "b"}', "the request body has an object with a repeated key"),
        (b"{nope", "the request body is not valid JSON"),
    ],
)
def test_a_bad_key_request_is_a_400_that_creates_nothing(
    admin: httpx.Client, body: bytes, message: str
) -> None:
    def keys() -> list[dict[str, Any]]:
        # ``last_used_at`` is the recorder's, written after earlier tests' requests as
        # their records are (late, on a busy machine): not what this request changes.
        return [
            {k: v for k, v in key.items() if k != "last_used_at"}
            for key in admin.get("/keys").json()["data"]
        ]

    before = keys()
    answer = admin.post("/keys", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"].startswith(message) and error["type"] == "invalid_request_error"
    assert keys() == before


def test_wrong_methods_and_routes(proxy: ProxyServer, admin: httpx.Client) -> None:
    answer = admin.post("/transactions", json={})
    assert answer.status_code == 405
    assert answer.json()["error"] == {
        "message": "/admin/api/transactions answers GET, not POST",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
        "transaction_id": answer.headers["x-luthien-transaction-id"],
    }
    assert admin.delete("/keys").status_code == 405
    assert admin.put("/keys/e2e", json={}).status_code == 405
    assert admin.get("/nothing/here").status_code == 404
    for method in ("POST", "PUT", "DELETE"):
        anonymous = httpx.request(method, f"{proxy.url}/admin/api/keys/e2e", json={"name": "x"})
        assert anonymous.status_code == 401
    keys = {k["name"]: k["active"] for k in admin.get("/keys").json()["data"]}
    assert keys["e2e"] is True and "x" not in keys


def test_a_stored_policy_is_validated_versioned_and_in_force(
    proxy: ProxyServer, admin: httpx.Client, mock_backend: MockBackendServer
) -> None:
    wrong = chain(mock_backend.api_base, {"type": "LeakedApiKeyDetection", "config": {"x": 1}})
    refused = admin.put("/policies/root", json=wrong)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "policies[4].config.x"
    assert error["message"] == "policies[4].config.x: Extra inputs are not permitted"
    assert admin.get("/policies/root").json()["version"] == 1

    rewriting = chain(mock_backend.api_base, {"type": "IncrementIntegers", "config": {}})
    stored = admin.put("/policies/root", json=rewriting)
    assert stored.status_code == 200
    assert stored.json() == {"name": "root", "version": 2, "definition": rewriting}
    assert admin.get("/policies/root").json()["definition"] == rewriting

    def rewritten() -> bool:
        answers = [chat(proxy, CLIENT_KEY, "1 and 41").json() for _ in range(6)]
        return all(a["choices"][0]["message"]["content"] == "2 and 42" for a in answers)

    eventually(rewritten)
    assert admin.put("/policies/root", json=chain(mock_backend.api_base)).status_code == 200


def read_events(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """``count`` events off an SSE line iterator: ``id``, ``event`` and ``data`` each."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in lines:
        if not line:
            if current:
                events.append(current)
                current = {}
                if len(events) == count:
                    return events
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(": ")
        current[field] = json.loads(value) if field == "data" else value
    raise AssertionError(f"the stream ended after {len(events)} events")


def test_events_follow_every_recorded_transaction_live_and_resume(
    proxy: ProxyServer, admin: httpx.Client
) -> None:
    with admin.stream("GET", "/events", timeout=20) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = stream.iter_lines()
        assert next(lines) == ": connected"
        sent = [
            chat(proxy, CLIENT_KEY, f"event {i}").headers["x-luthien-transaction-id"]
            for i in range(3)
        ]
        # Earlier tests' records may still be on their way: read until ours came.
        events: list[dict[str, Any]] = []
        while not set(sent) <= {e["data"]["id"] for e in events}:
            assert len(events) < 100
            events += read_events(lines, 1)
    ids = [e["data"]["id"] for e in events]
    assert len(ids) == len(set(ids))  # each once
    events = [e for e in events if e["data"]["id"] in sent]
    assert {e["event"] for e in events} == {"transaction"}
    assert all(e["id"] == str(e["data"]["seq"]) for e in events)
    assert all(e["data"]["outcome"] == "ok" and e["data"]["status"] == 200 for e in events)

    # A browser reconnects with the last id it saw and gets what came after it.
    first = min(events, key=lambda e: e["data"]["seq"])
    resumed = {**AUTH, "Last-Event-ID": first["id"]}
    later = [e["data"]["id"] for e in sorted(events, key=lambda e: e["data"]["seq"])[1:]]
    with admin.stream("GET", "/events", headers=resumed, timeout=20) as stream:
        lines = stream.iter_lines()
        again: list[dict[str, Any]] = []
        # Other tests' records may sit between ours: read until ours are all back.
        while not set(later) <= {e["data"]["id"] for e in again}:
            assert len(again) < 100
            again += read_events(lines, 1)
    seqs = [e["data"]["seq"] for e in again]
    assert min(seqs) > first["data"]["seq"]  # only what came after it
    assert [e["data"]["id"] for e in again if e["data"]["id"] in sent] == later
    bad = admin.get("/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400


def test_transactions_are_searched_in_prompts_and_answers_and_paged(
    proxy: ProxyServer, admin: httpx.Client
) -> None:
    secret = "sk-proj-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8"
    word = f"wombat{uuid.uuid4().hex[:8]}"
    sent = [
        chat(proxy, CLIENT_KEY, f"Tell me of the {word} number {k}, key {secret}").headers[
            "x-luthien-transaction-id"
        ]
        for k in range(3)
    ]
    for transaction_id in sent:
        proxy.record(transaction_id)
    first = admin.get("/transactions", params={"q": word.upper(), "limit": 2})
    assert first.status_code == 200
    page = first.json()["data"]
    rest = admin.get("/transactions", params={"q": word, "limit": 2, "before": page[-1]["seq"]})
    rows = page + rest.json()["data"]
    # Newest first by record number, the second page after the first's last row.
    assert sorted(r["id"] for r in rows) == sorted(sent)
    assert [r["seq"] for r in rows] == sorted((r["seq"] for r in rows), reverse=True)
    one = admin.get("/transactions", params={"q": f"{word} number 1"}).json()["data"]
    assert [r["id"] for r in one] == [sent[1]]
    # The records hold "[REDACTED]" where the key was, so no search can find the key.
    assert admin.get("/transactions", params={"q": secret[:16]}).json()["data"] == []
    assert admin.get("/transactions", params={"q": secret[-12:]}).json()["data"] == []
    redacted = admin.get("/transactions", params={"q": f"{word} number 2, key [REDACTED]"})
    assert [r["id"] for r in redacted.json()["data"]] == [sent[2]]
    blocked = admin.get("/transactions", params={"q": word, "outcome": "blocked"})
    assert blocked.json()["data"] == []


@pytest.mark.parametrize(
    ("query", "param", "message"),
    [
        ({"q": "ab"}, "q", "a search needs at least 3 characters"),
        ({"q": "x" * 201}, "q", "a search has at most 200 characters"),
        ({"before": "12a"}, "before", "before must be a record's seq"),
        ({"before": "²"}, "before", "before must be a record's seq"),
    ],
)
def test_a_bad_search_or_page_is_a_400(
    admin: httpx.Client, query: dict[str, str], param: str, message: str
) -> None:
    answer = admin.get("/transactions", params=query)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["message"]) == (param, message)
