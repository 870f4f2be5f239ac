"""Red team on what the proxy writes: records, console pages, metrics (issue 10, point 4).

The proxy here has no ``LeakedApiKeyDetection``: the secret reaches the backend as the
client sent it, and the record's own redaction (``recording.Redactor``, always on) is
the only thing between it and the database, the console and the CLI. Each test sends a
key hidden in a way that redaction did not undo, or that a reader of what the proxy
writes joins back together, through a real ``luthien-control serve`` process; each was a
leak before its fix.

- **The redactor's decodings were not taken to the end.** ``SecretPattern.scrub`` tries
  a string's decoded forms (percent-decoded once and twice, JSON escapes undone) and
  returns the first that holds a key, redacted: a second key hidden one decoding deeper
  in the same string was stored as it came, one ``unquote`` (or one JSON read) away.
- **The console joined what the record read apart.** The transaction page renders a
  conversation from the record, joining the parts of a text (``conversation._parts_text``)
  wider than the dialects' channels do: the summary parts of a Responses reasoning item
  (each a string of its own to the record), and the blocks of an Anthropic ``system`` or
  tool result that are not ``type: text`` but carry a ``text``. A key split across them
  was stored redacted nowhere and shown whole on the page.
- **A NUL inside a key.** Redaction read the string with its NUL; the proxy then dropped
  NUL from the model, endpoint and error columns and the search text (PostgreSQL refuses
  it), and an HTML parser drops it: the model column held the whole key.
- **The client's own key, encoded.** It is no pattern: it was taken out only where it was
  written as it is, not percent-encoded, JSON-escaped, as the model, in the path (the
  endpoint column, the DEBUG line).
- **A key as a path's first segment was a ``/metrics`` label** (``route_label``).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

from luthien_control.console.conversation import answer_turns, request_turns
from luthien_control.policies.secrets import default_secrets, field_forms
from luthien_control.recording import Redactor
from tests.conftest import CLIENT_KEY, ProxyServer, ProxyStarter, serve_in_thread

ADMIN_KEY = "records-admin-key-0123"
# Two halves of an Anthropic key: neither spells a key alone (fewer than 20 characters
# after "sk-" in the first, no prefix in the second), together they do.
HEAD = "sk-ant-api03-Qm7R"
TAIL = "k2Wp9Xc4Vn8Zt1Ly6Hs3Jd5Fg0Ba"
KEY = HEAD + TAIL
SECOND = "sk-ant-api03-" + "Pd8Tq4Ns1Yw7Kc2Mx6Lb9Rz"  # another key, for two in one string
SECRETS = default_secrets()


def spells_a_key(text: str) -> bool:
    """Whether ``text``, in any form a reader may decode it to (JSON escapes undone
    twice, percent escapes undone three times), holds a key."""
    forms = {text}
    for _ in range(3):
        for form in list(forms):
            forms.update(field_forms(form))
    return any(SECRETS.search(form) for form in forms) or any(
        part in form for form in forms for part in (KEY, SECOND[13:])
    )


# --- a backend that answers with what the request names -----------------------------------


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers ``x-answer`` (JSON, percent-encoded) when the request names one, else a
    small answer of the route's dialect."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    path = scope["path"]
    if "x-answer" in headers:
        body = unquote(headers["x-answer"]).encode()
    elif path.endswith("/messages"):
        body = json.dumps(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude",
                "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 1, "output_tokens": 1},
            }
        ).encode()
    elif path.endswith("/responses"):
        body = json.dumps(responses_answer([message_output("ok")])).encode()
    else:
        body = json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "model": "gpt",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
            }
        ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def responses_answer(output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "gpt",
        "output": output,
        "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    }


def message_output(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def reasoning(*parts: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": part} for part in parts],
    }


@pytest.fixture(scope="module")
def backend_url() -> Iterator[str]:
    with serve_in_thread(backend) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, backend_url: str) -> ProxyServer:
    """No secret scanning: the record's redaction is all that stands."""
    policy = {
        "type": "SerialPolicy",
        "config": {
            "name": "records",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend_url}},
                {"type": "SendBackendRequest", "config": {}},
            ],
        },
    }
    return start_proxy(policy=policy, env={"ADMIN_API_KEY": ADMIN_KEY, "LOG_LEVEL": "DEBUG"})


@pytest.fixture(scope="module")
def console(proxy: ProxyServer) -> Iterator[httpx.Client]:
    client = httpx.Client(base_url=proxy.url, timeout=10)
    answer = client.post(
        "/admin/sign-in",
        data={"name": "eve", "key": ADMIN_KEY, "next": "/admin/traffic"},
        headers={"Origin": proxy.url},
    )
    assert answer.status_code == 303
    yield client
    client.close()


def send(
    proxy: ProxyServer,
    path: str,
    body: dict[str, Any],
    *,
    answer: dict[str, Any] | None = None,
    query: str = "",
) -> str:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    if answer is not None:
        headers["x-answer"] = quote(json.dumps(answer))
    response = httpx.post(f"{proxy.api_base}{path}{query}", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["x-luthien-transaction-id"]


def stored(proxy: ProxyServer, transaction_id: str) -> str:
    """The record as ``luthien-control logs --json`` prints it."""
    return json.dumps(proxy.record(transaction_id), ensure_ascii=False)


def page(console: httpx.Client, transaction_id: str) -> str:
    shown = console.get(f"/admin/transactions/{transaction_id}")
    assert shown.status_code == 200
    return html.unescape(shown.text)


# --- the redactor's decodings, taken to the end -------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        # percent-encoded once and twice: the first decoding's key redacted, the second's kept
        f"%73{KEY[1:]} and %2573{SECOND[1:]}",
        f"a=%2573{KEY[1:]}&b=%73{SECOND[1:]}",
        # percent-encoded, then a JSON escape: the JSON text of tool-call arguments
        json.dumps({"a": f"%73{KEY[1:]}", "b": f"\\u0073{SECOND[1:]}"}),
        # a JSON escape inside JSON text inside a string (arguments escaped twice)
        json.dumps({"cmd": json.dumps({"k": KEY}).replace("s", "\\u0073", 1)}),
    ],
    ids=["percent-twice", "query", "percent-then-json", "json-twice"],
)
def test_the_redactor_leaves_no_key_in_any_decoding(text: str) -> None:
    assert spells_a_key(text)
    assert not spells_a_key(Redactor().text(text))


def test_two_keys_hidden_at_two_depths_are_stored_redacted(proxy: ProxyServer) -> None:
    content = f"first %73{KEY[1:]} then %2573{SECOND[1:]}"
    transaction_id = send(
        proxy,
        "/chat/completions",
        {"model": "gpt", "messages": [{"role": "user", "content": content}]},
        query=f"?a=%2573{KEY[1:]}&b=%73{SECOND[1:]}",
    )
    record = stored(proxy, transaction_id)
    assert "[REDACTED]" in record
    assert not spells_a_key(record)


@pytest.mark.parametrize(
    "text",
    [f"{HEAD}\x00{TAIL}", f"s\x00{KEY[1:]}", f"{HEAD}%00{TAIL}", f"{HEAD}\\u0000{TAIL}"],
    ids=["nul", "nul-in-prefix", "percent-nul", "json-nul"],
)
def test_a_nul_inside_a_key_hides_it_from_no_one(text: str) -> None:
    """The proxy strips NUL from what it stores as text (PostgreSQL refuses it): the
    model and endpoint columns, the error, the search text; an HTML parser drops it too.
    A key with a NUL inside is a key to all of them."""
    redacted = Redactor().text(text)
    assert "[REDACTED]" in redacted
    assert not spells_a_key(redacted.replace("\x00", ""))


def test_a_key_with_a_nul_inside_is_stored_redacted(proxy: ProxyServer) -> None:
    hidden = f"{HEAD}\x00{TAIL}"
    transaction_id = send(
        proxy,
        "/chat/completions",
        {"model": hidden, "messages": [{"role": "user", "content": f"say {hidden}"}]},
    )
    record = proxy.record(transaction_id)
    assert record["model"] == "[REDACTED]"
    assert not spells_a_key(json.dumps(record).replace("\\u0000", ""))
    database = proxy.database_url.split("///", 1)[1]
    written = b"".join(
        Path(database + suffix).read_bytes()
        for suffix in ("", "-wal")
        if Path(database + suffix).exists()
    )
    assert KEY.encode() not in written.replace(b"\x00", b"")  # the search text, the index


def test_the_clients_own_key_encoded_is_stored_redacted(proxy: ProxyServer) -> None:
    """The client's key is no pattern: it was taken out of the record where it was
    written as it is, not where it was percent-encoded (the query) or JSON-escaped inside
    JSON text (a tool call's arguments)."""
    encoded = "%" + CLIENT_KEY[0].encode().hex() + CLIENT_KEY[1:]
    arguments = json.dumps({"token": CLIENT_KEY}).replace(
        CLIENT_KEY[0], f"\\u{ord(CLIENT_KEY[0]):04x}", 1
    )
    messages = [
        {"role": "user", "content": f"note {encoded}"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "save", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "saved"},
    ]
    transaction_id = send(
        proxy,
        "/chat/completions",
        {"model": "gpt", "messages": messages},
        query=f"?note={encoded}",
    )
    record = json.dumps(proxy.record(transaction_id))
    forms = {record}
    for _ in range(3):
        forms |= {form for text in list(forms) for form in field_forms(text)}
    assert not any(CLIENT_KEY in form for form in forms)


def test_the_clients_own_key_as_the_model_or_in_the_path_is_stored_redacted(
    proxy: ProxyServer,
) -> None:
    """The model and endpoint columns were redacted with the patterns only."""
    transaction_id = send(
        proxy,
        "/chat/completions",
        {"model": CLIENT_KEY, "messages": [{"role": "user", "content": "hi"}]},
    )
    record = proxy.record(transaction_id)
    assert record["model"] == "[REDACTED]"
    hidden = f"{CLIENT_KEY[:5]}\x00{CLIENT_KEY[5:]}"
    transaction_id = send(
        proxy,
        "/chat/completions",
        {"model": hidden, "messages": [{"role": "user", "content": f"hi {hidden}"}]},
    )
    record = proxy.record(transaction_id)
    assert record["model"] == "[REDACTED]"
    assert CLIENT_KEY not in json.dumps(record).replace("\\u0000", "")
    response = httpx.get(
        f"{proxy.api_base}/models/{CLIENT_KEY}",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    )
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["endpoint"] == "/models/[REDACTED]"
    assert CLIENT_KEY not in json.dumps(record)
    assert proxy.server is not None
    log = proxy.server.log()
    assert transaction_id in log  # the transaction's DEBUG line
    assert CLIENT_KEY not in log.replace("\x00", "")


# --- what the console joins ---------------------------------------------------------------


def test_a_key_split_across_reasoning_summary_parts_is_not_shown_whole(
    proxy: ProxyServer, console: httpx.Client
) -> None:
    request = {
        "model": "gpt",
        "input": [reasoning(HEAD, TAIL), {"role": "user", "content": "go on"}],
    }
    answer = responses_answer([reasoning(HEAD, TAIL), message_output("done")])
    transaction_id = send(proxy, "/responses", request, answer=answer)
    stored(proxy, transaction_id)
    shown = page(console, transaction_id)
    assert "go on" in shown and "done" in shown
    assert KEY not in shown


@pytest.mark.parametrize("where", ["system", "tool_result"])
def test_a_key_split_across_anthropic_blocks_is_not_shown_whole(
    proxy: ProxyServer, console: httpx.Client, where: str
) -> None:
    blocks = [{"type": "text", "text": HEAD}, {"type": "document", "text": TAIL}]
    body: dict[str, Any] = {"model": "claude", "max_tokens": 10}
    if where == "system":
        body |= {"system": blocks, "messages": [{"role": "user", "content": "go on"}]}
    else:
        body["messages"] = [
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": blocks}],
            },
            {"role": "user", "content": "go on"},
        ]
    transaction_id = send(proxy, "/messages", body)
    stored(proxy, transaction_id)
    shown = page(console, transaction_id)
    assert "go on" in shown
    assert KEY not in shown


def test_the_conversation_joins_no_wider_than_the_record_reads() -> None:
    """The view itself (before the page redacts it again): the parts the record reads
    apart are lines apart."""
    summary = responses_answer([reasoning(HEAD, TAIL)])
    assert answer_turns("/responses", {"body": summary})[0]["text"] == f"{HEAD}\n{TAIL}"
    blocks = [
        {"type": "text", "text": "a"},
        {"type": "text", "text": HEAD},
        {"type": "document", "text": TAIL},
    ]
    system = request_turns("/messages", {"system": blocks, "messages": []})
    assert system[0]["text"] == f"a{HEAD}\n{TAIL}"
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 2}]}
    assert request_turns("/chat/completions", chat)[0]["text"] == "xx"  # one text, joined


# --- metrics ------------------------------------------------------------------------------


def test_a_key_in_the_path_is_no_metrics_label(proxy: ProxyServer) -> None:
    """``/metrics`` labels a request by its route; a path's first segment is the client's
    text, and a key there was a label."""
    response = httpx.get(
        f"{proxy.api_base}/{KEY}/models",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    )
    assert response.status_code < 500
    metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    assert "luthien" in metrics
    assert not spells_a_key(metrics)
