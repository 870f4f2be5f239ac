"""The load generator: ``python -m luthien_control.bench.load [SPEC_JSON]``.

It runs in a process of its own, pinned to one core (``LoadSpec.cpus``), on uvloop with
one aiohttp session, and prints one JSON object on stdout: counts, errors, percentiles,
and its own CPU time, so that a saturated generator can be told from a slow target.

Two APIs (``LoadSpec.api``): OpenAI's chat completions (``/chat/completions``, content
deltas are the chunks, ``data: [DONE]`` the end) and Anthropic's Messages API
(``/messages``, ``content_block_delta`` events are the chunks, ``message_stop`` the end).

Every request is checked, not just timed: the status, the exact content the mock was
asked for, a stream that ends as its API ends one, and, for paced streams, a first
content delta that came long before the last one (a response collected and replayed is
an error).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

MODEL = "gpt-4o-mini"
MESSAGES_MODEL = "claude-sonnet-4-5"  # any claude-* name is one the mock serves
MESSAGES_MAX_TOKENS = 4096  # above the deltas of any scenario: the mock never cuts short
ANTHROPIC_VERSION = "2023-06-01"
APIS = ("chat", "messages")
PROMPT = "Benchmark: answer with the scripted words."
# A paced stream must spread its content over at least this share of its scripted length.
STREAMED_SHARE = 0.5
# Beyond the scripted run time: how long the process may take before it gives up.
GRACE = 30.0


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One measurement: who to call, with how many clients, for how long, and what to ask.

    ``duration`` 0 means each client makes exactly one request (the open-streams test);
    otherwise each client keeps starting requests until ``duration`` seconds after the
    start. Client ``i`` starts ``i * stagger / clients`` seconds after the start.
    ``api``: ``chat`` (chat completions) or ``messages`` (Anthropic's Messages API).
    """

    url: str
    key: str
    clients: int
    api: str = "chat"
    stream: bool = True
    duration: float = 0.0
    stagger: float = 0.0
    words: int = 64
    chunks: int = 64
    delay_ms: float = 0.0
    first_byte_delay_ms: float = 0.0  # the mock holds the whole answer back this long
    timeout: float = 60.0
    warmup: bool = True
    cpus: tuple[int, ...] | None = None

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        data = orjson.loads(text)
        cpus = data.pop("cpus", None)
        return cls(**data, cpus=tuple(cpus) if cpus is not None else None)

    @property
    def stream_seconds(self) -> float:
        """How long one paced stream takes at the mock."""
        return max(self.chunks - 1, 0) * self.delay_ms / 1000.0


def expected_content(words: int) -> str:
    """The text the mock answers to ``x-mock-words: N``."""
    return " ".join(f"word{i}" for i in range(words))


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """p50, p99 and max of ``values`` (seconds) in milliseconds, and the sample count."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)
    return {
        "p50": quantile(ordered, 0.50) * scale,
        "p99": quantile(ordered, 0.99) * scale,
        "max": ordered[-1] * scale,
        "n": len(ordered),
    }


def quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks of an already sorted list."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RequestFailed(Exception):
    """One request did not give the scripted answer; the message is the error's kind."""


@dataclass
class Tally:
    """What all clients observed, shared by the tasks of one process (one event loop)."""

    spec: LoadSpec
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    warmup_errors: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    chunks: int = 0
    opened: int = 0
    all_open_at: float | None = None
    first_closed_at: float | None = None
    last_end: float = 0.0

    def first_content(self, now: float) -> None:
        self.opened += 1
        if self.opened == self.spec.clients and self.all_open_at is None:
            self.all_open_at = now

    def closed(self, now: float) -> None:
        if self.first_closed_at is None:
            self.first_closed_at = now
        self.last_end = max(self.last_end, now)


class Client:
    """Requests of one kind against one URL, checked and timed into a ``Tally``."""

    def __init__(self, session: aiohttp.ClientSession, spec: LoadSpec, tally: Tally) -> None:
        self.session = session
        self.spec = spec
        self.tally = tally
        self.messages = spec.api == "messages"
        self.url = spec.url.rstrip("/") + api_path(spec.api)
        self.expected = expected_content(spec.words)
        self.headers = {
            **auth_headers(spec.api, spec.key),
            "Content-Type": "application/json",
            "x-mock-words": str(spec.words),
        }
        self.body = request_body(spec.api, stream=spec.stream)
        if spec.first_byte_delay_ms:
            self.headers["x-mock-first-byte-delay-ms"] = repr(spec.first_byte_delay_ms)
        if spec.stream:
            self.headers["x-mock-chunks"] = str(spec.chunks)
            if spec.delay_ms:
                self.headers["x-mock-delay-ms"] = repr(spec.delay_ms)
        self.warm_headers = {**self.headers, "x-mock-words": "1"}
        self.warm_headers.pop("x-mock-delay-ms", None)
        self.warm_headers.pop("x-mock-first-byte-delay-ms", None)
        self.warm_body = request_body(spec.api, stream=False)

    async def warm(self) -> None:
        """One small untimed request, so that the timed ones find an open connection."""
        try:
            async with self.session.post(
                self.url, data=self.warm_body, headers=self.warm_headers
            ) as response:
                await response.read()
                if response.status != 200:
                    self.tally.warmup_errors[f"HTTP {response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.warmup_errors[_error_kind(exc)] += 1

    async def run(self, start: float, offset: float) -> None:
        spec = self.spec
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        while True:
            await self.once()
            if spec.duration <= 0 or time.monotonic() >= start + spec.duration:
                return

    async def once(self) -> None:
        tally = self.tally
        try:
            if self.spec.stream:
                await self._stream()
            else:
                await self._request()
        except RequestFailed as exc:
            tally.errors[str(exc)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.errors[_error_kind(exc)] += 1
        else:
            tally.ok += 1
        tally.closed(time.monotonic())

    async def _request(self) -> None:
        started = time.monotonic()
        async with self.session.post(self.url, data=self.body, headers=self.headers) as response:
            raw = await response.read()
            status = response.status
        ended = time.monotonic()
        if status != 200:
            raise RequestFailed(f"HTTP {status}")
        content = answer_content(self.spec.api, raw)
        if content is None:
            raise RequestFailed("not a message" if self.messages else "not a chat completion")
        if content != self.expected:
            raise RequestFailed("wrong content")
        self.tally.latency.append(ended - started)

    async def _stream(self) -> None:
        tally = self.tally
        parts: list[str] = []
        times: list[float] = []
        first_byte: float | None = None
        done = False
        started = time.monotonic()
        async with self.session.post(self.url, data=self.body, headers=self.headers) as response:
            if response.status != 200:
                await response.read()
                raise RequestFailed(f"HTTP {response.status}")
            content = response.content
            buffer = b""
            while True:
                data = await content.readany()
                if not data:
                    break
                now = time.monotonic()
                if first_byte is None:
                    first_byte = now
                buffer = buffer + data if buffer else data
                if b"\r" in buffer:
                    buffer = buffer.replace(b"\r\n", b"\n")
                if b"\n\n" not in buffer:
                    continue
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue  # comments, event names, ids
                        payload = line[5:].strip()
                        if self.messages:
                            text, end = _messages_delta(payload)
                            done = done or end
                        elif payload == b"[DONE]":
                            done = True
                            continue
                        else:
                            text = _delta_content(payload)
                        if text:
                            if not times:
                                tally.first_content(now)
                            parts.append(text)
                            times.append(now)
        tally.chunks += len(times)
        if not done:
            raise RequestFailed(
                "stream ended without message_stop"
                if self.messages
                else "stream ended without [DONE]"
            )
        if "".join(parts) != self.expected:
            raise RequestFailed("wrong content")
        spec = self.spec
        if spec.delay_ms and times[-1] - times[0] < STREAMED_SHARE * spec.stream_seconds:
            raise RequestFailed("not streamed (content arrived at once)")
        assert first_byte is not None  # content arrived
        tally.ttfb.append(first_byte - started)
        tally.ttft.append(times[0] - started)
        tally.gaps.extend(b - a for a, b in itertools.pairwise(times))


def _delta_content(payload: bytes) -> str | None:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RequestFailed("malformed event") from None
    if not isinstance(event, dict):
        raise RequestFailed("malformed event")
    if "error" in event:
        raise RequestFailed("error event in the stream")
    choices = event.get("choices")
    if not choices:
        return None  # a usage chunk
    delta = choices[0].get("delta")
    if not isinstance(delta, dict):
        return None
    text = delta.get("content")
    return text if isinstance(text, str) else None


def _messages_delta(payload: bytes) -> tuple[str | None, bool]:
    """The text of a Messages stream event (a ``text_delta``), and whether it ends the
    stream (``message_stop``)."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RequestFailed("malformed event") from None
    if not isinstance(event, dict):
        raise RequestFailed("malformed event")
    kind = event.get("type")
    if kind == "content_block_delta":
        delta = event.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            text = delta.get("text")
            return (text if isinstance(text, str) else None), False
        return None, False
    if kind == "message_stop":
        return None, True
    if kind == "error" or "error" in event:
        raise RequestFailed("error event in the stream")
    return None, False


def api_path(api: str) -> str:
    """The endpoint of ``api``, below the base URL (which ends in ``/v1``)."""
    return "/messages" if api == "messages" else "/chat/completions"


def auth_headers(api: str, key: str) -> dict[str, str]:
    """The client key as each API's clients send it: Anthropic's in ``x-api-key``."""
    if api == "messages":
        return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    return {"Authorization": f"Bearer {key}"}


def request_body(api: str, *, stream: bool, prompt: str = PROMPT) -> bytes:
    """A minimal request of ``api``; the answer is scripted by ``x-mock-*`` headers."""
    messages = [{"role": "user", "content": prompt}]
    if api == "messages":
        return orjson.dumps(
            {
                "model": MESSAGES_MODEL,
                "max_tokens": MESSAGES_MAX_TOKENS,
                "messages": messages,
                "stream": stream,
            }
        )
    return orjson.dumps({"model": MODEL, "messages": messages, "stream": stream})


def answer_content(api: str, raw: bytes) -> str | None:
    """The text of a non-streamed answer (None: not an answer of ``api``)."""
    try:
        answer = orjson.loads(raw)
        if api == "messages":
            texts = [block["text"] for block in answer["content"] if block["type"] == "text"]
            return "".join(texts) if all(isinstance(t, str) for t in texts) else None
        content = answer["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


async def run(spec: LoadSpec) -> dict[str, Any]:
    """Run one measurement and return its figures (times in milliseconds)."""
    tally = Tally(spec)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=spec.timeout),
        # Like the SDKs: gzip is accepted, and undone when a server chooses to compress.
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    ) as session:
        clients = [Client(session, spec, tally) for _ in range(spec.clients)]
        if spec.warmup:
            await asyncio.gather(*(client.warm() for client in clients))
        cpu_before = os.times()
        start = time.monotonic()
        step = spec.stagger / spec.clients if spec.clients else 0.0
        await asyncio.gather(*(client.run(start, i * step) for i, client in enumerate(clients)))
        end = time.monotonic()
        cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    wall = end - start
    requests = tally.ok + sum(tally.errors.values())
    return {
        "requests": requests,
        "ok": tally.ok,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "warmup_errors": dict(tally.warmup_errors),
        "start": start,
        "end": end,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_share": cpu / wall if wall > 0 else 0.0,
        "requests_per_s": tally.ok / wall if wall > 0 else 0.0,
        "chunks": tally.chunks,
        "chunks_per_s": tally.chunks / wall if wall > 0 else 0.0,
        "ttft_ms": percentiles(tally.ttft),
        "ttfb_ms": percentiles(tally.ttfb),
        "gap_ms": percentiles(tally.gaps),
        "latency_ms": percentiles(tally.latency),
        "all_open_at": tally.all_open_at,
        "first_closed_at": tally.first_closed_at,
    }


def measure(spec: LoadSpec) -> dict[str, Any]:
    """One measurement on a fresh event loop and session, the collector kept out of it."""
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    limit = spec.stagger + spec.duration + spec.stream_seconds + spec.timeout + GRACE

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(run(spec), timeout=limit)

    import uvloop

    # A collection pause in the middle of a measurement would be charged to the server.
    gc.collect()
    gc.disable()
    try:
        result: dict[str, Any] = uvloop.run(bounded())
    finally:
        gc.enable()
        gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    """With a spec argument: one measurement. Without: one spec per line on stdin, one
    result per line on stdout, until stdin closes (saves a process start per measurement).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python -m luthien_control.bench.load [SPEC_JSON]", file=sys.stderr)
        return 2
    specs = args or sys.stdin
    for line in specs:
        if not line.strip():
            continue
        result = measure(LoadSpec.from_json(line))
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
