"""Secrets the client reads whole though no one string holds them: a key split across the
parts of a message (``TextSlot.joins``), and the keys the proxy itself sent the backend,
whatever their shape (literal secrets of the transaction: ``sent_keys``)."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import orjson
import pytest

from luthien_control.exceptions import PolicyBlocked
from luthien_control.policies.audit_log import TransactionContextLoggingPolicy
from luthien_control.policies.backend import backend_keys
from luthien_control.policies.secrets import LeakedApiKeyDetection
from luthien_control.recording import Redactor, build_record
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, ProxyResponse, Transaction
from tests.policies.conftest import through

KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
FIRST, SECOND = "my key is " + KEY[:14], KEY[14:] + " ok"
BACKEND_KEY = "plain-backend-key-7f3a"  # no pattern's shape
PATHS = {"chat": "/chat/completions", "responses": "/responses", "messages": "/messages"}


def policy(action: str = "block") -> LeakedApiKeyDetection:
    config = {"action": action}
    return LeakedApiKeyDetection(LeakedApiKeyDetection.Config(**config), config)  # type: ignore[arg-type]


def tx_for(dialect: str, payload: Any = None, **backend_headers: str) -> Transaction:
    body = orjson.dumps(payload if payload is not None else {"model": "m"})
    tx = Transaction(request=ProxyRequest("POST", PATHS[dialect], b"", {}, body), services=None)
    tx.backend_headers.update(backend_headers)
    return tx


def parts(dialect: str, first: str, second: str) -> list[dict[str, Any]]:
    kind = {"chat": "text", "responses": "input_text", "messages": "text"}[dialect]
    return [{"type": kind, "text": first}, {"type": kind, "text": second}]


def request_with(dialect: str, content: Any) -> dict[str, Any]:
    if dialect == "responses":
        return {"model": "m", "input": [{"role": "user", "content": content}]}
    return {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": content}]}


def texts(content: list[dict[str, Any]]) -> list[str]:
    return [part["text"] for part in content]


# --- requests and buffered answers ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", sorted(PATHS))
@pytest.mark.parametrize("cut", [3, 14, 30])  # in the prefix, in the body, near the end
async def test_a_key_split_across_the_parts_of_a_request_is_blocked(dialect: str, cut: int) -> None:
    tx = tx_for(dialect, request_with(dialect, parts(dialect, "key " + KEY[:cut], KEY[cut:])))
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)
    assert [d.detail for d in tx.decisions] == ["openai_api_key in the request"]


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", sorted(PATHS))
async def test_a_key_split_across_parts_is_redacted_in_the_parts_that_hold_it(
    dialect: str,
) -> None:
    tx = tx_for(dialect, request_with(dialect, parts(dialect, FIRST, SECOND)))
    await policy("redact").apply(tx)
    sent = orjson.loads(tx.request.body)
    message = sent["input" if dialect == "responses" else "messages"][0]
    assert texts(message["content"]) == ["my key is [REDACTED]", " ok"]
    assert [d.action for d in tx.decisions] == ["redacted"]


@pytest.mark.anyio
async def test_parts_of_different_messages_are_not_joined() -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": FIRST}]},
            {"role": "user", "content": [{"type": "text", "text": SECOND}]},
        ],
    }
    tx = tx_for("chat", payload)
    await policy().apply(tx)  # two messages, each read on its own: no key in either
    assert tx.decisions == []


def answer(dialect: str, first: str, second: str) -> dict[str, Any]:
    if dialect == "chat":
        content = [{"type": "text", "text": first}, {"type": "text", "text": second}]
        message = {"role": "assistant", "content": content}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    if dialect == "responses":  # two message items: the SDK's output_text joins them
        return {
            "output": [
                {"type": "message", "content": [{"type": "output_text", "text": first}]},
                {"type": "reasoning", "summary": []},
                {"type": "message", "content": [{"type": "output_text", "text": second}]},
            ]
        }
    blocks = [{"type": "text", "text": first}, {"type": "text", "text": second}]
    return {"type": "message", "content": blocks}


def answer_texts(dialect: str, payload: dict[str, Any]) -> list[str]:
    if dialect == "chat":
        return texts(payload["choices"][0]["message"]["content"])
    if dialect == "responses":
        items = [item for item in payload["output"] if item["type"] == "message"]
        return [part["text"] for item in items for part in item["content"]]
    return texts(payload["content"])


def with_answer(tx: Transaction, payload: Any) -> Transaction:
    tx.response = ProxyResponse(200, {}, orjson.dumps(payload))
    return tx


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", sorted(PATHS))
async def test_a_key_split_across_the_parts_of_an_answer(dialect: str) -> None:
    tx = with_answer(tx_for(dialect), answer(dialect, FIRST, SECOND))
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)
    tx = with_answer(tx_for(dialect), answer(dialect, FIRST, SECOND))
    await policy("redact").apply(tx)
    assert tx.response is not None
    got = answer_texts(dialect, orjson.loads(tx.response.body))
    assert got == ["my key is [REDACTED]", " ok"]


# --- streams: the held text of a part carries over to the next ------------------------------


def sse(event: dict[str, Any]) -> Chunk:
    """An event as the backend sends it (its own bytes, parsed on demand)."""
    return Chunk(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")


def messages_stream(*blocks: list[str]) -> list[Chunk]:
    events: list[dict[str, Any]] = [{"type": "message_start", "message": {"content": []}}]
    for index, deltas in enumerate(blocks):
        block = {"type": "text", "text": ""}
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        for text in deltas:
            delta = {"type": "text_delta", "text": text}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    events += [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}}]
    events += [{"type": "message_stop"}]
    return [sse(event) for event in events]


def block_texts(chunks: list[Chunk]) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        data = chunk.data
        if data["type"] == "content_block_start":
            out[data["index"]] = data["content_block"]["text"]
        elif data["type"] == "content_block_delta":
            out[data["index"]] += data["delta"]["text"]
    return out


async def stream(
    p: LeakedApiKeyDetection, tx: Transaction, chunks: list[Chunk]
) -> tuple[list[Chunk], BaseException | None]:
    """What went out, up to a block (then also the block)."""
    transform = p.stream_transform(tx)
    out: list[Chunk] = []
    try:
        for chunk in chunks:
            out.extend(await transform.on_chunk(chunk))
        out.extend(await transform.on_end())
    except PolicyBlocked as exc:
        return out, exc
    return out, None


@pytest.mark.anyio
async def test_a_key_split_across_two_text_blocks_is_blocked_before_either_half_is_out() -> None:
    out, blocked = await stream(policy(), tx_for("messages"), messages_stream([FIRST], [SECOND]))
    assert blocked is not None
    sent = b"".join(chunk.raw for chunk in out)
    assert KEY[:14].encode() not in sent and b"content_block_stop" in sent  # block 0 ended


@pytest.mark.anyio
async def test_a_key_split_across_two_text_blocks_is_redacted_in_the_second() -> None:
    tx = tx_for("messages")
    out, blocked = await stream(policy("redact"), tx, messages_stream([FIRST], [SECOND]))
    assert blocked is None
    assert block_texts(out) == {0: "my key is ", 1: "[REDACTED] ok"}
    types = [chunk.data["type"] for chunk in out]
    assert types == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.anyio
async def test_a_held_tail_with_no_next_part_ends_its_own_part() -> None:
    """The text held at the end of the last block is no key: it goes out as the end of
    that block, before its stop, and the events that waited follow in order."""
    tail = "see sk-proj-A1b2"
    out, blocked = await stream(policy("redact"), tx_for("messages"), messages_stream([tail]))
    assert blocked is None
    assert block_texts(out) == {0: tail}
    types = [chunk.data["type"] for chunk in out]
    assert types[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def responses_stream(*items: list[list[str]]) -> list[Chunk]:
    events: list[dict[str, Any]] = []
    for index, item_parts in enumerate(items):
        item = {"type": "message", "content": []}
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        done_parts = []
        for position, deltas in enumerate(item_parts):
            place = {"output_index": index, "content_index": position}
            part = {"type": "output_text", "text": ""}
            events.append({"type": "response.content_part.added", **place, "part": part})
            for text in deltas:
                events.append({"type": "response.output_text.delta", **place, "delta": text})
            whole = "".join(deltas)
            events.append({"type": "response.output_text.done", **place, "text": whole})
            part = {"type": "output_text", "text": whole}
            events.append({"type": "response.content_part.done", **place, "part": part})
            done_parts.append(part)
        item = {"type": "message", "content": done_parts}
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    output = [event["item"] for event in events if event["type"] == "response.output_item.done"]
    events.append({"type": "response.completed", "response": {"output": output}})
    return [sse(event) for event in events]


@pytest.mark.anyio
@pytest.mark.parametrize("items", [False, True], ids=["parts", "items"])
async def test_responses_output_text_split_across_parts_or_items(items: bool) -> None:
    chunks = (
        responses_stream([[FIRST]], [[SECOND]]) if items else responses_stream([[FIRST], [SECOND]])
    )
    _, blocked = await stream(policy(), tx_for("responses"), chunks)
    assert blocked is not None
    chunks = (
        responses_stream([[FIRST]], [[SECOND]]) if items else responses_stream([[FIRST], [SECOND]])
    )
    out, blocked = await stream(policy("redact"), tx_for("responses"), chunks)
    assert blocked is None
    sent = b"".join(chunk.raw for chunk in out)
    assert KEY[:14].encode() not in sent and KEY[14:].encode() not in sent
    deltas = "".join(c.data["delta"] for c in out if c.data["type"].endswith("text.delta"))
    assert deltas == "my key is [REDACTED] ok"
    completed = out[-1].data["response"]["output"]
    joined = "".join(part["text"] for item in completed for part in item["content"])
    assert joined == "my key is [REDACTED] ok"  # what the SDK's output_text says
    dones = [c.data["text"] for c in out if c.data["type"] == "response.output_text.done"]
    assert dones == ["my key is ", "[REDACTED] ok"]  # each part's end says what it sent


@pytest.mark.anyio
async def test_chat_content_parts_in_a_stream_are_one_text() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> Chunk:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return Chunk.from_data({"id": "c", "choices": [choice]})

    chunks = [
        chunk({"content": [{"type": "text", "text": FIRST}]}),
        chunk({"content": [{"type": "text", "text": SECOND}]}),
        chunk({}, "stop"),
    ]
    out = await through(policy("redact").stream_transform(tx_for("chat")), chunks)
    contents = [c.data["choices"][0]["delta"].get("content") for c in out]
    assert contents == ["my key is ", "[REDACTED] ok", None]  # rewritten, as the API's string


# --- the keys the proxy itself sent --------------------------------------------------------


def test_backend_keys_are_every_form_the_proxy_sent() -> None:
    tx = tx_for("chat", authorization=f"Bearer {BACKEND_KEY}")
    keys = backend_keys(tx, "http://us%40er:p%40ss-word-1@backend.test/v1")
    basic = base64.b64encode(b"us@er:p@ss-word-1").decode().rstrip("=")
    assert set(keys) == {BACKEND_KEY, "p%40ss-word-1", "p@ss-word-1", basic}


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", sorted(PATHS))
async def test_an_answer_quoting_the_backend_key_is_caught_buffered(dialect: str) -> None:
    header = {"x-api-key": BACKEND_KEY} if dialect == "messages" else {}
    headers = header or {"authorization": f"Bearer {BACKEND_KEY}"}
    tx = with_answer(tx_for(dialect, **headers), answer(dialect, "your key: ", BACKEND_KEY))
    with pytest.raises(PolicyBlocked) as caught:
        await policy().apply(tx)
    assert BACKEND_KEY not in caught.value.message
    tx = with_answer(
        tx_for(dialect, **headers), answer(dialect, "your key: " + BACKEND_KEY[:5], BACKEND_KEY[5:])
    )
    await policy("redact").apply(tx)
    assert tx.response is not None
    assert BACKEND_KEY[5:] not in tx.response.body.decode()
    assert [d.detail for d in tx.decisions] == ["backend_key in the response"]


@pytest.mark.anyio
async def test_an_answer_quoting_the_backend_key_is_caught_streamed_split() -> None:
    chunks = messages_stream(["key: " + BACKEND_KEY[:4], BACKEND_KEY[4:11], BACKEND_KEY[11:] + "."])
    out, blocked = await stream(
        policy("redact"), tx_for("messages", **{"x-api-key": BACKEND_KEY}), chunks
    )
    assert blocked is None
    assert block_texts(out) == {0: "key: [REDACTED]."}
    chunks = messages_stream(["key: " + BACKEND_KEY[:4], BACKEND_KEY[4:11], BACKEND_KEY[11:] + "."])
    _, blocked = await stream(policy(), tx_for("messages", **{"x-api-key": BACKEND_KEY}), chunks)
    assert blocked is not None


@pytest.mark.anyio
async def test_without_a_backend_key_the_policy_scans_with_its_own_patterns() -> None:
    tx = with_answer(tx_for("chat"), answer("chat", "text ", BACKEND_KEY))
    p = policy()
    assert p.transaction_secrets(tx) is p.secrets  # the common path: nothing compiled
    await p.apply(tx)
    assert tx.decisions == []


# --- the record and the log -----------------------------------------------------------------


def test_the_record_holds_neither_half_nor_the_backend_key() -> None:
    body = orjson.dumps(request_with("messages", parts("messages", FIRST, SECOND)))
    tx = tx_for("messages", **{"x-api-key": BACKEND_KEY})
    tx.request = ProxyRequest("POST", "/messages", b"", {}, body)
    tx.trail.request_body = body
    tx.trail.backend_status = 200
    tx.trail.backend_headers = {}
    tx.trail.backend_body = orjson.dumps(
        answer("messages", "key " + BACKEND_KEY[:6], BACKEND_KEY[6:])
    )
    record = build_record(tx, Redactor())
    text = record["request"] + record["response"]
    for needle in (KEY[:14], KEY[14:], BACKEND_KEY[:6], BACKEND_KEY[6:]):
        assert needle not in text
    received = json.loads(record["request"])["received"]["body"]
    assert texts(received["messages"][0]["content"]) == ["my key is [REDACTED]", " ok"]


@pytest.mark.anyio
async def test_the_log_holds_neither_half(caplog: pytest.LogCaptureFixture) -> None:
    tx = tx_for("responses", request_with("responses", parts("responses", FIRST, SECOND)))
    logging_policy = TransactionContextLoggingPolicy(TransactionContextLoggingPolicy.Config(), {})
    with caplog.at_level(logging.INFO, logger="luthien_control.policies.transaction_log"):
        await logging_policy.apply(tx)
        with_answer(tx, answer("responses", "k " + BACKEND_KEY[:3], BACKEND_KEY[3:]))
        tx.backend_headers["authorization"] = f"Bearer {BACKEND_KEY}"
        await logging_policy.apply(tx)
    assert "[REDACTED]" in caplog.text
    for needle in (KEY[:14], KEY[14:], BACKEND_KEY[3:]):
        assert needle not in caplog.text
