"""The judge never waits on the capacity of the requests it judges (issue 11).

A request holds its slot of the clients' backend pool (``BACKEND_POOL_SIZE``) while its
policies wait for a judge. A judge call that needed a slot of that same pool deadlocked
it: with ``BACKEND_POOL_SIZE=4``, four window-judged streams held the four slots, each
waiting for a judge call that waited for a slot, until every judge call timed out. Judge
calls now go over a pool of the proxy's own (``JUDGE_POOL_SIZE``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

import luthien_control
from luthien_control.app import Services
from luthien_control.exceptions import ConfigurationError
from luthien_control.settings import DEFAULT_JUDGE_POOL_SIZE, Settings, load_settings
from luthien_control.transaction import ProxyRequest, Transaction
from tests.conftest import MockBackendServer, ProxyServer, ProxyStarter, serve_in_thread
from tests.policies.test_judge import ContentJudge, make_policy
from tests.test_judge import MESSAGES, answer, judged

STREAMS = 8
CLIENT_POOL = 4  # half the streams: the second half waits for the first to finish
JUDGE_POOL = 2  # fewer than the streams judged at once: judge calls wait for each other too
WINDOW, OVERLAP = 20, 5
TEXT_CHARS = 3 * WINDOW  # three windows per answer, the last ending with the text
CHUNK_CHARS = 5
DELAY_MS = 100  # between chunks: each stream holds its slot for about 1.4 s
JUDGE_TIMEOUT = 5.0
ADMIN_KEY = "lc-admin-key-for-the-judge-pool-test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def content_judge() -> Iterator[tuple[ContentJudge, str]]:
    """A judge that allows any text without the forbidden word (all of them here)."""
    judge = ContentJudge()
    with serve_in_thread(judge) as url:
        yield judge, url


def answer_text(number: int) -> str:
    text = f"Answer {number}: a calm, harmless remark about the weather today."
    return text[:TEXT_CHARS].ljust(TEXT_CHARS, ".")


def windows_of(text: str) -> list[str]:
    """The passages window mode sends to the judge: each window with the overlap before it."""
    return [text[max(0, start - OVERLAP) : start + WINDOW] for start in range(0, len(text), WINDOW)]


def stored_record(proxy: ProxyServer, transaction_id: str) -> dict[str, Any]:
    """The transaction's record through the admin API (one CLI process per record costs
    seconds on a busy machine); records are written in the background, so this polls."""
    url = f"{proxy.url}/admin/api/transactions/{transaction_id}"
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(url, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        if response.status_code != 404:
            assert response.status_code == 200, response.text
            record: dict[str, Any] = response.json()
            return record
        assert time.monotonic() < deadline, f"transaction {transaction_id} never recorded"
        time.sleep(0.1)


# --- end to end: a real proxy, its clients' pool full ------------------------------------------


def test_window_judged_streams_beyond_the_client_pool_all_complete(
    start_proxy: ProxyStarter,
    mock_backend: MockBackendServer,
    content_judge: tuple[ContentJudge, str],
) -> None:
    judge, judge_url = content_judge
    judge.reviewed.clear()
    policy = judged(
        mock_backend.api_base,
        judge_url,
        mode="window",
        window_chars=WINDOW,
        overlap_chars=OVERLAP,
        timeout=JUDGE_TIMEOUT,
    )
    proxy = start_proxy(
        policy=policy,
        env={
            "BACKEND_POOL_SIZE": str(CLIENT_POOL),
            "JUDGE_POOL_SIZE": str(JUDGE_POOL),
            "ADMIN_API_KEY": ADMIN_KEY,
        },
    )
    start_together = threading.Barrier(STREAMS)

    def stream(number: int) -> tuple[str, str]:
        """The text one client received, and its transaction id."""
        headers = {**answer(answer_text(number), CHUNK_CHARS), "x-mock-delay-ms": str(DELAY_MS)}
        with OpenAI(base_url=proxy.api_base, api_key=proxy.key, max_retries=0) as client:
            start_together.wait()
            events = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers
            )
            text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
            return text, events.response.headers["x-luthien-transaction-id"]

    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(stream, range(STREAMS)))

    assert [text for text, _ in results] == [answer_text(n) for n in range(STREAMS)]
    expected_windows = [w for n in range(STREAMS) for w in windows_of(answer_text(n))]
    assert sorted(judge.reviewed) == sorted(expected_windows)
    for number, (_, transaction_id) in enumerate(results):
        record = stored_record(proxy, transaction_id)
        assert (record["outcome"], record["status"], record["error"]) == ("ok", 200, None)
        [sent] = record["response"]["sent"]["stream"]["choices"]
        assert sent["message"]["content"] == answer_text(number)
        # Every decision of the transaction: one allowed window after another, no error.
        decisions = [
            (d["policy"], d["action"], orjson.loads(d["detail"])) for d in record["decisions"]
        ]
        for _, _, detail in decisions:
            assert isinstance(detail.pop("latency_ms"), float)
        assert decisions == [
            (
                "LLMJudgePolicy",
                "judge_allowed",
                {"verdict": "allow", "reason": "nothing forbidden", "mode": "window", "window": n},
            )
            for n in (1, 2, 3)
        ]


# --- the pools themselves ------------------------------------------------------------------


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    """The proxy's services with one slot in the clients' pool and one in the judges'."""
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'luthien.db'}",
        backend_pool_size=1,
        judge_pool_size=1,
    )
    services = Services.create(settings)
    await services.backend.start()
    await services.judge_backend.start()
    yield services
    await services.judge_backend.close()
    await services.backend.close()
    await services.engine.dispose()


@pytest.mark.anyio
async def test_a_judge_call_gets_a_connection_while_requests_hold_the_whole_client_pool(
    services: Services, content_judge: tuple[ContentJudge, str]
) -> None:
    judge, judge_url = content_judge
    judge.reviewed.clear()
    policy = make_policy(judge_url, timeout=JUDGE_TIMEOUT)
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    tx = Transaction(ProxyRequest("POST", "/chat/completions", b"", {}, body), services)
    # A client's request holds the only slot of the clients' pool, its answer unread.
    async with services.backend.open("GET", f"{judge_url}/models", {}, None) as held:
        assert held.status == 200
        await policy.review(tx, "a passage", subject="window", mode="window", window=1)
    assert judge.reviewed == ["a passage"]
    [(action, detail)] = [(d.action, orjson.loads(d.detail)) for d in tx.decisions]
    assert isinstance(detail.pop("latency_ms"), float)
    assert (action, detail) == (
        "judge_allowed",
        {"verdict": "allow", "reason": "nothing forbidden", "mode": "window", "window": 1},
    )


def test_the_judge_pool_size_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUDGE_POOL_SIZE", raising=False)
    assert Settings(_env_file=None).judge_pool_size == DEFAULT_JUDGE_POOL_SIZE
    monkeypatch.setenv("JUDGE_POOL_SIZE", "7")
    assert Settings(_env_file=None).judge_limits.pool_size == 7
    monkeypatch.setenv("JUDGE_POOL_SIZE", "0")
    with pytest.raises(ConfigurationError, match="invalid JUDGE_POOL_SIZE"):
        load_settings()


def test_only_the_clients_requests_use_the_clients_pool() -> None:
    """``SendBackendRequest`` is the one user of ``Services.backend``; a call the proxy
    makes for itself (a judge, a future monitor) goes over ``Services.judge_backend``."""
    package = Path(luthien_control.__file__).parent
    users = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"services\.backend\b|\bbackend\.open\(", path.read_text())
    }
    assert users == {"policies/backend.py"}
    assert "services.judge_backend" in (package / "policies" / "judge.py").read_text()
