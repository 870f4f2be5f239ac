"""The console's Policies pages against a real proxy (two workers) whose policy is stored
in its database: the tree in force, versions, editing with errors that name the path,
putting a version in force (and seeing every worker apply it), and the dry run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import markupsafe
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter
from tests.test_console import ADMIN_KEY, HOSTILE, csrf, sign_in

SHELL = json.dumps([{"name": "shell", "arguments": json.dumps({"command": "ls"})}])


def stored_tree(backend: str, *after: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "stored",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                *after,
            ],
        },
    }


BLOCK_SHELL = {"type": "ToolCallPolicy", "config": {"denied_tools": ["shell"]}}


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(
        db_policy=stored_tree(mock_backend.api_base),
        env={"ADMIN_API_KEY": ADMIN_KEY, "REFRESH_INTERVAL": "0.2"},
        workers=2,
    )


@pytest.fixture
def console(proxy: ProxyServer) -> Iterator[httpx.Client]:
    client = sign_in(proxy)
    yield client
    client.close()


def call_shell(proxy: ProxyServer, *, stream: bool = False) -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
            headers={"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-tool-calls": quote(SHELL)},
        )
        response.read()
        return response


def statuses_until(proxy: ProxyServer, wanted: int) -> list[int]:
    """Requests (one per worker at least) until two in a row answer ``wanted``; at most
    5 s (the workers refresh every 0.2 s)."""
    seen: list[int] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and seen[-4:] != [wanted] * 4:
        seen.append(call_shell(proxy).status_code)
    return seen[-4:]


def save(
    console: httpx.Client, name: str, text: str, *, fmt: str = "json", activate: bool = True
) -> httpx.Response:
    page = console.get("/admin/policy", params={"name": name})
    form = {"csrf": csrf(page), "name": name, "definition": text, "format": fmt}
    if activate:
        form["activate"] = "1"
    return console.post("/admin/policies/save", data=form)


def test_the_policy_in_force_is_shown_as_a_tree(console: httpx.Client) -> None:
    page = console.get("/admin/policies")
    assert page.status_code == 200
    assert "database policy &#39;root&#39; (version 1)" in page.text
    assert (
        '<strong class="type">SerialPolicy</strong> <span class="name">stored</span>' in page.text
    )
    assert (
        '<strong class="type">SendBackendRequest</strong> <code class="path">policies[3]</code>'
        "</span></li>"
    ) in page.text
    assert "<dt>backend_url</dt>" in page.text
    assert 'href="/admin/policy?name=root"' in page.text


def test_an_edit_with_an_error_names_its_path_and_changes_nothing(
    console: httpx.Client, mock_backend: MockBackendServer
) -> None:
    broken = stored_tree(mock_backend.api_base, {"type": "ToolCallPolicy", "config": {"deny": 1}})
    text = json.dumps(broken, indent=2)
    answer = save(console, "root", text)
    assert answer.status_code == 400
    assert 'role="alert"' in answer.text
    assert "policies[4].config.deny" in answer.text  # the path of the first error
    assert str(markupsafe.escape(text)) in answer.text  # the text is kept to fix
    versions = console.get("/admin/policy", params={"name": "root"}).text
    assert "/admin/policy?name=root&amp;version=2" not in versions


def test_a_yaml_syntax_error_names_the_line(console: httpx.Client) -> None:
    answer = save(console, "yaml-policy", "type: NoopPolicy\nconfig: {\n", fmt="yaml")
    assert answer.status_code == 400
    assert "invalid YAML in &#39;the edited policy&#39; at line 3" in answer.text


def test_saving_puts_a_version_in_force_on_every_worker_and_an_old_one_back(
    proxy: ProxyServer, console: httpx.Client, mock_backend: MockBackendServer
) -> None:
    assert call_shell(proxy).status_code == 200
    guarded = stored_tree(mock_backend.api_base, BLOCK_SHELL)
    answer = save(console, "root", json.dumps(guarded))
    assert answer.status_code == 303
    assert answer.headers["location"] == "/admin/policy?name=root&saved=2&activated=2"
    page = console.get(answer.headers["location"])
    assert "Stored version 2, now in force." in page.text
    assert '<td data-label="by">ada</td>' in page.text
    assert statuses_until(proxy, 403) == [403] * 4

    form = {"csrf": csrf(page), "name": "root", "version": "1"}
    answer = console.post("/admin/policies/activate", data=form)
    assert answer.status_code == 303
    assert "Version 1 is in force." in console.get(answer.headers["location"]).text
    assert statuses_until(proxy, 200) == [200] * 4


def test_a_version_stored_without_activating_waits(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    answer = save(console, "drafts/one", '{"type": "NoopPolicy", "config": {}}')
    assert answer.headers["location"] == "/admin/policy?name=drafts%2Fone&saved=1&activated=1"
    answer = save(
        console, "drafts/one", '{"type": "NoopPolicy", "config": {"name": "b"}}', activate=False
    )
    assert answer.headers["location"] == "/admin/policy?name=drafts%2Fone&saved=2"
    page = console.get(answer.headers["location"]).text
    assert "Stored version 2 (not in force)." in page
    assert 'aria-label="Put version 2 in force"' in page
    assert 'aria-label="Put version 1 in force"' not in page


def test_a_form_without_its_token_stores_nothing(console: httpx.Client) -> None:
    answer = console.post(
        "/admin/policies/save",
        data={"name": "sneaky", "definition": '{"type": "NoopPolicy", "config": {}}'},
    )
    assert answer.status_code == 403
    assert "No version stored yet" in console.get("/admin/policy?name=sneaky").text


def test_a_dry_run_shows_what_the_client_would_have_seen(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
            headers={
                "Authorization": f"Bearer {CLIENT_KEY}",
                "x-mock-tool-calls": quote(SHELL),
                "x-mock-content": quote(HOSTILE),
            },
        )
        response.read()
    transaction_id = response.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)
    # The edited policy's backend goes nowhere: a backend call would fail the dry run.
    edited = stored_tree("http://127.0.0.1:9/v1", BLOCK_SHELL)
    page = console.get("/admin/policy", params={"name": "root"})
    answer = console.post(
        "/admin/policies/dry-run",
        data={
            "csrf": csrf(page),
            "name": "root",
            "definition": json.dumps(edited),
            "format": "json",
            "transaction": transaction_id,
        },
    )
    assert answer.status_code == 200
    text = answer.text
    assert "200 · <strong>ok</strong> · streamed" in text  # then
    assert "200 · <strong>blocked</strong> · streamed" in text  # now
    assert "<td>ToolCallPolicy</td><td>blocked</td><td>tool shell</td>" in text
    assert "<script>alert" not in text and "&lt;script&gt;alert" in text
    assert "policy_blocked" in text  # the error event, on the wire
    # Nothing was stored: the record count of the dry-run's transaction id is unchanged.
    assert "No backend was called; nothing was stored." in text


def test_a_dry_run_on_an_unknown_transaction_says_so(console: httpx.Client) -> None:
    page = console.get("/admin/policy", params={"name": "root"})
    answer = console.post(
        "/admin/policies/dry-run",
        data={
            "csrf": csrf(page),
            "name": "root",
            "definition": '{"type": "NoopPolicy", "config": {}}',
            "format": "json",
            "transaction": "0" * 32,
        },
    )
    assert answer.status_code == 404
    assert f"No transaction {'0' * 32} is recorded." in answer.text
