"""ToolCallPolicy on the Responses API, over real sockets: the mock backend scripts
``function_call`` output items, a real proxy checks them, and the official ``openai`` SDK
(and raw httpx, for the wire bytes) reads what comes out.
"""

from __future__ import annotations

import json
import time
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
# Allowed by name, refused by argument_patterns ("/etc/"), wherever the arguments are cut.
READ_ETC: dict[str, Any] = {"name": "read_file", "arguments": {"path": "/etc/shadow-copy.txt"}}


def sdk(proxy: ProxyServer) -> OpenAI:
    return OpenAI(base_url=proxy.api_base, api_key=proxy.key, max_retries=0, timeout=30)


@pytest.fixture
def blocking_sdk(blocking_proxy: ProxyServer) -> Iterator[OpenAI]:
    with sdk(blocking_proxy) as client:
        yield client


@pytest.fixture
def dropping_sdk(dropping_proxy: ProxyServer) -> Iterator[OpenAI]:
    with sdk(dropping_proxy) as client:
        yield client


class Received:
    """What a client builds from the SDK's typed events: the items by output_index (their
    arguments from the deltas), the text, and the final event."""

    def __init__(self, stream: openai.Stream[Any]) -> None:
        self.transaction_id = stream.response.headers["x-luthien-transaction-id"]
        self.events = list(stream)
        self.items: dict[int, dict[str, Any]] = {}
        self.text = ""
        for event in self.events:
            if event.type == "response.output_item.added":
                assert event.output_index not in self.items
                self.items[event.output_index] = event.item.to_dict()
            elif event.type == "response.function_call_arguments.delta":
                self.items[event.output_index]["arguments"] += event.delta
            elif event.type == "response.output_text.delta":
                self.text += event.delta

    @property
    def calls(self) -> list[tuple[str, str, str]]:
        return [
            (item["call_id"], item["name"], item["arguments"])
            for _, item in sorted(self.items.items())
            if item["type"] == "function_call"
        ]

    @property
    def last(self) -> Any:
        return self.events[-1]


def stream_through(client: OpenAI, headers: dict[str, str]) -> Received:
    stream = client.responses.create(
        model=MODEL, input="Tidy up the server.", stream=True, extra_headers=headers
    )
    with stream:
        return Received(stream)


def raw_stream(base: str, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{base}/responses",
            json={"model": MODEL, "input": "Tidy up the server.", "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers},
        )
    return response


def events_of(body: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    """Each event's bytes and its data, as a raw SSE reader sees them."""
    out = []
    for block in body.split(b"\n\n"):
        if not block.strip():
            continue
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        assert len(data) == 1, block
        out.append((block + b"\n\n", json.loads(data[0])))
    return out


def record_of(proxy: ProxyServer, transaction_id: str) -> dict[str, Any]:
    """The stored record (written in the background: polled, within a bound)."""
    deadline = time.monotonic() + 10
    while True:
        result = proxy.cli("logs", "--transaction", transaction_id, "--json")
        if result.returncode == 0:
            record: dict[str, Any] = json.loads(result.stdout)
            return record
        assert "no transaction" in result.stderr, result.stderr
        assert time.monotonic() < deadline, f"transaction {transaction_id} never recorded"
        time.sleep(0.1)


def decisions_of(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(d["policy"], d["action"], d["detail"]) for d in record["decisions"]]


# --- the mock speaks it -----------------------------------------------------------------


def test_mock_backend_streams_function_call_items_the_sdk_parses(
    mock_backend: MockBackendServer,
) -> None:
    with OpenAI(base_url=mock_backend.api_base, api_key="x", max_retries=0, timeout=30) as client:
        stream = client.responses.create(
            model=MODEL,
            input="hi",
            stream=True,
            extra_headers=scripted(READ, SHELL, chunk_size=7, content="Two calls."),
        )
        with stream:
            events = list(stream)
        with client.responses.stream(
            model=MODEL, input="hi", extra_headers=scripted(READ, chunk_size=3)
        ) as helper:
            final = helper.get_final_response()
        plain = client.responses.create(model=MODEL, input="hi", extra_headers=scripted(READ))
    kinds = [event.type for event in events]
    assert kinds.count("response.output_item.added") == 3
    assert kinds.count("response.function_call_arguments.done") == 2
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    read_deltas = [e.delta for e in deltas if e.item_id == "fc_mock_0"]
    assert all(e.output_index in (1, 2) for e in deltas)
    assert all(len(delta) <= 7 for delta in read_deltas)
    assert "".join(read_deltas) == compact(READ["arguments"])
    added = next(
        e for e in events if e.type == "response.output_item.added" and e.output_index == 1
    )
    assert added.item.type == "function_call" and added.item.arguments == ""
    assert added.item.status == "in_progress"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert [item.type for item in completed.response.output] == [
        "message",
        "function_call",
        "function_call",
    ]
    for response in (final, plain):
        call = response.output[0]
        assert call.type == "function_call"
        assert (call.id, call.call_id, call.name, call.status) == (
            "fc_mock_0",
            "call_mock_0",
            "read_file",
            "completed",
        )
        assert call.arguments == compact(READ["arguments"])


# --- allowed calls ----------------------------------------------------------------------


def test_allowed_call_arrives_intact(blocking_sdk: OpenAI) -> None:
    got = stream_through(blocking_sdk, scripted(READ, chunk_size=3, content="Reading it."))
    assert got.text == "Reading it."
    assert got.calls == [("call_mock_0", "read_file", compact(READ["arguments"]))]
    assert got.last.type == "response.completed"
    output = got.last.response.output
    assert [(item.type, getattr(item, "name", None)) for item in output] == [
        ("message", None),
        ("function_call", "read_file"),
    ]


def test_allowed_call_with_the_sdk_stream_helper(blocking_sdk: OpenAI) -> None:
    with blocking_sdk.responses.stream(
        model=MODEL, input="hi", extra_headers=scripted(READ, dict(READ, name="list_dir"))
    ) as stream:
        final = stream.get_final_response()
    assert [(item.type, getattr(item, "name", None)) for item in final.output] == [
        ("function_call", "read_file"),
        ("function_call", "list_dir"),
    ]


def test_allowed_call_events_are_the_backend_s_own(
    blocking_proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    headers = scripted(READ, dict(READ, name="list_dir"), chunk_size=4, content="Both.")
    through_proxy = raw_stream(blocking_proxy.api_base, headers)
    direct = raw_stream(mock_backend.api_base, headers)

    def call_events(response: httpx.Response) -> list[bytes]:
        """The function_call items' events, byte for byte (they carry no random ids)."""
        assert response.status_code == 200
        return [
            raw
            for raw, data in events_of(response.content)
            if "function_call" in data["type"]
            or data.get("item", {}).get("type") == "function_call"
        ]

    assert call_events(through_proxy) == call_events(direct)
    assert len(call_events(direct)) > 8


# --- blocked calls ----------------------------------------------------------------------


def test_denied_call_ends_the_stream_with_response_failed(
    blocking_sdk: OpenAI, blocking_proxy: ProxyServer
) -> None:
    got = stream_through(blocking_sdk, scripted(READ, SHELL, chunk_size=4, content="On it."))
    assert got.last.type == "response.failed"
    assert got.last.response.status == "failed"
    assert got.last.response.error.code == "policy_blocked"
    message = got.last.response.error.message
    assert "denied_tools" in message and "shell" not in message
    assert "response.completed" not in [event.type for event in got.events]
    assert got.text == "On it."  # the text before the calls did stream
    assert [name for _, name, _ in got.calls] == ["read_file"]  # released before it
    record = record_of(blocking_proxy, got.transaction_id)
    assert record["outcome"] == "blocked"
    assert decisions_of(record) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_denied_call_bytes_never_reach_the_wire(
    blocking_proxy: ProxyServer, chunk_size: int
) -> None:
    response = raw_stream(
        blocking_proxy.api_base, scripted(SHELL, chunk_size=chunk_size, content="Ok.")
    )
    assert response.status_code == 200
    body = response.content
    assert SECRET_PATH.encode() not in body and b"rm -rf" not in body
    assert b"function_call" not in body and b"fc_mock_0" not in body  # no event of the call
    events = events_of(body)
    assert [data["type"] for _, data in events][-1] == "response.failed"
    assert events[-1][1]["response"]["error"]["code"] == "policy_blocked"
    assert "response.completed" not in [data["type"] for _, data in events]


def test_denied_call_non_streamed_is_a_403(
    blocking_sdk: OpenAI, blocking_proxy: ProxyServer
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        blocking_sdk.responses.create(model=MODEL, input="hi", extra_headers=scripted(SHELL))
    assert caught.value.status_code == 403 and SECRET_PATH not in caught.value.message
    assert SECRET_PATH.encode() not in caught.value.response.content
    transaction_id = caught.value.response.headers["x-luthien-transaction-id"]
    record = record_of(blocking_proxy, transaction_id)
    assert decisions_of(record) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5])
def test_argument_pattern_blocks_the_call_however_it_is_split(
    blocking_proxy: ProxyServer, chunk_size: int
) -> None:
    response = raw_stream(blocking_proxy.api_base, scripted(READ_ETC, chunk_size=chunk_size))
    body = response.content
    assert b"/etc/" not in body and b"shadow" not in body and b"fc_mock_0" not in body
    last = events_of(body)[-1][1]
    assert last["type"] == "response.failed"
    assert "argument_patterns[0]" in last["response"]["error"]["message"]


def test_denied_call_in_the_input_is_refused(
    blocking_sdk: OpenAI, mock_backend: MockBackendServer
) -> None:
    request_id = uuid.uuid4().hex
    history: list[Any] = [
        {"role": "user", "content": "Show me the users."},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "read_file",
            "arguments": '{"path": "/etc/passwd"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "root:x:0:0"},
    ]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        blocking_sdk.responses.create(
            model=MODEL, input=history, extra_headers={"x-mock-request-id": request_id}
        )
    assert "in the request" in caught.value.message
    assert mock_backend.record(request_id) is None  # never sent on


# --- dropped calls ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_drop_call_removes_it_from_the_events_and_the_completed_response(
    dropping_sdk: OpenAI, dropping_proxy: ProxyServer, chunk_size: int
) -> None:
    got = stream_through(
        dropping_sdk, scripted(SHELL, READ, chunk_size=chunk_size, content="Cleaning.")
    )
    assert got.text == "Cleaning."
    assert got.calls == [("call_mock_1", "read_file", compact(READ["arguments"]))]
    assert sorted(got.items) == [0, 1]  # renumbered: no gap where the shell call was
    assert [event.sequence_number for event in got.events] == list(range(len(got.events)))
    assert got.last.type == "response.completed"
    output = got.last.response.output
    assert [(item.type, getattr(item, "name", None)) for item in output] == [
        ("message", None),
        ("function_call", "read_file"),
    ]
    assert all(getattr(item, "name", None) != "shell" for item in got.items.values())
    record = record_of(dropping_proxy, got.transaction_id)
    assert record["outcome"] == "ok"
    assert decisions_of(record) == [("ToolCallPolicy", "dropped", "tool shell")]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5])
def test_drop_call_on_an_argument_pattern_however_it_is_split(
    dropping_proxy: ProxyServer, chunk_size: int
) -> None:
    headers = scripted(READ_ETC, READ, chunk_size=chunk_size)
    body = raw_stream(dropping_proxy.api_base, headers).content
    assert b"/etc/" not in body and b"shadow" not in body and b"fc_mock_0" not in body
    events = [data for _, data in events_of(body)]
    assert events[-1]["type"] == "response.completed"
    assert [item["call_id"] for item in events[-1]["response"]["output"]] == ["call_mock_1"]
    arguments = "".join(
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    )
    assert arguments == compact(READ["arguments"])


def test_drop_call_with_the_sdk_stream_helper(dropping_sdk: OpenAI) -> None:
    with dropping_sdk.responses.stream(
        model=MODEL, input="hi", extra_headers=scripted(READ, SHELL, READ, chunk_size=6)
    ) as stream:
        final = stream.get_final_response()
    assert [(item.call_id, item.name) for item in final.output if item.type == "function_call"] == [
        ("call_mock_0", "read_file"),
        ("call_mock_2", "read_file"),
    ]


def test_drop_call_non_streamed(dropping_sdk: OpenAI, dropping_proxy: ProxyServer) -> None:
    raw = dropping_sdk.responses.with_raw_response.create(
        model=MODEL, input="hi", extra_headers=scripted(SHELL, READ, content="Done.")
    )
    response = raw.parse()
    assert response.output_text == "Done."
    assert [(item.type, getattr(item, "name", None)) for item in response.output] == [
        ("message", None),
        ("function_call", "read_file"),
    ]
    assert SECRET_PATH not in raw.http_response.text
    record = record_of(dropping_proxy, raw.headers["x-luthien-transaction-id"])
    assert decisions_of(record) == [("ToolCallPolicy", "dropped", "tool shell")]


def test_drop_call_cleans_the_input(dropping_sdk: OpenAI, mock_backend: MockBackendServer) -> None:
    request_id = uuid.uuid4().hex
    first: dict[str, Any] = {"role": "user", "content": "Tidy up."}
    last: dict[str, Any] = {"role": "user", "content": "And now?"}
    history: list[Any] = [
        first,
        {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a b c"},
        last,
    ]
    response = dropping_sdk.responses.create(
        model=MODEL,
        input=history,
        extra_headers={"x-mock-request-id": request_id, "x-mock-content": "ok"},
    )
    assert response.output_text == "ok"
    record = mock_backend.record(request_id)
    assert record is not None
    assert record["body"]["input"] == [first, last]
