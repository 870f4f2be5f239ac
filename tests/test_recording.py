"""The audit trail: every transaction recorded, whatever its outcome, with no secret.

A real proxy process writes the records; the tests read them back as a user would,
with ``luthien-control logs`` and the admin API, and look into the database file itself.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from luthien_control.policies.audit_log import TransactionContextLoggingPolicy
from luthien_control.recording import LogRecorder, Redactor, build_record
from luthien_control.transaction import ProxyRequest, Transaction
from tests.conftest import (
    CLIENT_KEY,
    MockBackendServer,
    ProxyServer,
    ProxyStarter,
    python_env,
)

SECRET = "sk-proj-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8"
ADMIN_KEY = "admin-test-key-123"


def policy(backend: str, *, check_requests: bool = True) -> dict[str, Any]:
    request_check = [{"type": "LeakedApiKeyDetection", "config": {}}] if check_requests else []
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "audited" if check_requests else "audited-answers",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                *request_check,
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}},
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(policy=policy(mock_backend.api_base), env={"ADMIN_API_KEY": ADMIN_KEY})


@pytest.fixture(scope="module")
def answering_proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """Secrets redacted in answers only: a request that scripts a secret in the mock's
    answer (an ``x-mock-content`` header) carries it, and a request-side check blocks it."""
    return start_proxy(policy=policy(mock_backend.api_base, check_requests=False))


def directives(**values: Any) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): quote(str(v), safe=":") for k, v in values.items()}


def chat(
    proxy: ProxyServer, *, stream: bool, content: str = "hi", **headers: str
) -> httpx.Response:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers},
        )
        response.read()
        return response


def test_streamed_transaction_is_recorded_whole_and_redacted(
    answering_proxy: ProxyServer,
) -> None:
    proxy = answering_proxy
    text = f"Your key is {SECRET} as requested."
    response = chat(proxy, stream=True, **directives(content=text, chunk_size=4))
    assert response.status_code == 200
    assert "[REDACTED]" in response.text and SECRET not in response.text
    record = proxy.record(response.headers["x-luthien-transaction-id"])

    assert record["outcome"] == "ok" and record["status"] == 200 and record["streamed"] is True
    assert record["client_key_name"] == "e2e" and record["policy_name"] == "audited-answers"
    assert record["endpoint"] == "/chat/completions" and record["model"] == "gpt-4o-mini"
    assert record["prompt_tokens"] == 1 and record["completion_tokens"] > 0
    assert record["total_tokens"] == record["prompt_tokens"] + record["completion_tokens"]
    for moment in ("received_at", "backend_first_byte_at", "client_first_byte_at", "ended_at"):
        assert record[moment] is not None
    assert record["request"]["received"]["headers"]["authorization"] == "[REDACTED]"
    assert record["request"]["sent"]["headers"]["authorization"] == "[REDACTED]"
    assert record["request"]["sent"]["body"]["stream_options"] == {"include_usage": True}
    sent = record["response"]["sent"]["stream"]
    assert sent["choices"][0]["message"]["content"] == "Your key is [REDACTED] as requested."
    assert sent["choices"][0]["finish_reason"] == "stop"
    received = record["response"]["received"]["stream"]
    assert received["choices"][0]["message"]["content"] == "Your key is [REDACTED] as requested."
    assert received["chunks"] > sent["chunks"]  # the usage chunk was hidden from the client
    headers_sent = record["response"]["sent"]["headers"]
    assert headers_sent["content-type"] == "text/event-stream; charset=utf-8"
    assert headers_sent["x-accel-buffering"] == "no"
    assert headers_sent["x-luthien-transaction-id"] == record["id"]
    assert record["decisions"] == [
        {
            "policy": "LeakedApiKeyDetection",
            "action": "redacted",
            "detail": "openai_api_key in the response",
        }
    ]


def test_a_streams_events_are_recorded_as_received_with_a_split_key_redacted(
    answering_proxy: ProxyServer,
) -> None:
    """The record keeps each event as the backend sent it (a replay feeds them again),
    and a key the backend split across events (4 characters each) is redacted in the
    events that hold its pieces: no event, nor their text read together, spells it."""
    proxy = answering_proxy
    text = f"Your key is {SECRET} as requested."
    response = chat(proxy, stream=True, **directives(content=text, chunk_size=4))
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    received = record["response"]["received"]
    events = received["events"]
    assert received["events_named"] is False  # chat completions: data lines only
    assert len(events) == received["stream"]["chunks"]
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    deltas = [
        event["choices"][0]["delta"].get("content", "") for event in events if event["choices"]
    ]
    # The mock cut the text every 4 characters: the key's first piece holds the mark,
    # the others are emptied.
    assert [delta for delta in deltas if delta] == [
        "Your",
        " key",
        " is ",
        "[REDACTED]",
        " as ",
        "requ",
        "este",
        "d.",
    ]
    assert events[-1]["usage"]["prompt_tokens"] == 1  # the usage event the client never saw
    stored = json.dumps(record)
    for piece in ("sk-p", "roj-", "Qq1W", "w2Ee", "3Rr4", "Tt5Y", "y6Uu", "7Ii8"):
        assert piece not in stored


def test_blocked_request_is_recorded_without_the_secret(proxy: ProxyServer) -> None:
    response = chat(proxy, stream=False, content=f"please use {SECRET}")
    assert response.status_code == 403
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["outcome"] == "blocked" and record["status"] == 403
    assert (
        record["request"]["received"]["body"]["messages"][0]["content"] == "please use [REDACTED]"
    )
    assert record["request"]["sent"] is None and record["response"]["received"] is None
    assert record["decisions"][0]["action"] == "blocked"
    assert "openai_api_key" in record["error"]
    error = record["response"]["sent"]["body"]["error"]  # what the client got, exactly
    assert error["code"] == "policy_blocked" and error["transaction_id"] == record["id"]
    assert record["response"]["sent"]["headers"]["content-type"] == "application/json"


def test_secret_in_the_query_string_is_blocked(proxy: ProxyServer) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions?token={SECRET}",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert response.status_code == 403
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["request"]["received"]["query"] == "token=[REDACTED]"


def test_secret_in_a_header_or_the_path_is_blocked_and_stored_redacted(proxy: ProxyServer) -> None:
    # A scripted answer is a header too: the request that carries a key is refused.
    scripted = chat(proxy, stream=True, **directives(content=f"answer {SECRET}"))
    assert scripted.status_code == 403
    record = proxy.record(scripted.headers["x-luthien-transaction-id"])
    assert record["decisions"][0]["detail"] == "openai_api_key in the request headers"
    assert record["request"]["received"]["headers"]["x-mock-content"] == "answer%20[REDACTED]"
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/files/{SECRET}",
            json={"model": "gpt-4o-mini", "messages": []},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert response.status_code == 403
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["endpoint"] == "/files/[REDACTED]"
    assert SECRET not in json.dumps(record)


def test_oversized_values_are_fitted_to_their_columns(proxy: ProxyServer) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json={"model": "m" * 300 + "\u0000", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert response.status_code == 404  # the backend's answer to an unknown model
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["model"] == "m" * 200


def test_backend_error_and_tool_calls_are_recorded(proxy: ProxyServer) -> None:
    limited = chat(proxy, stream=True, **directives(fail="status:429"))
    record = proxy.record(limited.headers["x-luthien-transaction-id"])
    assert record["status"] == 429 and record["outcome"] == "backend_error_status"
    assert record["response"]["received"]["headers"]["retry-after"] == "7"

    tools = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    called = chat(proxy, stream=True, **directives(tool_calls=tools))
    record = proxy.record(called.headers["x-luthien-transaction-id"])
    choice = record["response"]["sent"]["stream"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["parsed_arguments"] == {"city": "Paris"}


def test_disconnected_stream_is_recorded_as_such(proxy: ProxyServer) -> None:
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{proxy.api_base}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **directives(words=300, delay_ms=20)},
        ) as response,
    ):
        transaction_id = response.headers["x-luthien-transaction-id"]
        chunks = response.iter_bytes()
        next(chunks)
    record = proxy.record(transaction_id)
    assert record["outcome"] == "client_disconnected"
    assert 0 < record["chunks_sent"] < 300
    assert record["usage_partial"] is True  # cut short: no complete usage exists


def test_nothing_secret_in_the_database_file(
    proxy: ProxyServer, answering_proxy: ProxyServer
) -> None:
    chat(proxy, stream=False, content=f"in the request {SECRET}")
    chat(proxy, stream=True, **directives(content=f"leak {SECRET} leak", chunk_size=3))
    for text in (f"leak {SECRET} leak", f"after a newline:\n{SECRET}", f"\x1b[31m{SECRET}"):
        chat(answering_proxy, stream=True, **directives(content=text, chunk_size=5))
        chat(answering_proxy, stream=False, **directives(content=text))
    time.sleep(1.0)  # let the recorder's batch land (records are written in the background)
    for server in (proxy, answering_proxy):
        path = Path(server.database_url.split("///", 1)[1])
        dump = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sqlite3; print(list(sqlite3.connect({str(path)!r}).iterdump()))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "transactions" in dump
        assert SECRET not in dump and SECRET[:16] not in dump
        assert CLIENT_KEY not in dump


def test_logs_lists_filters_and_follows(proxy: ProxyServer) -> None:
    ok = chat(proxy, stream=False).headers["x-luthien-transaction-id"]
    blocked = chat(proxy, stream=False, content=SECRET).headers["x-luthien-transaction-id"]
    proxy.record(blocked)
    listing = proxy.cli("logs", "--limit", "500")
    assert listing.returncode == 0 and ok in listing.stdout and blocked in listing.stdout
    assert listing.stdout.splitlines()[0].split()[:3] == ["RECEIVED", "ID", "KEY"]
    only_blocked = proxy.cli("logs", "--outcome", "blocked", "--json", "--limit", "500")
    rows = [json.loads(line) for line in only_blocked.stdout.splitlines()]
    assert rows and all(row["outcome"] == "blocked" for row in rows)
    assert blocked in {row["id"] for row in rows} and ok not in {row["id"] for row in rows}
    bad = proxy.cli("logs", "--since", "yesterday-ish")
    assert bad.returncode == 2 and bad.stderr.startswith("luthien-control: error: --since")

    follower = subprocess.Popen(
        [sys.executable, "-m", "luthien_control", "logs", "--follow", "--json", "--limit", "1"],
        env=python_env(DATABASE_URL=proxy.database_url),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None
    follower.stdout.readline()  # the most recent record, printed at once
    fresh = chat(proxy, stream=False).headers["x-luthien-transaction-id"]
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while fresh not in seen and time.monotonic() < deadline:
        seen.append(json.loads(follower.stdout.readline())["id"])
    follower.send_signal(signal.SIGINT)
    follower.wait(timeout=10)
    follower.stdout.close()
    assert seen == [fresh]  # nothing older printed again


def test_admin_api(proxy: ProxyServer) -> None:
    tx_id = chat(proxy, stream=False).headers["x-luthien-transaction-id"]
    proxy.record(tx_id)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for path in ("/admin/api/transactions", "/admin/api/keys", "/admin/api/policies"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        listing = client.get("/admin/api/transactions", params={"limit": 1000}, headers=auth)
        assert listing.status_code == 200
        assert tx_id in {row["id"] for row in listing.json()["data"]}
        detail = client.get(f"/admin/api/transactions/{tx_id}", headers=auth).json()
        assert (
            detail["id"] == tx_id
            and detail["request"]["received"]["headers"]["authorization"] == "[REDACTED]"
        )
        keys = client.get("/admin/api/keys", headers=auth).json()["data"]
        assert [k["name"] for k in keys] == ["e2e"] and CLIENT_KEY not in json.dumps(keys)
        assert client.get("/admin/api/transactions/nope", headers=auth).status_code == 404


def test_admin_api_is_off_without_a_key(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    proxy = start_proxy(policy=policy(mock_backend.api_base))
    response = httpx.get(
        f"{proxy.url}/admin/api/transactions", headers={"Authorization": "Bearer x"}
    )
    assert response.status_code == 401
    assert "ADMIN_API_KEY" in response.json()["error"]["message"]


def test_sigterm_lets_streams_finish_and_flushes_every_record(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    proxy = start_proxy(policy=policy(mock_backend.api_base))
    assert proxy.server is not None and proxy.server.process is not None
    client = httpx.Client(timeout=30)
    streams = [
        client.stream(
            "POST",
            f"{proxy.api_base}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **directives(words=40, delay_ms=25)},
        )
        for _ in range(4)
    ]
    responses = [stream.__enter__() for stream in streams]
    ids = [r.headers["x-luthien-transaction-id"] for r in responses]
    proxy.server.process.send_signal(signal.SIGTERM)
    bodies = [r.read() for r in responses]
    for stream in streams:
        stream.__exit__(None, None, None)
    client.close()
    assert proxy.server.process.wait(timeout=30) == 0
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)  # finished, not cut
    for transaction_id in ids:
        result = proxy.cli("logs", "--transaction", transaction_id, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["outcome"] == "ok"


# The Redactor on its own: what is stored and logged holds no key, however it is written.

LEGACY_KEY = "sk-" + "T3BlbkFJ" * 6  # no distinctive prefix: found after a non-letter only
PEM_BODY = "\n".join(["MIIEowIBAAKCAQEAx9Rk2Fq3Y+abc/def" * 2] * 4)
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"


def stored(document: Any, redactor: Redactor | None = None) -> str:
    """The text of a JSON column, as ``build_record`` hands it to the database."""
    text = (redactor or Redactor()).document(document)
    json.loads(text)  # valid JSON
    return text


@pytest.mark.parametrize(
    "content",
    [
        "my key:\x0b" + LEGACY_KEY,  # serialized "\u000bsk-...": an escape ending in a letter
        "my key:\x1b" + LEGACY_KEY,  # "\u001bsk-..."
        "\x1b[31m" + LEGACY_KEY + "\x1b[0m",  # an ANSI colour code
        "glued:mykey" + SECRET,
        "line\n" + SECRET,
    ],
    ids=["vertical-tab", "escape", "ansi", "glued", "newline"],
)
def test_redactor_works_on_decoded_strings(content: str) -> None:
    document = {"body": {"messages": [{"role": "user", "content": content}]}}
    text = stored(document)
    assert "[REDACTED]" in text
    assert LEGACY_KEY[3:] not in text and SECRET[8:] not in text


def test_redactor_redacts_object_keys_and_json_in_strings() -> None:
    arguments = json.dumps({"key": PEM, "then": "done"})  # JSON text inside a JSON string
    document = {
        "metadata": {SECRET: "x"},
        "tools": [{"parameters": {"properties": {"n" + SECRET: {}}}}],
        "tool_calls": [{"function": {"name": "f", "arguments": arguments}}],
    }
    text = stored(document)
    assert SECRET[8:] not in text
    for line in [*PEM_BODY.splitlines(), "END RSA"]:
        assert line not in text  # the whole key, not only its header line
    parsed = json.loads(text)
    assert parsed["metadata"] == {"[REDACTED]": "x"}
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {
        "key": "[REDACTED]",
        "then": "done",
    }


def test_redactor_decodes_json_escapes_in_json_text() -> None:
    hidden = "\\u0073\\u006b-" + SECRET[3:]  # "sk-..." spelled with JSON escapes
    arguments = '{"token": "' + hidden + '", "n": 1}'
    text = stored({"tool_calls": [{"function": {"arguments": arguments}}]})
    assert SECRET[8:] not in text
    assert "[REDACTED]" in text
    plain = {"arguments": '{"path": "C:\\\\new\\ttable", "n": 1}'}  # escapes, no key
    assert json.loads(stored(plain)) == plain


def test_redactor_decodes_percent_escapes() -> None:
    encoded = "".join(f"%{ord(char):02X}" for char in SECRET)
    text = stored({"query": f"token={encoded}", "url": f"http://b/v1/x?t={encoded}&a=1"})
    parsed = json.loads(text)
    assert parsed == {"query": "token=[REDACTED]", "url": "http://b/v1/x?t=[REDACTED]&a=1"}
    clean = {"query": "a=%20b&c=100%25"}
    assert json.loads(stored(clean)) == clean  # stored as it came when nothing is hidden


def test_redactor_custom_patterns_and_deep_documents() -> None:
    redactor = Redactor([r"internal-\d{6}"])
    deep: Any = {"k": f"internal-123456 and {SECRET}"}
    for _ in range(600):  # deeper than orjson writes, deeper than Python recurses
        deep = [deep]
    text = stored({"body": deep}, redactor)
    assert "internal-123456" not in text and SECRET not in text
    assert text.count("[REDACTED]") == 2 and text.count("[") >= 600


def test_build_record_redacts_the_endpoint_model_query_and_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    encoded = "".join(f"%{ord(char):02X}" for char in SECRET)
    body = json.dumps({"model": "m-" + SECRET, "messages": []}).encode()
    request = ProxyRequest("POST", f"/files/{SECRET}", f"t={encoded}".encode(), {}, body)
    tx = Transaction(request=request, services=None)
    tx.trail.request_body = body
    record = build_record(tx, Redactor())
    assert record["endpoint"] == "/files/[REDACTED]"
    assert record["model"] == "m-[REDACTED]"
    received = json.loads(record["request"])["received"]
    assert received["query"] == "t=[REDACTED]"
    assert received["body"]["model"] == "m-[REDACTED]"
    with caplog.at_level(logging.DEBUG, logger="luthien_control.transactions"):
        LogRecorder().record(tx)
    assert "/files/[REDACTED]" in caplog.text and SECRET not in caplog.text


@pytest.mark.anyio
async def test_the_logging_policy_redacts_decoded_values(caplog: pytest.LogCaptureFixture) -> None:
    body = (
        '{"model": "m", "metadata": {"' + SECRET + '": 1}, "messages": [{"role": "user", '
        '"content": "a\\u001b' + LEGACY_KEY + '"}]}'
    ).encode()
    request = ProxyRequest("POST", f"/files/{SECRET}", b"", {"x-note": f"%73k-{SECRET[3:]}"}, body)
    tx = Transaction(request=request, services=None)
    policy = TransactionContextLoggingPolicy(TransactionContextLoggingPolicy.Config(), {})
    with caplog.at_level(logging.INFO, logger="luthien_control.policies.transaction_log"):
        await policy.apply(tx)
    logged = caplog.text
    assert "transaction_id" in logged and logged.count("[REDACTED]") == 4
    assert SECRET[8:] not in logged and LEGACY_KEY[3:] not in logged
    assert tx.request.body == body  # the request itself is untouched


@pytest.mark.parametrize(
    ("endpoint", "event"),
    [
        ("/chat/completions", {"choices": [{"index": 0, "delta": {"content": "sk-"}}]}),
        ("/chat/completions", {"choices": [{"index": 2, "delta": {"content": "x"}}], "k": "v"}),
        # Not plain: another field of the delta, a finish, two choices.
        ("/chat/completions", {"choices": [{"delta": {"content": "a", "refusal": "b"}}]}),
        ("/chat/completions", {"choices": [{"delta": {"content": "a"}, "finish_reason": "x"}]}),
        ("/chat/completions", {"choices": [{"delta": {"content": "a"}}, {"index": 1}]}),
        (
            "/messages",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "text_delta", "text": "a"},
            },
        ),
        (  # a field beside the text: read as text_slots reads it
            "/messages",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "a", "citations": "sk-x"},
            },
        ),
    ],
)
def test_a_stored_events_text_is_read_as_the_dialect_reads_it(
    endpoint: str, event: dict[str, Any]
) -> None:
    """The record reads the usual event (``Dialect.plain_text``) without asking for all
    its slots: the same strings, channels and joins either way."""
    from luthien_control.dialects import dialect_for
    from luthien_control.recording import _event_slots

    dialect = dialect_for(endpoint)

    def described(slots: list[Any]) -> list[tuple[Any, ...]]:
        return [(s.key, s.field, s.kind, s.joins, s.text) for s in slots]

    expected = [
        (s.key, s.field, s.kind, ("delta", dialect.joins(s.key) or s.key), s.text)
        for s in dialect.text_slots(event)
    ]
    assert described(_event_slots(dialect, [event])) == expected
