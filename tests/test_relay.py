"""The relay's record of a stream: as the backend sent it, and as the client got it.

The two are one assembler while every event goes out as it came in, and split at the
first event a policy changes, drops or adds; these tests hold the split to that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from luthien_control.exceptions import PolicyBlocked
from luthien_control.policies.secrets import LeakedApiKeyDetection
from luthien_control.relay import relay_stream
from luthien_control.sse import Chunk
from luthien_control.transaction import (
    UNREAD,
    ProxyRequest,
    ProxyResponse,
    ResponseStream,
    Transaction,
)

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def event(content: str | None = None, *, finish: str | None = None, usage: Any = ...) -> bytes:
    data: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "delta": {} if content is None else {"content": content},
                "finish_reason": finish,
            }
        ],
    }
    if usage is not ...:
        data["usage"] = usage
    return b"data: " + orjson.dumps(data) + b"\n\n"


USAGE_ONLY = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":1,"total_tokens":3}}\n\n'


class Upper:
    """Upper-cases the content of the events whose content is in ``targets``; drops
    those in ``dropped``; raises on ``fail``."""

    def __init__(
        self,
        targets: frozenset[str] = frozenset(),
        dropped: frozenset[str] = frozenset(),
        fail: str = "",
    ) -> None:
        self.targets, self.dropped, self.fail = targets, dropped, fail

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        delta = chunk.data["choices"][0]["delta"] if chunk.data.get("choices") else {}
        content = delta.get("content")
        if content == self.fail:
            raise PolicyBlocked("no", policy="Upper")
        if content in self.dropped:
            return []
        if content in self.targets:
            delta["content"] = content.upper()
            chunk.mark_changed()
            _ = chunk.raw  # serialized already: the relay still sees the change
        return [chunk]

    async def on_end(self) -> list[Chunk]:
        return []


def transaction(path: str = "/chat/completions") -> Transaction:
    return Transaction(ProxyRequest("POST", path, b"", {}, BODY), services=None)


async def relay(
    events: list[bytes],
    *transforms: Any,
    hide_usage: bool = False,
    tx: Transaction | None = None,
) -> tuple[Transaction, bytes]:
    """Relay ``events`` (one network read each) through ``transforms`` (a transform, or
    a factory taking the transaction); returns the transaction and the bytes sent."""

    async def source() -> AsyncIterator[bytes]:
        for piece in events:
            yield piece

    sent = bytearray()

    async def send(message: dict[str, Any]) -> None:
        sent.extend(message.get("body", b""))

    tx = tx or transaction()
    tx.usage_injected = hide_usage
    stream = ResponseStream(source())
    for transform in transforms:
        stream.transforms.append(transform(tx) if callable(transform) else transform)
    tx.response = ProxyResponse(200, {"content-type": "text/event-stream"}, stream=stream)
    await relay_stream(tx, send, dev=False)
    return tx, bytes(sent)


def summary(tx: Transaction) -> tuple[tuple[int, str], tuple[int, str]]:
    received, sent = tx.trail.stream_received, tx.trail.stream_sent
    assert received is not None and sent is not None
    return (
        (received.chunks, received.choices[0].text if received.choices else ""),
        (sent.chunks, sent.choices[0].text if sent.choices else ""),
    )


STREAM = [event("one "), event("two "), event("three"), event(finish="stop"), b"data: [DONE]\n\n"]


@pytest.mark.anyio
async def test_a_stream_no_policy_changed_is_one_record_of_both_sides() -> None:
    tx, wire = await relay(STREAM, Upper())
    assert wire == b"".join(STREAM)
    assert tx.trail.stream_sent is tx.trail.stream_received
    assert summary(tx) == ((4, "one two three"), (4, "one two three"))


@pytest.mark.anyio
async def test_a_changed_event_splits_the_two_sides_from_that_event_on() -> None:
    tx, wire = await relay(STREAM, Upper(targets=frozenset({"two "})))
    assert b'"TWO "' in wire and b'"two "' not in wire
    assert summary(tx) == ((4, "one two three"), (4, "one TWO three"))


@pytest.mark.anyio
async def test_a_dropped_event_is_received_but_not_sent() -> None:
    tx, _ = await relay(STREAM, Upper(dropped=frozenset({"one "})))
    assert summary(tx) == ((4, "one two three"), (3, "two three"))


@pytest.mark.anyio
async def test_a_split_inside_one_network_read_keeps_the_events_before_it() -> None:
    tx, _ = await relay([b"".join(STREAM)], Upper(targets=frozenset({"three"})))
    assert summary(tx) == ((4, "one two three"), (4, "one two THREE"))


@pytest.mark.anyio
async def test_the_usage_the_client_did_not_ask_for_is_received_only() -> None:
    with_usage = [
        event("one ", usage=None),
        event("two", usage=None),
        event(finish="stop", usage=None),
        USAGE_ONLY,
        b"data: [DONE]\n\n",
    ]
    tx, wire = await relay(with_usage, Upper(), hide_usage=True)
    assert b"usage" not in wire
    received, sent = tx.trail.stream_received, tx.trail.stream_sent
    assert received is not None and sent is not None
    assert (received.chunks, received.usage) == (4, {"prompt_tokens": 1, "total_tokens": 3})
    assert (sent.chunks, sent.usage, sent.choices[0].text) == (3, None, "one two")
    assert tx.usage is not None and tx.usage.total_tokens == 3


@pytest.mark.anyio
async def test_usage_under_an_escaped_key_is_read_and_hidden_all_the_same() -> None:
    """``"us\\u0061ge"`` is ``"usage"`` to every JSON reader: its figures are recorded,
    and a client that did not ask for usage does not get it (the usage-only chunk
    with no choices included)."""
    escaped = [
        piece.replace(b'"usage"', b'"us\\u0061ge"')
        for piece in (event("one ", usage=None), event(finish="stop", usage=None), USAGE_ONLY)
    ]
    tx, wire = await relay([*escaped, b"data: [DONE]\n\n"], Upper(), hide_usage=True)
    assert b"us\\u0061ge" not in wire and b"usage" not in wire
    assert wire.count(b"data: ") == 3  # two chunks and [DONE]: the usage-only one dropped
    assert tx.usage is not None and tx.usage.total_tokens == 3


def as_recorded(tx: Transaction) -> list[Any]:
    """The events as the record reads them: the relay's parse, or their bytes again."""
    raws, parsed = tx.trail.events_received, tx.trail.events_parsed
    assert raws is not None and parsed is not None and len(parsed) == len(raws)
    return [
        Chunk(raw).data if value is UNREAD else value
        for raw, value in zip(raws, parsed, strict=True)
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("hide_usage", [False, True])
async def test_the_record_reads_each_event_as_its_bytes_spell_it(hide_usage: bool) -> None:
    """The relay hands the record its parse of each event, save those a policy changed:
    those are parsed again from their bytes."""
    events = [
        event("one ", usage=None),
        event("two ", usage=None),
        event("three", usage=None),
        event(finish="stop", usage=None),
        USAGE_ONLY,
        b"data: [DONE]\n\n",
    ]
    tx, _ = await relay(events, Upper(targets=frozenset({"two "})), hide_usage=hide_usage)
    parsed = tx.trail.events_parsed
    assert parsed is not None
    assert as_recorded(tx) == [Chunk(raw).data for raw in events[:-1]]
    # The usage book strips the usage it asked for on a copy: only the changed event is
    # parsed again.
    assert {i for i, value in enumerate(parsed) if value is UNREAD} == {1}


@pytest.mark.anyio
async def test_the_event_a_policy_failed_on_is_received_and_not_sent() -> None:
    tx, wire = await relay(STREAM, Upper(fail="three"))
    assert wire.endswith(b"\n\n") and b"policy_blocked" in wire and b"[DONE]" not in wire
    assert tx.outcome == "blocked"
    assert summary(tx) == ((3, "one two three"), (2, "one two "))


@pytest.mark.anyio
async def test_the_relay_lets_go_of_its_transforms_when_the_stream_ends() -> None:
    # A transform that keeps the transaction (as every recording one does) would make a
    # reference cycle through it: the transaction could then be freed only by the
    # collector, which the proxy runs rarely.
    tx, _ = await relay(STREAM, Upper())
    assert tx.response is not None and tx.response.stream is not None
    assert tx.response.stream.transforms == []


class Slow(Upper):
    """A judge-like transform: waits on "three" (its network call) until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        if chunk.data.get("choices") and chunk.data["choices"][0]["delta"] == {"content": "three"}:
            self.waiting.set()
            await asyncio.sleep(3600)
        return [chunk]


@pytest.mark.anyio
@pytest.mark.parametrize("one_read", [True, False], ids=["one read", "a read each"])
async def test_a_disconnect_during_a_policy_records_what_came_and_what_went(
    one_read: bool,
) -> None:
    slow, tx = Slow(), transaction()
    task = asyncio.create_task(relay([b"".join(STREAM)] if one_read else STREAM, slow, tx=tx))
    await slow.waiting.wait()
    # The client went away: server.py notes it on the transaction, then cancels the
    # handler (a cancel with no such note is the shutdown's: see test_shutdown.py).
    tx.outcome = "client_disconnected"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Nothing of the cut read went out; everything that came in is in the record.
    sent = (0, "") if one_read else (2, "one two ")
    assert summary(tx) == ((3, "one two three"), sent)


def responses_event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def response(number: int, **fields: Any) -> dict[str, Any]:
    body = {"id": "resp_1", "object": "response", "status": "in_progress", "output": [], **fields}
    return {"sequence_number": number, "response": body}


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["redact", "block"])
async def test_response_failed_is_built_from_what_the_client_got(action: str) -> None:
    # The backend's stream ends without a terminal event (BackendBroken) after an event
    # whose response object holds a key: redacted, or refused with the event.
    events = [
        responses_event("response.created", response(0)),
        responses_event("response.in_progress", response(1, instructions=f"use {KEY}")),
    ]
    policy = LeakedApiKeyDetection(LeakedApiKeyDetection.Config(action=action), {})
    tx, wire = await relay(events, policy.stream_transform, tx=transaction("/responses"))
    assert KEY.encode() not in wire
    failed = orjson.loads(wire.rsplit(b"data: ", 1)[1])
    assert failed["type"] == "response.failed"
    assert failed["sequence_number"] == (2 if action == "redact" else 1)
    received = tx.trail.stream_received
    assert received is not None and received.response is not None
    assert received.response["instructions"] == f"use {KEY}"  # the record: as it came


class AsText(str):
    """A str subclass, as a policy earlier in the chain might put into a chunk."""


class Subclassing(Upper):
    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        delta = chunk.data["choices"][0]["delta"]
        if "content" in delta:
            delta["content"] = AsText(delta["content"])
            chunk.mark_changed()
        return [chunk]


@pytest.mark.anyio
async def test_text_a_policy_made_a_str_subclass_is_still_scanned() -> None:
    policy = LeakedApiKeyDetection(LeakedApiKeyDetection.Config(action="redact"), {})
    events = [event(f"here: {KEY} ok"), event(finish="stop"), b"data: [DONE]\n\n"]
    _, wire = await relay(events, Subclassing(), policy.stream_transform)
    assert KEY.encode() not in wire and b"[REDACTED]" in wire
