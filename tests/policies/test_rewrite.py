"""IncrementIntegers: every integer plus one, across chunk boundaries."""

from __future__ import annotations

import orjson
import pytest

from luthien_control.policies.rewrite import IncrementIntegers
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, ProxyResponse, Transaction


def chunk(content: str | None = None, finish: str | None = None) -> Chunk:
    delta = {} if content is None else {"content": content}
    data = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return Chunk(b"data: " + orjson.dumps(data) + b"\n\n")


def content(chunks: list[Chunk]) -> str:
    return "".join(
        orjson.loads(c.raw[6:-2])["choices"][0]["delta"].get("content") or "" for c in chunks
    )


def tx_for(payload: object) -> Transaction:
    return Transaction(
        request=ProxyRequest("POST", "/chat/completions", b"", {}, orjson.dumps(payload)),
        services=None,
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "pieces",
    [
        ["I have 12", "34 apples"],
        ["I have 1", "2", "3", "4 apples"],
        ["I have ", "1234 apples"],
        ["I have 1234", " apples"],
    ],
)
async def test_number_split_across_chunks_is_incremented_once(pieces: list[str]) -> None:
    policy = IncrementIntegers(IncrementIntegers.Config(), {})
    transform = policy.stream_transform(tx_for({}))
    out = []
    for piece in pieces:
        out.extend(await transform.on_chunk(chunk(piece)))
    out.extend(await transform.on_chunk(chunk(finish="stop")))
    out.extend(await transform.on_end())
    assert content(out) == "I have 1235 apples"


@pytest.mark.anyio
async def test_number_at_the_end_of_the_stream_is_flushed() -> None:
    transform = IncrementIntegers(IncrementIntegers.Config(), {}).stream_transform(tx_for({}))
    out = await transform.on_chunk(chunk("count: -1"))
    out += await transform.on_end()
    assert content(out) == "count: 0"


@pytest.mark.anyio
async def test_request_and_buffered_response() -> None:
    policy = IncrementIntegers(IncrementIntegers.Config(), {})
    tx = tx_for({"model": "m", "messages": [{"role": "user", "content": "2 and 40"}]})
    await policy.apply(tx)
    assert orjson.loads(tx.request.body)["messages"][0]["content"] == "3 and 41"
    tx.response = ProxyResponse(
        200, {}, orjson.dumps({"choices": [{"message": {"content": "9 lives"}}]})
    )
    await policy.apply(tx)
    assert orjson.loads(tx.response.body)["choices"][0]["message"]["content"] == "10 lives"
