"""The console on PostgreSQL with two workers (issue 12, point 1), over HTTP: a session
made on one worker opens pages on the other; a recorded request is found by a search and
shown redacted; a key made in the console works and, revoked, is refused by both
workers; a policy saved and put in force there is applied by both, and the version
before it put back; a dry run replays a record stored in PostgreSQL."""

from __future__ import annotations

import json
import re
import time
import uuid

from tests.conftest import MockBackendServer, ProxyStarter
from tests.test_console import ADMIN_KEY, SECRET, chat, csrf, sign_in, status_with
from tests.test_console_policies import BLOCK_SHELL, call_shell, save, stored_tree


def test_the_console_on_postgresql_with_two_workers(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, postgres_url: str
) -> None:
    proxy = start_proxy(
        db_policy=stored_tree(
            mock_backend.api_base, {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}}
        ),
        env={"ADMIN_API_KEY": ADMIN_KEY, "REFRESH_INTERVAL": "0.2"},
        workers=2,
        database_url=postgres_url,
    )
    console = sign_in(proxy)
    console.headers["Origin"] = proxy.url
    # The session is in the database: every worker takes it.
    assert {console.get("/admin/traffic").status_code for _ in range(8)} == {200}

    word = f"wombat{uuid.uuid4().hex[:6]}"
    transaction_id = chat(proxy, f"Where does the {word} sleep? {SECRET}")
    proxy.record(transaction_id)
    found = console.get("/admin/traffic", params={"q": word})
    assert found.status_code == 200
    assert re.findall(r'href="/admin/transactions/([0-9a-f]{32})"', found.text) == [transaction_id]
    page = console.get(f"/admin/transactions/{transaction_id}")
    assert page.status_code == 200
    assert word in page.text and "[REDACTED]" in page.text and SECRET not in page.text

    # A key: shown once, works on both workers, refused by both within 2 s of its revoking.
    token = csrf(console.get("/admin/keys"))
    created = console.post("/admin/keys", data={"name": "pg-browser", "csrf": token})
    assert created.status_code == 201
    match = re.search(r'<code class="secret">(lc-[A-Za-z0-9_-]+)</code>', created.text)
    assert match is not None
    value = match.group(1)

    def status() -> int:
        return status_with(proxy, value)

    deadline = time.monotonic() + 5
    while not all(status() == 200 for _ in range(4)):
        assert time.monotonic() < deadline, "a new key is not taken by every worker"
        time.sleep(0.2)
    revoked = console.post("/admin/keys/revoke", data={"csrf": token, "name": "pg-browser"})
    assert revoked.status_code == 303
    deadline = time.monotonic() + 2.5
    while not all(status() == 401 for _ in range(4)):
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.1)

    # A policy version saved in the console is in force on both workers; then version 1.
    assert call_shell(proxy).status_code == 200
    edited = stored_tree(mock_backend.api_base, BLOCK_SHELL)
    saved = save(console, "root", json.dumps(edited))
    assert saved.status_code == 303
    assert saved.headers["location"] == "/admin/policy?name=root&saved=2&activated=2"
    deadline = time.monotonic() + 5
    while not all(call_shell(proxy).status_code == 403 for _ in range(4)):
        assert time.monotonic() < deadline, "version 2 is not in force on every worker"
        time.sleep(0.1)
    page = console.get("/admin/policy", params={"name": "root"})
    back = console.post(
        "/admin/policies/activate", data={"csrf": csrf(page), "name": "root", "version": "1"}
    )
    assert back.status_code == 303
    deadline = time.monotonic() + 5
    while not all(call_shell(proxy).status_code == 200 for _ in range(4)):
        assert time.monotonic() < deadline, "version 1 is not back in force on every worker"
        time.sleep(0.1)

    # A dry run of the blocking version on a recorded stream of the shell call.
    recorded = call_shell(proxy, stream=True)
    shell_id = recorded.headers["x-luthien-transaction-id"]
    proxy.record(shell_id)
    page = console.get("/admin/policy", params={"name": "root"})
    dry = console.post(
        "/admin/policies/dry-run",
        data={
            "csrf": csrf(page),
            "name": "root",
            "definition": json.dumps(stored_tree("http://127.0.0.1:9/v1", BLOCK_SHELL)),
            "format": "json",
            "transaction": shell_id,
        },
    )
    assert dry.status_code == 200
    assert "200 · <strong>ok</strong> · streamed" in dry.text
    assert "200 · <strong>blocked</strong> · streamed" in dry.text
    console.close()
