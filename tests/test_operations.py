"""Production operation: several workers on one database, PostgreSQL going away and
coming back, keys and policies changed while traffic flows, the file policy on SIGHUP."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    e2e_policy,
    run_cli,
)
from tests.postgres import PostgresServer

PROPAGATION = 2.0  # keys and policies must be in force in every worker within this time


def ask(
    client: httpx.Client, proxy: ProxyServer, key: str = CLIENT_KEY, **headers: str
) -> httpx.Response:
    return client.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count 41"}]},
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def records(proxy: ProxyServer) -> list[dict[str, Any]]:
    result = proxy.cli("logs", "--json", "--limit", "100000")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_for_records(
    proxy: ProxyServer, ids: set[str], timeout: float = 30
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows = records(proxy)
    while not ids <= {r["id"] for r in rows} and time.monotonic() < deadline:
        time.sleep(0.25)
        rows = records(proxy)
    return rows


def metric(proxy: ProxyServer, name: str) -> float:
    text = httpx.get(f"{proxy.url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def workers_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(db_policy=e2e_policy(mock_backend.api_base), workers=2)


def test_key_revoked_and_policy_replaced_reach_every_worker(
    workers_proxy: ProxyServer, mock_backend: MockBackendServer, tmp_path: Path
) -> None:
    proxy = workers_proxy
    assert (
        proxy.cli("keys", "add", "--name", "temp", "--key", "lc-temporary-key-42").returncode == 0
    )
    time.sleep(PROPAGATION)
    with httpx.Client(timeout=30) as client:
        assert all(ask(client, proxy, "lc-temporary-key-42").status_code == 200 for _ in range(10))
        assert proxy.cli("keys", "revoke", "temp").returncode == 0
        time.sleep(PROPAGATION)
        # Ten requests land on both workers: every one of them refuses the revoked key.
        assert [ask(client, proxy, "lc-temporary-key-42").status_code for _ in range(10)] == [
            401
        ] * 10

        changed = e2e_policy(mock_backend.api_base)
        changed["config"]["policies"].append({"type": "IncrementIntegers", "config": {}})
        path = tmp_path / "changed.json"
        path.write_text(json.dumps(changed))
        assert proxy.cli("policy", "load", str(path), "--name", "root").returncode == 0
        time.sleep(PROPAGATION)
        answers = [
            ask(client, proxy, **{"x-mock-content": "answer 41"}).json()["choices"][0]["message"][
                "content"
            ]
            for _ in range(10)
        ]
    assert answers == ["answer 42"] * 10


def test_workers_record_every_transaction_once_and_share_metrics(
    workers_proxy: ProxyServer,
) -> None:
    before = metric(workers_proxy, "luthien_requests_total")
    ids: list[str] = []
    lock = threading.Lock()

    def traffic() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(15):
                response = client.post(
                    f"{workers_proxy.api_base}/chat/completions",
                    json={
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "x"}],
                        "stream": True,
                    },
                    headers={"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-words": "20"},
                )
                assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
                with lock:
                    ids.append(response.headers["x-luthien-transaction-id"])

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(ids) == 60
    rows = wait_for_records(workers_proxy, set(ids))
    stored = [r["id"] for r in rows if r["id"] in set(ids)]
    assert sorted(stored) == sorted(ids)  # every one, none twice
    assert metric(workers_proxy, "luthien_requests_total") - before == 60  # summed over workers


def test_postgres_outage_loses_no_record(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, postgres: PostgresServer
) -> None:
    database_url = postgres.create_database("outage")
    proxy = start_proxy(
        policy=e2e_policy(mock_backend.api_base),
        database_url=database_url,
    )
    ids: list[str] = []
    with httpx.Client(timeout=30) as client:
        for _ in range(10):
            ids.append(ask(client, proxy).headers["x-luthien-transaction-id"])
        postgres.stop()
        try:
            # The database is away: proxying goes on (keys and policy come from the cache).
            for _ in range(30):
                response = ask(client, proxy)
                assert response.status_code == 200
                ids.append(response.headers["x-luthien-transaction-id"])
            ready = httpx.get(f"{proxy.url}/ready")
            assert ready.status_code == 503
        finally:
            postgres.start()
        for _ in range(10):
            ids.append(ask(client, proxy).headers["x-luthien-transaction-id"])
    rows = wait_for_records(proxy, set(ids), timeout=60)
    stored = [r["id"] for r in rows]
    assert sorted(stored) == sorted(ids)


def test_sighup_reloads_the_policy_file_and_keeps_the_last_good_one(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    proxy = start_proxy(policy=e2e_policy(mock_backend.api_base))
    assert proxy.server is not None and proxy.server.process is not None
    policy_file = Path(proxy.server.env["POLICY_FILEPATH"])
    with httpx.Client(timeout=30) as client:
        assert (
            ask(client, proxy, **{"x-mock-content": "7"}).json()["choices"][0]["message"]["content"]
            == "7"
        )
        changed = e2e_policy(mock_backend.api_base)
        changed["config"]["policies"].append({"type": "IncrementIntegers", "config": {}})
        policy_file.write_text(json.dumps(changed))
        proxy.server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        content = ""
        while content != "8" and time.monotonic() < deadline:
            time.sleep(0.1)
            content = ask(client, proxy, **{"x-mock-content": "7"}).json()["choices"][0]["message"][
                "content"
            ]
        assert content == "8"
        policy_file.write_text("{ this is not a policy")
        proxy.server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "policy file not reloaded" not in proxy.server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "policy file not reloaded, keeping the previous policy" in proxy.server.log()
        assert (
            ask(client, proxy, **{"x-mock-content": "7"}).json()["choices"][0]["message"]["content"]
            == "8"
        )


def test_init_db_on_postgres(postgres: PostgresServer) -> None:
    url = postgres.create_database("initdb")
    result = run_cli(url, "init-db")
    assert result.returncode == 0 and result.stdout.startswith("database ready:")
    assert run_cli(url, "keys", "add", "--name", "pg", "--key", "lc-pg-key-1").returncode == 0
    listing = run_cli(url, "keys", "list")
    assert "pg" in listing.stdout and "lc-pg-key-1" not in listing.stdout
