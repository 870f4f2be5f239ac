"""The operator console over HTTP, on a real proxy process with two workers: sign-in and
its cookie, every page closed without it, CSRF and origin checks, the security headers,
escaping of hostile records, keys created and revoked, and the transaction view.

(The same console in a real browser: tests/console/.)"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import markupsafe
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter

ADMIN_KEY = "console-admin-key-0123"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
SECRET = "sk-proj-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"


def chain(backend: str) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "console-test",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}},
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(
        policy=chain(mock_backend.api_base), env={"ADMIN_API_KEY": ADMIN_KEY}, workers=2
    )


def sign_in(proxy: ProxyServer, name: str = "ada") -> httpx.Client:
    client = httpx.Client(base_url=proxy.url, timeout=10)
    answer = client.post(
        "/admin/sign-in",
        data={"name": name, "key": ADMIN_KEY, "next": "/admin/traffic"},
        headers={"Origin": proxy.url},
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/admin/traffic"
    return client


@pytest.fixture
def console(proxy: ProxyServer) -> Iterator[httpx.Client]:
    client = sign_in(proxy)
    yield client
    client.close()


def csrf(page: httpx.Response) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert match is not None, page.text[:500]
    return match.group(1)


def chat(proxy: ProxyServer, content: str) -> str:
    answer = httpx.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]},
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-content": quote(content)},
        timeout=10,
    )
    assert answer.status_code == 200
    return answer.headers["x-luthien-transaction-id"]


def status_with(proxy: ProxyServer, key: str) -> int:
    """The status of a small chat request made with the client key ``key``."""
    return httpx.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    ).status_code


def test_signing_in_sets_a_strict_session_cookie(proxy: ProxyServer) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        form = client.get("/admin/sign-in")
        assert form.status_code == 200 and 'type="password"' in form.text
        answer = client.post(
            "/admin/sign-in", data={"name": "ada", "key": ADMIN_KEY}, headers={"Origin": proxy.url}
        )
    cookie = answer.headers["set-cookie"]
    assert re.fullmatch(
        r"lc_console=[A-Za-z0-9_-]{43}; HttpOnly; Max-Age=28800; Path=/admin; SameSite=strict",
        cookie,
    ), cookie
    assert answer.headers["location"] == "/admin/"


@pytest.mark.parametrize(
    ("form", "origin", "message"),
    [
        ({"name": "ada", "key": "wrong"}, None, "Wrong admin key."),
        ({"name": " ", "key": ADMIN_KEY}, None, "Give your name"),
        ({"name": "ada", "key": ADMIN_KEY}, "http://evil.example", "did not come from"),
    ],
)
def test_a_failed_sign_in_sets_no_cookie(
    proxy: ProxyServer, form: dict[str, str], origin: str | None, message: str
) -> None:
    headers = {"Origin": origin} if origin else {}
    answer = httpx.post(f"{proxy.url}/admin/sign-in", data=form, headers=headers, timeout=10)
    assert answer.status_code == 400
    assert "set-cookie" not in answer.headers
    assert message in html.unescape(answer.text)


PAGES = ["/admin/", "/admin/traffic", "/admin/keys", "/admin/transactions/x"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_is_closed_without_a_session(proxy: ProxyServer, path: str) -> None:
    answer = httpx.get(f"{proxy.url}{path}", cookies={"lc_console": "forged"}, timeout=10)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/admin/sign-in?next={quote(path)}"
    posted = httpx.post(f"{proxy.url}/admin/keys", data={"name": "x"}, timeout=10)
    assert posted.status_code == 403


def test_security_headers_on_every_answer(proxy: ProxyServer, console: httpx.Client) -> None:
    for path in [*PAGES[:3], "/admin/sign-in", "/admin/nowhere", "/admin/static/console.js"]:
        answer = console.get(path)
        assert "content-security-policy" in answer.headers, (path, answer.status_code)
        assert answer.headers["content-security-policy"] == (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        ), path
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
    assert console.get("/admin/nowhere").status_code == 404
    assert console.get("/admin/static/..%2fpages.py").status_code == 404
    assert console.get("/admin/static/console.js").headers["content-type"] == (
        "text/javascript; charset=utf-8"
    )


def test_a_form_without_the_csrf_token_or_from_another_origin_changes_nothing(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    token = csrf(console.get("/admin/keys"))
    for data, headers in (
        ({"name": "forged"}, {}),
        ({"name": "forged", "csrf": "0" * 64}, {}),
        ({"name": "forged", "csrf": token}, {"Origin": "http://evil.example"}),
    ):
        answer = console.post("/admin/keys", data=data, headers=headers)
        assert answer.status_code == 403
        assert "nothing was changed" in answer.text
    assert "forged" not in console.get("/admin/keys").text


def test_a_key_is_shown_once_works_and_is_refused_once_revoked(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    token = csrf(console.get("/admin/keys"))
    created = console.post(
        "/admin/keys", data={"name": "browser", "csrf": token}, headers={"Origin": proxy.url}
    )
    assert created.status_code == 201
    assert created.headers["cache-control"] == "no-store"
    match = re.search(r'<code class="secret">(lc-[A-Za-z0-9_-]+)</code>', created.text)
    assert match is not None
    value = match.group(1)
    assert value not in console.get("/admin/keys").text  # never shown again

    def status() -> int:
        return status_with(proxy, value)

    deadline = time.monotonic() + 5
    while not all(status() == 200 for _ in range(4)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    revoked = console.post(
        "/admin/keys/revoke", data={"csrf": token, "name": "browser"}, headers={"Origin": proxy.url}
    )
    assert revoked.status_code == 303
    deadline = time.monotonic() + 2.5
    while not all(status() == 401 for _ in range(4)):
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.1)
    row = re.search(r"<td>browser</td>.*?</tr>", console.get("/admin/keys").text, re.S)
    assert row is not None and "Revoke" not in row.group(0)


def test_a_hostile_prompt_renders_as_text_and_a_redaction_shows(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    transaction_id = chat(proxy, f"{HOSTILE} and {SECRET}")
    proxy.record(transaction_id)
    listing = console.get("/admin/traffic")
    assert f"/admin/transactions/{transaction_id}" in listing.text
    page = console.get(f"/admin/transactions/{transaction_id}")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert str(markupsafe.escape(HOSTILE)) in page.text
    assert SECRET not in page.text
    # The record never holds the key, on either side: where it was is highlighted, in
    # the conversation and in the answer's documents, and the decision says who acted.
    shown = f'{markupsafe.escape(HOSTILE)} and <mark class="redacted">[REDACTED]</mark>'
    assert page.text.count(shown) == 2  # the prompt, the answer (the mock echoes it)
    assert re.search(
        r'<tr class="action-redacted"><td>LeakedApiKeyDetection</td><td>redacted</td>',
        page.text,
    )


def test_signing_out_closes_every_page_on_every_worker(proxy: ProxyServer) -> None:
    client = sign_in(proxy, "grace")
    page = client.get("/admin/traffic")
    assert page.status_code == 200 and "grace" in page.text
    cookie = client.cookies["lc_console"]
    out = client.post("/admin/sign-out", data={"csrf": csrf(page)})
    client.close()
    assert out.status_code == 303
    for _ in range(4):  # both workers
        for path in PAGES:
            answer = httpx.get(f"{proxy.url}{path}", cookies={"lc_console": cookie}, timeout=10)
            assert answer.status_code == 303
        events = httpx.get(
            f"{proxy.url}/admin/api/events", cookies={"lc_console": cookie}, timeout=10
        )
        assert events.status_code == 401


def test_the_console_is_off_without_an_admin_key(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    proxy = start_proxy(policy=chain(mock_backend.api_base))
    for path in ("/admin/", "/admin/sign-in"):
        answer = httpx.get(f"{proxy.url}{path}", timeout=10)
        assert answer.status_code == 404 and "ADMIN_API_KEY" in answer.text
    refused = httpx.post(f"{proxy.url}/admin/sign-in", data={"name": "a", "key": ""}, timeout=10)
    assert refused.status_code == 404 and "set-cookie" not in refused.headers


def test_a_key_name_that_looks_like_a_path_revokes_itself_only(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for name in ("victim", "leaked/../victim", ".."):
        made = httpx.post(f"{proxy.url}/admin/api/keys", json={"name": name}, headers=auth)
        assert made.status_code == 201, made.text
    token = csrf(console.get("/admin/keys"))
    answer = console.post("/admin/keys/revoke", data={"csrf": token, "name": "leaked/../victim"})
    assert answer.status_code == 303
    deleted = httpx.delete(f"{proxy.url}/admin/api/keys/..", headers=auth)
    assert deleted.status_code == 404  # the route is /keys/{name}: ".." is the path's
    deleted = httpx.delete(f"{proxy.url}/admin/api/keys/%2E%2E", headers=auth)
    assert deleted.status_code == 200 and deleted.json()["name"] == ".."
    assert deleted.headers["cache-control"] == "no-store"
    active = {
        k["name"]: k["active"]
        for k in httpx.get(f"{proxy.url}/admin/api/keys", headers=auth).json()["data"]
    }
    assert (active["victim"], active["leaked/../victim"], active[".."]) == (True, False, False)


def test_hostile_shapes_in_a_record_still_render(proxy: ProxyServer, console: httpx.Client) -> None:
    def post(path: str, body: dict[str, Any]) -> str:
        answer = httpx.post(
            f"{proxy.api_base}{path}",
            json=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=10,
        )
        proxy.record(answer.headers["x-luthien-transaction-id"])
        return answer.headers["x-luthien-transaction-id"]

    odd_item = post(
        "/responses",
        {"model": "gpt-4o-mini", "input": [{"type": None, "role": "user", "content": "x"}]},
    )
    page = console.get(f"/admin/transactions/{odd_item}")
    assert page.status_code == 200 and "item of an unknown type" in page.text
    hidden = post(
        "/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user visually-hidden", "content": "hidden instruction"}],
        },
    )
    page = console.get(f"/admin/transactions/{hidden}")
    assert 'class="turn role-other kind-text"' in page.text
    assert "visually-hidden kind" not in page.text


@pytest.mark.parametrize(
    "query", ["before=%C2%B2", "before=" + "9" * 30, "since=9999-12-31T23:59:59-12:00"]
)
def test_bad_traffic_filters_are_a_400(console: httpx.Client, query: str) -> None:
    answer = console.get(f"/admin/traffic?{query}")
    assert answer.status_code == 400
    assert "database" not in answer.text


def test_no_redirect_from_the_host_header_and_headers_on_a_405(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    slash = console.get("/admin/keys/", headers={"Host": "evil.example"})
    assert slash.status_code == 404 and "location" not in slash.headers
    wrong = console.put("/admin/keys")
    assert wrong.status_code == 405
    assert wrong.headers["content-security-policy"].startswith("default-src 'none'")


def test_the_diff_of_hostile_documents_is_bounded() -> None:
    # A client chooses what the diff compares: 12,000 identical lines were quadratic work
    # for difflib (20 s of a worker's event loop); now the common lines are matched in
    # linear time and each side is cut.
    from luthien_control.console.pages import MAX_DIFF_LINES, side_by_side

    same = {"stop": ["a"] * 12_000}
    rows = side_by_side(same, same)
    assert len(rows) == MAX_DIFF_LINES + 1
    assert rows[-1][1] == f"... cut here: only the first {MAX_DIFF_LINES} lines are shown"
    assert {row[0] for row in rows} == {"same"}
    changed = side_by_side({"s": ["a"] * 3000}, {"s": ["b"] * 3000})  # too big to align
    assert changed[0] == ("same", "{", "same", "{")
    assert changed[2] == ("changed", '    "a",', "changed", '    "b",')
    small = side_by_side({"x": 1, "y": "k"}, {"x": 1, "y": "[REDACTED]"})
    assert small == [
        ("same", "{", "same", "{"),
        ("same", '  "x": 1,', "same", '  "x": 1,'),
        ("changed", '  "y": "k"', "changed", '  "y": "[REDACTED]"'),
        ("same", "}", "same", "}"),
    ]


def test_the_traffic_search_finds_a_prompt_or_an_answer_never_a_secret(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    word = f"zebra{uuid.uuid4().hex[:8]}"
    found = chat(proxy, f"Tell me about the {word} and {SECRET}")
    other = chat(proxy, "Tell me about lions")
    for transaction_id in (found, other):
        proxy.record(transaction_id)
    page = console.get("/admin/traffic", params={"q": word.upper()})
    assert page.status_code == 200
    assert f'name="q" value="{word.upper()}"' in page.text  # the box keeps the search
    rows = re.findall(r'<tr data-seq="(\d+)".*?/admin/transactions/(\w+)"', page.text, re.S)
    assert [transaction_id for _, transaction_id in rows] == [found]  # prompt and answer
    seq = int(rows[0][0])
    # The search is one more filter: with the others, and in keyset pages.
    assert found in console.get("/admin/traffic", params={"q": word, "before": seq + 1}).text
    for more in ({"before": str(seq)}, {"outcome": "blocked"}, {"key": "nobody"}):
        assert "No transactions." in console.get("/admin/traffic", params={"q": word, **more}).text
    # What the record holds is redacted: the key is not there to be found.
    for piece in (SECRET, SECRET[:14], SECRET[-10:]):
        assert "No transactions." in console.get("/admin/traffic", params={"q": piece}).text
    redacted = console.get("/admin/traffic", params={"q": f"{word} and [REDACTED]"})
    assert f"/admin/transactions/{found}" in redacted.text
    short = console.get("/admin/traffic", params={"q": "ab"})
    assert short.status_code == 400
    assert "a search needs at least 3 characters" in short.text


def overview_rows(now: datetime) -> list[dict[str, Any]]:
    """Six records of known timings: three in the last hour, two more in the last day."""
    minutes = timedelta(minutes=1)

    def at(ago: timedelta, ttft_ms: float | None, **values: Any) -> dict[str, Any]:
        received = now - ago
        return {
            "id": uuid.uuid4().hex,
            "received_at": received,
            "backend_first_byte_at": None,
            "client_first_byte_at": None
            if ttft_ms is None
            else received + timedelta(milliseconds=ttft_ms),
            "ended_at": None,
            "client_key_name": None,
            "policy_name": None,
            "method": "POST",
            "endpoint": "/chat/completions",
            "model": "gpt-4o-mini",
            "streamed": False,
            "status": 200,
            "outcome": "ok",
            "error": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "total_tokens": None,
            "usage_partial": False,
            "chunks_sent": 0,
            "request": {"received": None, "sent": None},
            "response": {"received": None, "sent": None},
            "decisions": [],
            "flagged": False,
            **values,
        }

    return [
        at(2.5 * minutes, 100, duration_ms=400, total_tokens=10, flagged=True),
        at(2.5 * minutes, 20, duration_ms=25, outcome="blocked", status=403),
        at(32.5 * minutes, 300.5, duration_ms=900, total_tokens=30),
        at(210 * minutes, 200, duration_ms=1000, total_tokens=50, flagged=True),
        at(210 * minutes, None, duration_ms=5, outcome="rejected", status=401),
        at(25 * 60 * minutes, 1, duration_ms=1, total_tokens=1000),  # older than a day
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_overview_shows_the_figures_and_charts_of_the_hour_and_day(
    request: pytest.FixtureRequest,
    start_proxy: ProxyStarter,
    mock_backend: MockBackendServer,
    backend: str,
) -> None:
    from luthien_control.db.engine import create_engine
    from luthien_control.db.transactions import insert_records

    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    fresh = start_proxy(
        policy=chain(mock_backend.api_base), env={"ADMIN_API_KEY": ADMIN_KEY}, database_url=url
    )

    async def insert() -> None:
        engine = create_engine(fresh.database_url)
        try:
            await insert_records(engine, overview_rows(datetime.now(UTC)))
        finally:
            await engine.dispose()

    asyncio.run(insert())
    client = sign_in(fresh)
    page = client.get("/admin/")
    client.close()
    assert page.status_code == 200
    assert "style=" not in page.text  # the CSP allows no inline style: attributes and classes
    hour, day = page.text.split('<section class="window"')[1:]

    def figure(section: str, name: str) -> str:
        match = re.search(rf"<dt>{re.escape(name)}</dt><dd>(.*?)</dd>", section)
        assert match is not None, name
        return html.unescape(match.group(1))

    names = ("Requests", "Blocked", "Flagged", "Rejected", "Tokens")
    assert [figure(hour, n) for n in names] == ["3", "1", "1", "0", "40"]
    assert [figure(day, n) for n in names] == ["5", "1", "2", "1", "90"]
    assert figure(hour, "TTFT p50 / p90 / p99") == "100.0 ms / 300.5 ms / 300.5 ms"
    assert figure(hour, "Duration p50 / p90 / p99") == "400.0 ms / 900.0 ms / 900.0 ms"
    assert figure(day, "TTFT p50 / p90 / p99") == "100.0 ms / 300.5 ms / 300.5 ms"
    assert figure(day, "Duration p50 / p90 / p99") == "400.0 ms / 1,000.0 ms / 1,000.0 ms"
    # Five charts a window, a bar a bucket, each with its words: a title and a
    # description for the chart, a title for each bar, and the numbers in a table.
    for section, buckets in ((hour, 12), (day, 24)):
        charts = re.findall(r"<svg .*?</svg>", section, re.S)
        assert len(charts) == 5
        for chart in charts:
            assert 'role="img"' in chart and "<title>" in chart and "<desc id=" in chart
            assert chart.count("<rect ") == buckets
    captions = re.findall(r'<figcaption id="[^"]+">([^<]+)<', hour)
    assert [c.strip() for c in captions] == ["Requests", "Blocked", "Flagged", "Tokens", "TTFT p90"]
    assert re.search(r"<title>\d\d:\d\d: 2 requests</title>", hour)
    assert "highest 2 requests at" in hour
    table = re.findall(
        r'<tr><th scope="row">\d\d:\d\d</th><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>'
        r"<td>(\d+)</td><td>([^<]*)</td></tr>",
        hour,
    )
    none = ("0", "0", "0", "0", "\N{EN DASH}")  # no value
    assert table == [none] * 5 + [("1", "0", "0", "30", "300.5 ms")] + [none] * 5 + [
        ("2", "1", "1", "10", "100.0 ms")
    ]
    day_requests = re.findall(r'<tr><th scope="row">\d\d:\d\d</th><td>(\d+)</td>', day)
    assert day_requests == ["0"] * 20 + ["2", "0", "0", "3"]


# A transaction's conversation on every dialect (issue 12, point 3): messages, tool calls
# with their arguments, tool results and thinking, for the prompt and for the answer.

WEATHER = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])
TURN = re.compile(
    r'<li class="turn (?:answer )?role-(\w+) kind-(\w+)">\s*<span class="who">(.*?)</span>'
    r"\s*<pre>(.*?)</pre>",
    re.S,
)


def turns(page: str) -> list[tuple[str, str, str, str]]:
    """Each turn of a transaction page: role class, kind, who (tags dropped), text."""
    return [
        (role, kind, html.unescape(re.sub(r"<[^>]+>", "", who)), html.unescape(text))
        for role, kind, who, text in TURN.findall(page)
    ]


CONVERSATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": (
        "/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"},
                {"role": "user", "content": "And Paris?"},
            ],
        },
    ),
    "responses": (
        "/responses",
        {
            "model": "gpt-4o-mini",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city":"Oslo"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "4 degrees"},
                {"role": "user", "content": "And Paris?"},
            ],
        },
    ),
    "messages": (
        "/messages",
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 256,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "I should look.", "signature": "c2ln"},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "4 degrees"}
                    ],
                },
                {"role": "assistant", "content": "4 degrees in Oslo."},
                {"role": "user", "content": [{"type": "text", "text": "And Paris?"}]},
            ],
        },
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("dialect", list(CONVERSATIONS))
def test_a_conversation_shows_its_tool_calls_results_and_thinking(
    proxy: ProxyServer, console: httpx.Client, dialect: str, stream: bool
) -> None:
    path, body = CONVERSATIONS[dialect]
    headers = {
        "Authorization": f"Bearer {CLIENT_KEY}",
        "x-mock-tool-calls": quote(WEATHER),
        "x-mock-content": "Checking.",
        "x-mock-thinking": "Paris next.",
    }
    answer = httpx.post(
        f"{proxy.api_base}{path}", json={**body, "stream": stream}, headers=headers, timeout=10
    )
    assert answer.status_code == 200, answer.text
    transaction_id = answer.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)
    page = console.get(f"/admin/transactions/{transaction_id}")
    assert page.status_code == 200
    shown = turns(page.text)
    prompt = [turn for turn in shown if "(answer)" not in turn[2]]
    said = [turn for turn in shown if "(answer)" in turn[2]]
    first_call = '{\n  "city": "Oslo"\n}'
    openai_prompt = [  # chat completions and Responses show the same turns
        ("system", "text", "system", "Be brief."),
        ("user", "text", "user", "Weather in Oslo?"),
        ("assistant", "tool_call", "assistant · tool call · get_weather", first_call),
        ("tool", "tool_result", "tool · tool result · call_1", "4 degrees"),
        ("user", "text", "user", "And Paris?"),
    ]
    expected_prompt = {
        "chat": openai_prompt,
        "responses": openai_prompt,
        "messages": [
            ("system", "text", "system", "Be brief."),
            ("user", "text", "user", "Weather in Oslo?"),
            ("assistant", "thinking", "assistant · thinking", "I should look."),
            ("assistant", "tool_call", "assistant · tool call · get_weather", first_call),
            ("user", "tool_result", "user · tool result · toolu_1", "4 degrees"),
            ("assistant", "text", "assistant", "4 degrees in Oslo."),
            ("user", "text", "user", "And Paris?"),
        ],
    }[dialect]
    assert prompt == expected_prompt
    paris = '{\n  "city": "Paris"\n}'
    call = ("assistant", "tool_call", "assistant (answer) · tool call · get_weather", paris)
    thinking = ("assistant", "thinking", "assistant (answer) · thinking", "Paris next.")
    text = ("assistant", "text", "assistant (answer)", "Checking.")
    # The thinking block is the Messages API's (the OpenAI mock has none to give).
    assert said == ([thinking, text, call] if dialect == "messages" else [text, call])
