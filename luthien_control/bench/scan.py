"""The leak scan's cost per chunk as a stream grows: issue 4 asks that it follow the new
text only, so that a 1 MB answer costs no more per chunk than a 1 KB one.

Measured in the bench's own process (the figure is about this project's code, so it is
not taken with ``--target``): the same 16-character deltas, a fifth of them ending in
``s`` (which could begin ``sk-``, so the scanner holds it back and releases it with the
next one), go through ``LeakedApiKeyDetection``'s stream transform and the dialect's
stream assembler, as 1,024 streams of 1 KB and as one stream of 1 MB: the same number of
chunks, CPU time per chunk compared. Once as chat completion chunks, once as the Messages
API's ``content_block_delta`` events (``text_delta``), each stream opened by its
``message_start`` and ``content_block_start`` (not timed: they are not chunks).

A 1 MB stream that has already cost ``BUDGET`` times what all the 1 KB streams cost
together is stopped there (a cost that grows with the stream would otherwise take
minutes): its figure is then over the chunks it passed, a lower bound, and the target
is not met.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from luthien_control.dialects import dialect_for
from luthien_control.policies.secrets import LeakedApiKeyDetection
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, Transaction

DELTA_CHARS = 16
SMALL_BYTES = 1024
LARGE_BYTES = 1024 * 1024
LIMIT = 1.25  # the 1 MB stream may cost at most this much per chunk, for timer noise
BUDGET = 4.0  # the 1 MB stream is stopped once it cost this much more than the 1 KB ones
CHECK_EVERY = 256  # chunks between two looks at the CPU time spent
PATHS = {"chat": "/chat/completions", "messages": "/messages"}

_MESSAGES_OPENING = (
    b"event: message_start\ndata: "
    + orjson.dumps(
        {
            "type": "message_start",
            "message": {
                "id": "msg_scan",
                "type": "message",
                "role": "assistant",
                "model": "claude-scan",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            },
        }
    )
    + b"\n\n",
    b"event: content_block_start\ndata: "
    + orjson.dumps(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    + b"\n\n",
)


def _text(number: int) -> str:
    return f"w{number:014d}" + ("s" if number % 5 == 0 else " ")


def _delta(number: int) -> bytes:
    """A chat completion chunk with one 16-character content delta."""
    data = {
        "id": "chatcmpl-scan",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": _text(number)}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _messages_delta(number: int) -> bytes:
    """A Messages API ``content_block_delta`` event with one 16-character ``text_delta``."""
    data = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": _text(number)},
    }
    return b"event: content_block_delta\ndata: " + orjson.dumps(data) + b"\n\n"


async def _streams(
    api: str, events: list[bytes], streams: int, per_stream: int, budget: float | None = None
) -> tuple[float, int]:
    """CPU seconds to pass ``streams`` streams of ``per_stream`` of ``events`` each, and
    the chunks passed: all of them, unless one stream spent more than ``budget`` seconds
    (then that stream is stopped there)."""
    policy = LeakedApiKeyDetection(LeakedApiKeyDetection.Config(), {})
    opening = _MESSAGES_OPENING if api == "messages" else ()
    spent = 0.0
    passed = 0
    for number in range(streams):
        request = ProxyRequest("POST", PATHS[api], b"", {}, b"{}")
        tx = Transaction(request=request, services=None)
        transform = policy.stream_transform(tx)
        assembler = tx.dialect.new_assembler()
        for raw in opening:
            for out in await transform.on_chunk(Chunk(raw)):
                assembler.feed(out.data)
        start = number * per_stream
        began = time.process_time()
        for position, raw in enumerate(events[start : start + per_stream], 1):
            for out in await transform.on_chunk(Chunk(raw)):
                assembler.feed(out.data)
            passed += 1
            if (
                budget is not None
                and position % CHECK_EVERY == 0
                and time.process_time() - began > budget
            ):
                break
        for out in await transform.on_end():
            assembler.feed(out.data)
        spent += time.process_time() - began
    return spent, passed


def measure_api(api: str) -> dict[str, Any]:
    """µs of CPU per chunk of ``api``'s streams: 1 KB streams, a 1 MB stream, the ratio."""
    assert dialect_for(PATHS[api]).name == api  # the scan runs the dialect it names
    per_small = SMALL_BYTES // DELTA_CHARS
    count = LARGE_BYTES // DELTA_CHARS
    make = _messages_delta if api == "messages" else _delta
    events = [make(number) for number in range(count)]
    small, _ = asyncio.run(_streams(api, events, count // per_small, per_small))
    large, passed = asyncio.run(_streams(api, events, 1, count, budget=BUDGET * small))
    small_us = small / count * 1e6
    large_us = large / passed * 1e6
    ratio = large_us / small_us if small_us else None
    return {
        "small_us_per_chunk": small_us,
        "large_us_per_chunk": large_us,
        "large_chunks_passed": passed,  # fewer than ``chunks``: stopped, a lower bound
        "ratio": ratio,
        "met": passed == count and ratio is not None and ratio <= LIMIT,
    }


def measure() -> dict[str, Any]:
    """µs of CPU per chunk for 1 KB streams and for a 1 MB stream, and their ratio: chat
    completions at the top level (as before), the Messages API under ``messages``."""
    chat = measure_api("chat")
    return {
        "chunks": LARGE_BYTES // DELTA_CHARS,
        "delta_chars": DELTA_CHARS,
        "small_stream_bytes": SMALL_BYTES,
        "large_stream_bytes": LARGE_BYTES,
        **chat,
        "limit": LIMIT,
        "messages": measure_api("messages"),
    }
