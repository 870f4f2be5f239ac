"""The leak scan's cost per chunk as a stream grows: issue 4 asks that it follow the new
text only, so that a 1 MB answer costs no more per chunk than a 1 KB one.

Measured in the bench's own process (the figure is about this project's code, so it is
not taken with ``--target``): the same 16-character deltas, a fifth of them ending in
``s`` (which could begin ``sk-``, so the scanner holds it back and releases it with the
next one), go through ``LeakedApiKeyDetection``'s stream transform and the relay's
assembler, as 1,024 streams of 1 KB and as one stream of 1 MB: the same number of
chunks, CPU time per chunk compared.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from luthien_control.dialects.chat import ChatAssembler
from luthien_control.policies.secrets import LeakedApiKeyDetection
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, Transaction

DELTA_CHARS = 16
SMALL_BYTES = 1024
LARGE_BYTES = 1024 * 1024
LIMIT = 1.25  # the 1 MB stream may cost at most this much per chunk, for timer noise


def _delta(number: int) -> bytes:
    text = f"w{number:014d}" + ("s" if number % 5 == 0 else " ")
    data = {
        "id": "chatcmpl-scan",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _streams(events: list[bytes], streams: int, per_stream: int) -> float:
    """CPU seconds to pass ``streams`` streams of ``per_stream`` of ``events`` each."""
    policy = LeakedApiKeyDetection(LeakedApiKeyDetection.Config(), {})
    spent = 0.0
    for number in range(streams):
        request = ProxyRequest("POST", "/chat/completions", b"", {}, b"{}")
        transform = policy.stream_transform(Transaction(request=request, services=None))
        assembler = ChatAssembler()
        start = number * per_stream
        began = time.process_time()
        for raw in events[start : start + per_stream]:
            for out in await transform.on_chunk(Chunk(raw)):
                assembler.feed(out.data)
        for out in await transform.on_end():
            assembler.feed(out.data)
        spent += time.process_time() - began
    return spent


def measure() -> dict[str, Any]:
    """µs of CPU per chunk for 1 KB streams and for a 1 MB stream, and their ratio."""
    per_small = SMALL_BYTES // DELTA_CHARS
    count = LARGE_BYTES // DELTA_CHARS
    events = [_delta(number) for number in range(count)]
    small_streams = count // per_small
    small = asyncio.run(_streams(events, small_streams, per_small))
    large = asyncio.run(_streams(events, 1, count))
    small_us = small / count * 1e6
    large_us = large / count * 1e6
    ratio = large_us / small_us if small_us else None
    return {
        "chunks": count,
        "delta_chars": DELTA_CHARS,
        "small_stream_bytes": SMALL_BYTES,
        "large_stream_bytes": LARGE_BYTES,
        "small_us_per_chunk": small_us,
        "large_us_per_chunk": large_us,
        "ratio": ratio,
        "limit": LIMIT,
        "met": ratio is not None and ratio <= LIMIT,
    }
