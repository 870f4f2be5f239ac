"""ToolCallPolicy over real sockets: the mock backend scripts tool calls, a real proxy
checks them, and the official ``openai`` SDK (and raw httpx, for the wire bytes) reads
what comes out. What the client received is checked, then the transaction record.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, compact, scripted

MODEL = "gpt-4o-mini"
SECRET_PATH = "/srv/payroll/secret-ledger.db"  # only ever in the denied call's arguments
SHELL: dict[str, Any] = {"name": "shell", "arguments": {"command": f"rm -rf {SECRET_PATH}"}}
READ: dict[str, Any] = {"name": "read_file", "arguments": {"path": "/tmp/notes.txt", "lines": 10}}
MESSAGES: list[Any] = [{"role": "user", "content": "Tidy up the server."}]


@pytest.fixture
def blocking_sdk(blocking_proxy: ProxyServer) -> Iterator[OpenAI]:
    with OpenAI(
        base_url=blocking_proxy.api_base, api_key=blocking_proxy.key, max_retries=0, timeout=30
    ) as client:
        yield client


@pytest.fixture
def dropping_sdk(dropping_proxy: ProxyServer) -> Iterator[OpenAI]:
    with OpenAI(
        base_url=dropping_proxy.api_base, api_key=dropping_proxy.key, max_retries=0, timeout=30
    ) as client:
        yield client


class Accumulated:
    """What a client builds from the SDK's chunks: text, calls by index, finish_reason."""

    def __init__(self) -> None:
        self.content = ""
        self.calls: dict[int, dict[str, str]] = {}
        self.finish_reason: str | None = None
        self.transaction_id = ""

    def read(self, stream: openai.Stream[Any]) -> None:
        self.transaction_id = stream.response.headers["x-luthien-transaction-id"]
        for chunk in stream:
            for choice in chunk.choices:
                self.content += choice.delta.content or ""
                for call in choice.delta.tool_calls or []:
                    entry = self.calls.setdefault(
                        call.index, {"id": "", "name": "", "arguments": ""}
                    )
                    entry["id"] += call.id or ""
                    if call.function is not None:
                        entry["name"] += call.function.name or ""
                        entry["arguments"] += call.function.arguments or ""
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason


def stream_through(client: OpenAI, headers: dict[str, str], into: Accumulated) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=headers
    )
    with stream:
        into.read(stream)


def raw_stream(proxy: ProxyServer, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers},
        )
    return response


def decisions_of(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(d["policy"], d["action"], d["detail"]) for d in record["decisions"]]


# --- allowed calls ----------------------------------------------------------------------


def test_allowed_call_arrives_intact(blocking_sdk: OpenAI) -> None:
    got = Accumulated()
    stream_through(blocking_sdk, scripted(READ, chunk_size=3, content="Reading it."), got)
    assert got.content == "Reading it."
    assert got.calls == {
        0: {"id": "call_mock_0", "name": "read_file", "arguments": compact(READ["arguments"])}
    }
    assert got.finish_reason == "tool_calls"


def test_allowed_call_events_are_the_backend_s_own(
    blocking_proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    headers = scripted(READ, dict(READ, name="list_dir"), chunk_size=4)
    through_proxy = raw_stream(blocking_proxy, headers)
    with httpx.Client(timeout=30) as client:
        direct = client.post(
            f"{mock_backend.api_base}/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "stream": True},
            headers=headers,
        )

    def choices(response: httpx.Response) -> list[Any]:
        events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(event)["choices"] for event in events[:-1]]

    assert through_proxy.status_code == 200
    assert choices(through_proxy) == choices(direct)


def test_allowed_call_non_streamed(blocking_sdk: OpenAI) -> None:
    completion = blocking_sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers=scripted(READ)
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls if c.type == "function"] == [
        ("read_file", compact(READ["arguments"]))
    ]


# --- blocked calls ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_denied_call_ends_the_stream_with_an_error(
    blocking_sdk: OpenAI, blocking_proxy: ProxyServer, chunk_size: int
) -> None:
    got = Accumulated()
    with pytest.raises(openai.APIError) as caught:
        stream_through(
            blocking_sdk, scripted(READ, SHELL, chunk_size=chunk_size, content="On it."), got
        )
    assert not isinstance(caught.value, openai.APIConnectionError)
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "policy_blocked"
    assert "denied_tools" in caught.value.message and "shell" not in caught.value.message
    assert got.content == "On it."  # the text before the calls did stream
    assert [call["name"] for call in got.calls.values()] == ["read_file"]  # released before
    record = blocking_proxy.record(got.transaction_id)
    assert record["outcome"] == "blocked"
    assert decisions_of(record) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_denied_call_bytes_never_reach_the_wire(
    blocking_proxy: ProxyServer, chunk_size: int
) -> None:
    response = raw_stream(blocking_proxy, scripted(SHELL, chunk_size=chunk_size, content="Ok."))
    assert response.status_code == 200
    body = response.content
    assert SECRET_PATH.encode() not in body and b"rm -rf" not in body
    assert b'"tool_calls"' not in body and b"call_mock_0" not in body
    assert b"data: [DONE]" not in body
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ") and json.loads(last[6:])["error"]["code"] == "policy_blocked"


def test_denied_call_non_streamed_is_a_403(
    blocking_sdk: OpenAI, blocking_proxy: ProxyServer
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        blocking_sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=scripted(SHELL)
        )
    assert caught.value.status_code == 403 and SECRET_PATH not in caught.value.message
    transaction_id = caught.value.response.headers["x-luthien-transaction-id"]
    record = blocking_proxy.record(transaction_id)
    assert decisions_of(record) == [("ToolCallPolicy", "blocked", "tool shell")]


def test_denied_call_in_the_history_is_refused(
    blocking_sdk: OpenAI, mock_backend: MockBackendServer
) -> None:
    request_id = uuid.uuid4().hex
    history: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "/etc/passwd"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "root:x:0:0"},
    ]
    with pytest.raises(openai.PermissionDeniedError):
        blocking_sdk.chat.completions.create(
            model=MODEL, messages=history, extra_headers={"x-mock-request-id": request_id}
        )
    assert mock_backend.record(request_id) is None  # never sent on


# --- dropped calls ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_drop_call_leaves_the_other_call_renumbered(
    dropping_sdk: OpenAI, dropping_proxy: ProxyServer, chunk_size: int
) -> None:
    got = Accumulated()
    stream_through(dropping_sdk, scripted(SHELL, READ, chunk_size=chunk_size), got)
    assert got.calls == {
        0: {"id": "call_mock_1", "name": "read_file", "arguments": compact(READ["arguments"])}
    }
    assert got.finish_reason == "tool_calls"
    record = dropping_proxy.record(got.transaction_id)
    assert record["outcome"] == "ok"
    assert decisions_of(record) == [("ToolCallPolicy", "dropped", "tool shell")]


def test_drop_call_of_the_only_call_finishes_with_stop(dropping_sdk: OpenAI) -> None:
    got = Accumulated()
    stream_through(dropping_sdk, scripted(SHELL, content="Cleaning up now."), got)
    assert got.content == "Cleaning up now."
    assert got.calls == {}
    assert got.finish_reason == "stop"


def test_drop_call_with_the_sdk_stream_helper(dropping_sdk: OpenAI) -> None:
    with dropping_sdk.chat.completions.stream(
        model=MODEL, messages=MESSAGES, extra_headers=scripted(READ, SHELL, READ, chunk_size=6)
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name) for c in calls if c.type == "function"] == [
        ("call_mock_0", "read_file"),
        ("call_mock_2", "read_file"),
    ]
    assert choice.finish_reason == "tool_calls"


def test_drop_call_non_streamed(dropping_sdk: OpenAI) -> None:
    completion = dropping_sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers=scripted(SHELL, content="Done.")
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls is None and choice.message.content == "Done."
    assert choice.finish_reason == "stop"


def test_drop_call_cleans_the_history(
    dropping_sdk: OpenAI, mock_backend: MockBackendServer
) -> None:
    request_id = uuid.uuid4().hex
    history: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "shell", "arguments": '{"command": "ls"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a b c"},
        {"role": "user", "content": "And now?"},
    ]
    completion = dropping_sdk.chat.completions.create(
        model=MODEL,
        messages=history,
        extra_headers={"x-mock-request-id": request_id, "x-mock-content": "ok"},
    )
    assert completion.choices[0].message.content == "ok"
    record = mock_backend.record(request_id)
    assert record is not None
    assert record["body"]["messages"] == [*MESSAGES, {"role": "user", "content": "And now?"}]
