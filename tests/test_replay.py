"""The dry run: ``luthien-control policy replay FILE --transaction ID``.

A real proxy records real transactions (streamed and buffered, chat completions and
Anthropic Messages) against the mock backend; the command replays each record through an
edited policy whose backend URL goes nowhere, so any backend call would fail the replay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter

NOWHERE = "http://127.0.0.1:9/v1"  # the discard port: nothing answers there
SHELL = [{"name": "shell", "arguments": json.dumps({"command": "rm -rf /"})}]


def tree(backend: str, *members: dict[str, Any], name: str = "recorded") -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": name,
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                *members,
            ],
        },
    }


DROP_SHELL = {
    "type": "ToolCallPolicy",
    "config": {"denied_tools": ["shell"], "action": "drop_call"},
}
BLOCK_SHELL = {"type": "ToolCallPolicy", "config": {"denied_tools": ["shell"]}}


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    """Records everything and controls nothing: the policy a team would start from."""
    return start_proxy(policy=tree(mock_backend.api_base))


def edited(tmp_path: Path, *members: dict[str, Any]) -> Path:
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(tree(NOWHERE, *members, name="edited")))
    return path


def chat(proxy: ProxyServer, *, stream: bool, **directives: str) -> str:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "clean up"}],
                "stream": stream,
            },
            headers={
                "Authorization": f"Bearer {CLIENT_KEY}",
                **{f"x-mock-{name}": quote(value) for name, value in directives.items()},
            },
        )
        response.read()
    assert response.status_code == 200
    transaction_id = response.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)  # recorded before it is replayed
    return transaction_id


def replay_json(proxy: ProxyServer, policy: Path, transaction_id: str) -> dict[str, Any]:
    result = proxy.cli("policy", "replay", str(policy), "--transaction", transaction_id, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def sse_data(body: str) -> list[Any]:
    events = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def test_a_recorded_stream_replayed_through_an_edited_policy_loses_the_denied_call(
    proxy: ProxyServer, tmp_path: Path
) -> None:
    transaction_id = chat(proxy, stream=True, **{"tool-calls": json.dumps(SHELL)})
    result = replay_json(proxy, edited(tmp_path, DROP_SHELL), transaction_id)

    assert result["status"] == 200
    assert ["content-type", "text/event-stream; charset=utf-8"] in result["headers"]
    assert result["body"].endswith("data: [DONE]\n\n")
    events = sse_data(result["body"])
    assert events and all(event["object"] == "chat.completion.chunk" for event in events)
    assert "tool_calls" not in result["body"]  # what the client would have read
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finish == ["stop"]
    record = result["record"]
    assert record["outcome"] == "ok" and record["policy_name"] == "edited"
    assert record["client_key_name"] == "e2e"
    assert [(d["policy"], d["action"], d["detail"]) for d in record["decisions"]] == [
        ("ToolCallPolicy", "dropped", "tool shell")
    ]
    # The backend's side is the recorded answer, event by event: the call was in it.
    original = proxy.record(transaction_id)
    received = record["response"]["received"]
    assert received["events"] == original["response"]["received"]["events"]
    call = received["stream"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "shell"


def test_the_same_stream_blocked_ends_with_the_dialects_error_event(
    proxy: ProxyServer, tmp_path: Path
) -> None:
    transaction_id = chat(proxy, stream=True, **{"tool-calls": json.dumps(SHELL)})
    result = replay_json(proxy, edited(tmp_path, BLOCK_SHELL), transaction_id)
    assert result["status"] == 200  # the stream had begun: the block is its last event
    last = sse_data(result["body"])[-1]
    assert last["error"]["code"] == "policy_blocked"
    assert "data: [DONE]" not in result["body"]
    assert result["record"]["outcome"] == "blocked"


def test_a_buffered_answer_replayed_is_refused_with_a_403(
    proxy: ProxyServer, tmp_path: Path
) -> None:
    transaction_id = chat(proxy, stream=False, **{"tool-calls": json.dumps(SHELL)})
    result = replay_json(proxy, edited(tmp_path, BLOCK_SHELL), transaction_id)
    assert result["status"] == 403
    error = json.loads(result["body"])["error"]
    assert error["code"] == "policy_blocked" and error["type"] == "permission_error"
    assert result["record"]["outcome"] == "blocked"


def test_the_readable_report_says_then_and_now(proxy: ProxyServer, tmp_path: Path) -> None:
    transaction_id = chat(proxy, stream=True, content="All clean.")
    policy = edited(tmp_path, DROP_SHELL)
    result = proxy.cli("policy", "replay", str(policy), "--transaction", transaction_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"replayed transaction {transaction_id} through SerialPolicy 'edited' ({policy}); "
        "no backend call"
    )
    assert lines[1].startswith("then: 200 ok (streamed, ")
    assert lines[2].startswith("now:  200 ok (streamed, ")
    assert lines[3:] == [
        "decisions: none",
        "the answer, as the client would read it:",
        "  [text] All clean.",
    ]


def test_a_messages_stream_is_replayed_with_its_named_events(
    proxy: ProxyServer, tmp_path: Path
) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/messages",
            json={
                "model": "claude-sonnet-4-5",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "clean up"}],
                "stream": True,
            },
            headers={"x-api-key": CLIENT_KEY, "x-mock-tool-calls": quote(json.dumps(SHELL))},
        )
        response.read()
    transaction_id = response.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)
    result = replay_json(proxy, edited(tmp_path, DROP_SHELL), transaction_id)
    assert result["status"] == 200
    body = result["body"]
    assert body.startswith("event: message_start\ndata: ")
    assert "tool_use" not in body
    stops = [e["delta"]["stop_reason"] for e in sse_data(body) if e["type"] == "message_delta"]
    assert stops == ["end_turn"]
    assert result["record"]["decisions"][0]["detail"] == "tool shell"


def test_a_request_that_never_reached_the_backend_has_no_answer_to_replay(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, tmp_path: Path
) -> None:
    refusing = tree(mock_backend.api_base)
    refusing["config"]["policies"].insert(1, BLOCK_SHELL)  # before the backend: requests
    blocking = start_proxy(policy=refusing)
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{blocking.api_base}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "user", "content": "go"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "shell", "arguments": "{}"},
                            }
                        ],
                    },
                ],
            },
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert response.status_code == 403
    transaction_id = response.headers["x-luthien-transaction-id"]
    blocking.record(transaction_id)
    result = replay_json(blocking, edited(tmp_path), transaction_id)
    assert result["status"] == 502
    error = json.loads(result["body"])["error"]
    assert error["message"] == (
        "the recorded transaction never reached the backend: the record holds no answer to replay"
    )


def test_an_unknown_transaction_is_one_line(proxy: ProxyServer, tmp_path: Path) -> None:
    result = proxy.cli("policy", "replay", str(edited(tmp_path)), "--transaction", "f" * 32)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"luthien-control: error: no transaction '{'f' * 32}'\n"
