"""The review queue on a real proxy: a judge with ``action: flag`` (and any policy, through
``Transaction.flag``) puts a transaction in the queue; a reviewer in the console marks it,
and the verdict, who and when show in the console, ``luthien-control logs``, the admin API
and ``/metrics``."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.conftest import MockBackendServer, ProxyServer, ProxyStarter
from tests.policies.test_judge import FORBIDDEN
from tests.test_console import ADMIN_KEY, csrf, sign_in
from tests.test_judge import MESSAGES, answer, judged


@pytest.fixture(scope="module")
def proxy(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, content_judge_url: str
) -> ProxyServer:
    policy = judged(mock_backend.api_base, content_judge_url, mode="buffer", action="flag")
    return start_proxy(policy=policy, env={"ADMIN_API_KEY": ADMIN_KEY}, workers=2)


def ask(proxy: ProxyServer, text: str) -> str:
    response = httpx.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {proxy.key}", **answer(text)},
        timeout=30,
    )
    assert response.status_code == 200  # flagged, not blocked: the client has its answer
    return response.headers["x-luthien-transaction-id"]


def admin(proxy: ProxyServer, path: str) -> Any:
    answer = httpx.get(
        f"{proxy.url}/admin/api/{path}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 200
    return answer.json()


def test_a_flagged_answer_waits_for_a_reviewer_and_the_verdict_is_kept(
    proxy: ProxyServer,
) -> None:
    # Each recorded before the next is sent: with two workers, two records written by
    # different workers' recorders may reach the table in either order, and the queue's
    # order is the table's.
    recorded = []
    for text in (
        "a calm story",
        f"a story about {FORBIDDEN}, one",
        f"a story about {FORBIDDEN}, two",
    ):
        recorded.append(ask(proxy, text))
        proxy.record(recorded[-1])
    clean, first, second = recorded
    assert proxy.record(first)["flagged"] is True
    assert proxy.record(clean)["flagged"] is False

    queue = [row["id"] for row in admin(proxy, "reviews")["data"]]
    assert queue == [first, second]  # oldest first, the clean one not there
    flagged = admin(proxy, "transactions?flagged=1")["data"]
    assert {row["id"] for row in flagged} == {first, second}

    console = sign_in(proxy, "rev. grace")
    page = console.get("/admin/review")
    assert page.text.index(first) < page.text.index(second)
    detail = console.get(f"/admin/transactions/{first}")
    assert "A policy flagged this transaction: it waits for a person." in detail.text
    token = csrf(detail)
    saved = console.post(
        f"/admin/transactions/{first}/review",
        data={"csrf": token, "verdict": "violation", "note": "it <b>did</b> mention it"},
        headers={"Origin": proxy.url},
    )
    assert saved.status_code == 303 and saved.headers["location"] == "/admin/review"
    refused = console.post(
        f"/admin/transactions/{clean}/review",
        data={"csrf": token, "verdict": "fine", "note": ""},
    )
    assert refused.status_code == 400
    assert "only a transaction a policy flagged is reviewed" in refused.text
    wrong = console.post(
        f"/admin/transactions/{second}/review", data={"csrf": token, "verdict": "maybe"}
    )
    assert wrong.status_code == 400
    shown = console.get(f"/admin/transactions/{first}").text
    console.close()
    assert re.search(
        r'<p class="verdict verdict-violation"><strong>violation</strong> by rev\. grace, '
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: <q>it &lt;b&gt;did&lt;/b&gt; mention it</q></p>",
        shown,
    )

    assert [row["id"] for row in admin(proxy, "reviews")["data"]] == [second]
    (review,) = admin(proxy, f"transactions/{first}")["reviews"]
    assert {k: review[k] for k in ("verdict", "note", "reviewer")} == {
        "verdict": "violation",
        "note": "it <b>did</b> mention it",
        "reviewer": "rev. grace",
    }
    logged = json.loads(proxy.cli("logs", "--transaction", first, "--json").stdout)
    assert [(r["verdict"], r["reviewer"]) for r in logged["reviews"]] == [
        ("violation", "rev. grace")
    ]
    metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    assert 'luthien_reviews_total{verdict="violation"} 1.0' in metrics
