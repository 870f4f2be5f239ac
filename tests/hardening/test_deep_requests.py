"""What the fuzzer found at soak scale: a request nested deeper than orjson writes (255
levels; it reads 1024) that the proxy had to write again was a 500 of the proxy's own.

A streamed chat request gets ``stream_options`` added (so that the proxy learns the
usage), which makes the proxy serialize the body it read: ``orjson.dumps`` refused the
depth, and the client got ``internal_error``. Every depth orjson reads must go out, and
so must a stream event a policy changed (``jsontext.dumps``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest
from tests.conftest import MockBackendServer, ProxyServer
from tests.hardening.conftest import (
    async_client,
    backend_markers,
    call,
    check_alive,
    check_calls,
    check_log,
    check_records,
    new_marker,
)

# Around orjson's writing limit, and far below its reading one; deeper than about 990
# levels, a proxy whose policies read content refuses the body (400, "is nested too
# deeply": decoding.py's repeated-key check).
DEPTHS = [253, 254, 255, 300, 600]


def deep(depth: int) -> str:
    return '{"a":' * depth + '"x"' + "}" * depth


def body(marker: str, depth: int, *, stream: bool) -> bytes:
    return (
        '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + marker + '"}],'
        f'"stream":{str(stream).lower()},"metadata":{deep(depth)}}}'
    ).encode()


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_changed_body_is_written_at_any_depth_orjson_reads(depth: int) -> None:
    sent = body("m", depth, stream=True)
    request = ProxyRequest("POST", "/chat/completions", b"", {}, sent)
    payload = request.payload
    assert isinstance(payload, dict)
    payload["stream_options"] = {"include_usage": True}
    request.mark_changed()
    # Byte for byte what orjson writes where it can: the body, one member added.
    assert request.body == sent[:-1] + b',"stream_options":{"include_usage":true}}'


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_changed_event_is_written_at_any_depth_orjson_reads(depth: int) -> None:
    text = '{"choices":[],"metadata":' + deep(depth) + "}"
    chunk = Chunk(b"data: " + text.encode() + b"\n\n")
    chunk.data["choices"].append(0)
    chunk.mark_changed()
    assert chunk.raw == b"data: " + text.replace("[]", "[0]", 1).encode() + b"\n\n"


async def send(proxy: ProxyServer, plan: list[tuple[str, int, bool]]) -> list[Any]:
    url = f"{proxy.api_base}/chat/completions"
    async with async_client(len(plan)) as client:
        return list(
            await asyncio.gather(
                *(
                    call(
                        client,
                        url,
                        marker,
                        content=body(marker, depth, stream=stream),
                        headers={"content-type": "application/json"},
                    )
                    for marker, depth, stream in plan
                )
            )
        )


def test_deep_requests_are_forwarded_answered_and_recorded(
    hardening_proxy: ProxyServer, hardening_mock: MockBackendServer
) -> None:
    prefix = new_marker("deep")
    plan = [
        (f"{prefix}-{depth}-{stream}", depth, stream)
        for depth in DEPTHS
        for stream in (False, True)
    ]
    calls = asyncio.run(send(hardening_proxy, plan))
    check_calls(calls)
    for c, (_, _, stream) in zip(calls, plan, strict=True):
        assert (c.status, c.ending) == (200, "done" if stream else "answer"), c.describe()
    forwarded = backend_markers(hardening_mock, prefix)
    assert sorted(forwarded) == sorted(marker for marker, _, _ in plan)
    for marker, depth, stream in plan:
        received = hardening_mock.record(marker)
        assert received is not None
        sent = received["body"]
        level = sent["metadata"]
        for _ in range(depth - 1):
            level = level["a"]
        assert level == {"a": "x"}, marker
        assert ("stream_options" in sent) is stream
    rows = check_records(hardening_proxy.database_url, calls, forwarded, prefix=prefix)
    assert {row.outcome for row in rows if row.marker in forwarded} == {"ok"}
    check_log(hardening_proxy)
    check_alive(hardening_proxy)
