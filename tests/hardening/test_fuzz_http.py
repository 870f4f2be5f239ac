"""A seeded fuzzer over the proxy's HTTP surface: methods, paths, headers, encodings,
bodies, sizes and depths, written as raw bytes (what no HTTP library would send too).

Each request is built by ``fuzzed_request(seed, number)`` from a valid one, with one to
three mutations; the same seed and number always give the same bytes (a failure names
them, so that it can be replayed). ``make test`` sends a few hundred; ``LUTHIEN_SOAK=1``
ten thousand; ``LUTHIEN_SOAK_SEED`` changes the seed. Whatever comes in, the proxy
answers (a 4xx for what it refuses, in its error shape), never with a 5xx of its own,
records every request it forwards exactly once, and logs no traceback.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import random
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest

from luthien_control.server import api_path
from luthien_control.upstream.client import has_dot_segment
from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer
from tests.hardening.conftest import (
    MARKER,
    MAX_REQUEST_BYTES,
    SEED,
    Call,
    backend_markers,
    check_alive,
    check_calls,
    check_log,
    check_records,
    new_marker,
    raw_exchange,
    scaled,
)

REQUESTS = scaled(300, 10_000)
CONCURRENCY = 16

API_PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/models",
    "/v1/models/gpt-4o-mini",
    "/api/v1/chat/completions",
    "/v1/moderations",
    "/v1/files",
    "/v1/audio/transcriptions",
]
ODD_PATHS = [
    "/v1/../admin/api/keys",
    "/v1/%2e%2e/%2e%2e/etc/passwd",
    "/v1/chat/completions/..;/x",
    "/v1//chat//completions/",
    "/v1/chat/%63ompletions",
    "/v1/chat/completions%00",
    "/v1/chat/completions;x=1",
    "/v1/chat/completions?stream=true&x=%ff%fe",
    "/v1/%F0%9F%92%A9",
    "/v1/" + "a" * 4000,
    "/v1",
    "/v1/",
    "/V1/chat/completions",
    "/health",
    "/ready",
    "/metrics",
    "/admin/api/keys",
    "/",
    "*",
    "http://127.0.0.1/v1/chat/completions",
]
METHODS = ["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW"]
HOSTILE: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    -(2**64),
    1.5e308,
    -0.0,
    "",
    "\x00\x1b[2J\u202e\ud7ff",
    "é" * 1000,
    "sk-proj-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8Oo9Pp0",
    [],
    {},
    [[[]]],
    {"role": "tool"},
    "x" * 100_000,
]
JSON_TEXT_MUTATIONS = [
    b"NaN",
    b"Infinity",
    b"1e400",
    b'"\\ud800"',
    b'"\\u0000"',
    b"-0",
    b"123456789012345678901234567890",
    b'{"a":1,"a":2}',
    b"\xff\xfe",
    b"\xef\xbb\xbf{}",
    b"[" * 300 + b"]" * 300,
    b"{" * 3,
]


@dataclass
class Fuzzed:
    """One fuzzed request: its bytes and what was done to make it."""

    marker: str
    path: str = ""
    data: bytes = b""
    steps: list[str] = field(default_factory=list)
    head: bool = False

    def describe(self) -> str:
        return f"seed {SEED}, {self.marker}: " + "; ".join(self.steps)


def nested(depth: int, rng: random.Random) -> Any:
    """A value ``depth`` levels deep, built without recursion."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def base_body(path: str, marker: str, rng: random.Random) -> dict[str, Any]:
    stream = rng.random() < 0.4
    text = f"fuzz {marker}"
    if "responses" in path:
        return {"model": "gpt-4o-mini", "input": text, "stream": stream}
    if "messages" in path:
        messages = [{"role": "user", "content": text}]
        return {"model": "claude-x", "max_tokens": 16, "messages": messages, "stream": stream}
    if path.endswith("/completions") and "chat" not in path:
        return {"model": "gpt-4o-mini", "prompt": text, "stream": stream}
    if "embeddings" in path:
        return {"model": "text-embedding-3-small", "input": text}
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }


def containers(value: Any) -> list[Any]:
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


def mutate_value(body: dict[str, Any], rng: random.Random) -> str:
    """A value of the parsed body replaced, a key dropped or added."""
    target = rng.choice(containers(body))
    keys = list(target) if isinstance(target, dict) else list(range(len(target)))
    choice = rng.randrange(4)
    if choice == 0 and keys:
        key = rng.choice(keys)
        del target[key]
        return f"drop {key!r}"
    if choice == 1:
        depth = rng.choice([10, 100, 250, 254, 255, 260, 1000, 5000])
        replacement, label = nested(depth, rng), f"{depth} levels deep"
    else:
        replacement = copy.deepcopy(rng.choice(HOSTILE))
        label = repr(replacement)[:30]
    if isinstance(target, dict):
        key = rng.choice([*keys, "metadata", "extra"])
        target[key] = replacement
    else:
        key = rng.randrange(len(target) + 1)
        target.insert(key, replacement)
    return f"{key!r} = {label}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """The JSON text cut, flipped, spliced or grown."""
    choice = rng.randrange(5)
    if choice == 0 and data:
        at = rng.randrange(len(data))
        return f"truncate at {at}", data[:at]
    if choice == 1 and data:
        at = rng.randrange(len(data))
        byte = rng.choice([0, 0x22, 0x5C, 0x7B, 0x5D, 0xC3, 0xFF, rng.randrange(256)])
        return f"byte {at} = {byte:#x}", data[:at] + bytes([byte]) + data[at + 1 :]
    if choice == 2:
        junk = rng.choice(JSON_TEXT_MUTATIONS)
        at = data.rfind(b"}")
        if at > 0:
            return f"field = {junk[:20]!r}", data[:at] + b',"fuzz":' + junk + data[at:]
        return f"body = {junk[:20]!r}", junk
    if choice == 3:
        size = rng.choice([MAX_REQUEST_BYTES - 200, MAX_REQUEST_BYTES + 1, 3 * MAX_REQUEST_BYTES])
        at = data.rfind(b"}")
        padding = b',"pad":"' + b"p" * max(0, size - len(data)) + b'"'
        return f"grown to about {size} bytes", data[:at] + padding + data[at:] if at > 0 else data
    return "body replaced", rng.choice([b"", b"null", b"[]", b"\x00" * 64, rng.randbytes(200)])


def encode(data: bytes, rng: random.Random) -> tuple[str, bytes, list[tuple[str, str]]]:
    """A content encoding, well or badly applied."""
    choice = rng.randrange(8)
    if choice == 0:
        return "gzip", gzip.compress(data), [("content-encoding", "gzip")]
    if choice == 1:
        return "deflate", zlib.compress(data), [("content-encoding", "deflate")]
    if choice == 2:
        return (
            "gzip, gzip",
            gzip.compress(gzip.compress(data)),
            [("content-encoding", "gzip, gzip")],
        )
    if choice == 3:
        cut = gzip.compress(data)
        return "gzip cut short", cut[: len(cut) // 2], [("content-encoding", "gzip")]
    if choice == 4:
        return "gzip claimed, not applied", data, [("content-encoding", "gzip")]
    if choice == 5:
        bomb = gzip.compress(b"[" + b"0," * (4 * MAX_REQUEST_BYTES) + b"0]")
        return "a gzip bomb", bomb, [("content-encoding", "gzip")]
    if choice == 6:
        return "br claimed", data, [("content-encoding", "br")]
    return (
        "two gzip members",
        gzip.compress(data) + gzip.compress(b"{}"),
        [("content-encoding", "gzip")],
    )


def mutate_headers(headers: list[tuple[str, str]], rng: random.Random) -> str:
    choice = rng.randrange(9)
    if choice == 0:
        headers[:] = [h for h in headers if h[0] != "authorization"]
        return "no key"
    if choice == 1:
        key = rng.choice(
            ["Bearer wrong", "Bearer ", "Basic Zm9vOmJhcg==", f"bearer  {CLIENT_KEY} "]
        )
        headers[:] = [h for h in headers if h[0] != "authorization"] + [("authorization", key)]
        return f"authorization {key[:12]!r}"
    if choice == 2:
        kind = rng.choice(
            [
                "text/plain",
                "application/json; charset=utf-16",
                "multipart/form-data; boundary=x",
                "application/x-www-form-urlencoded",
                "",
            ]
        )
        headers[:] = [h for h in headers if h[0] != "content-type"] + [("content-type", kind)]
        return f"content-type {kind!r}"
    if choice == 3:
        size = rng.choice([1000, 8000, 60_000])
        headers.append(("x-big", "b" * size))
        return f"a header of {size} bytes"
    if choice == 4:
        count = rng.choice([50, 200])
        headers.extend((f"x-many-{n}", "v") for n in range(count))
        return f"{count} more headers"
    if choice == 5:
        headers.append(("x-latin", "caf\xe9 \x7f"))
        return "a latin-1 header value"
    if choice == 6:
        headers.append(("accept-encoding", rng.choice(["gzip", "br", "*", "identity;q=0"])))
        return "accept-encoding"
    if choice == 7:
        headers.append(("anthropic-version", "2023-06-01"))
        headers.append(("x-api-key", CLIENT_KEY))
        return "anthropic headers"
    headers.append(("expect", "100-continue"))
    return "expect: 100-continue"


def fuzzed_request(seed: int, number: int, prefix: str) -> Fuzzed:
    """The ``number``-th fuzzed request of ``seed``: deterministic."""
    rng = random.Random(seed * 1_000_003 + number)
    fuzzed = Fuzzed(f"{prefix}-{number}")
    path = rng.choice(API_PATHS) if rng.random() < 0.85 else rng.choice(ODD_PATHS)
    method = "POST" if rng.random() < 0.8 else rng.choice(METHODS)
    body = base_body(path, fuzzed.marker, rng)
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 2)):
            fuzzed.steps.append(mutate_value(body, rng))
    data = dumps(body, ascii_only=rng.random() < 0.3)
    if rng.random() < 0.3:
        step, data = mutate_bytes(data, rng)
        fuzzed.steps.append(step)
    headers = [
        ("host", "127.0.0.1"),
        ("authorization", f"Bearer {CLIENT_KEY}"),
        ("content-type", "application/json"),
        (MARKER, fuzzed.marker),
    ]
    if rng.random() < 0.2:
        step, data, extra = encode(data, rng)
        headers.extend(extra)
        fuzzed.steps.append(step)
    for _ in range(rng.choice([0, 0, 1, 2])):
        fuzzed.steps.append(mutate_headers(headers, rng))
    if method in ("GET", "HEAD", "DELETE", "OPTIONS") and rng.random() < 0.7:
        data = b""
    chunked = rng.random() < 0.1
    if chunked:
        pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        headers.append(("transfer-encoding", "chunked"))
        fuzzed.steps.append("chunked")
    else:
        payload = data
        headers.append(("content-length", str(len(data))))
    headers.append(("connection", "close"))
    fuzzed.steps.insert(0, f"{method} {path[:60]}")
    fuzzed.head = method == "HEAD"
    fuzzed.path = path
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    fuzzed.data = head.encode("latin-1") + b"\r\n" + payload
    return fuzzed


def dumps(body: Any, *, ascii_only: bool) -> bytes:
    """JSON text of any body: big integers, -0.0, and depths orjson does not write (the
    standard library's encoder, its recursion limit raised for the purpose)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 50_000))
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=ascii_only).encode()
    finally:
        sys.setrecursionlimit(limit)


@pytest.fixture
def proxy(hardening_proxy: ProxyServer) -> ProxyServer:
    return hardening_proxy


def recorded_path(fuzzed: Fuzzed) -> bool:
    """Whether the proxy records this request at all: an API path without a dot segment
    (outside the API, and for a path with one, the answer is not recorded; see
    docs/operations.md)."""
    relative = api_path(fuzzed.path.partition("?")[0])
    return relative is not None and not has_dot_segment(relative)


async def send(fuzzed: list[Fuzzed], port: int) -> list[Call]:
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Fuzzed) -> Call:
        async with semaphore:
            result = await raw_exchange(port, item.data, head=item.head)
        result.marker = item.marker
        return result

    return list(await asyncio.gather(*(one(item) for item in fuzzed)))


def test_fuzzed_requests(proxy: ProxyServer, hardening_mock: MockBackendServer) -> None:
    prefix = new_marker("fuzz")
    fuzzed = [fuzzed_request(SEED, number, prefix) for number in range(REQUESTS)]
    port = int(proxy.url.rsplit(":", 1)[1])
    calls = asyncio.run(send(fuzzed, port))
    by_marker = {item.marker: item for item in fuzzed}
    for c in calls:
        item = by_marker[c.marker]
        if c.ending == "refused" and len(item.data) > MAX_REQUEST_BYTES:
            continue  # answered (413) and closed before the rest was read: a reset
        assert c.status is not None and c.ending not in ("cut", "stuck"), (
            f"{item.describe()}: {c.describe()}"
        )
    # Answers the proxy does not record (outside the API, or a path it refuses unread)
    # come from the proxy alone: no 5xx at all. The others may carry a backend's own
    # 5xx, passed through, which their records must show (check_records).
    recorded = [c for c in calls if recorded_path(by_marker[c.marker])]
    check_calls([c for c in calls if not recorded_path(by_marker[c.marker])])
    check_calls(recorded, backend_statuses=range(500, 600))
    check_records(
        proxy.database_url,
        recorded,
        backend_markers(hardening_mock, prefix),
        prefix=prefix,
        describe=lambda c: f"{by_marker[c.marker].describe()}: {c.describe()}",
    )
    check_log(proxy)
    check_alive(proxy)
