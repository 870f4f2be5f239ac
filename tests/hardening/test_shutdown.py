"""SIGTERM with live streams, through a real proxy process and the official SDKs.

Streams that end within the grace period (``SHUTDOWN_GRACE_SECONDS``) end normally and
are recorded ``ok``. Streams still running when it ends get their dialect's error event,
so that the SDK raises an API error instead of hanging on half an answer or reporting a
broken connection; each is recorded as cut by shutdown, and the log has no traceback.
The process exits with status 0 either way.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter
from tests.hardening.conftest import (
    CLIENT_BOUND,
    backend_markers,
    check_log,
    new_marker,
    proxy_policy,
    scaled,
    wait_recorded,
)

STREAMS = scaled(4, 100)  # per SDK and length
CHUNK_DELAY_MS = 250
GRACE = 5  # SHUTDOWN_GRACE_SECONDS (whole seconds)
SHORT = 4  # chunks: a stream that ends within the grace period (1 s)
LONG = 80  # one that would not (20 s)
CUT_BY_SHUTDOWN = "cut_by_shutdown"  # the outcome of a stream cut by shutdown


async def openai_stream(
    proxy: ProxyServer, marker: str, chunks: int, started: asyncio.Event
) -> tuple[str, BaseException | None]:
    """The text of one chat stream, and the error it ended with (None: it ended well)."""
    client = openai.AsyncOpenAI(
        base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0, timeout=CLIENT_BOUND
    )
    text = []
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": marker}],
            stream=True,
            extra_headers=directives(marker, chunks),
        )
        async for chunk in stream:
            started.set()
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
    except Exception as exc:
        return "".join(text), exc
    finally:
        await client.close()
    return "".join(text), None


async def anthropic_stream(
    proxy: ProxyServer, marker: str, chunks: int, started: asyncio.Event
) -> tuple[str, BaseException | None]:
    """The same on the Messages API."""
    client = anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=CLIENT_BOUND
    )
    text = []
    try:
        stream = await client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=64,
            messages=[{"role": "user", "content": marker}],
            stream=True,
            extra_headers=directives(marker, chunks),
        )
        async for event in stream:
            started.set()
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text.append(event.delta.text)
    except Exception as exc:
        return "".join(text), exc
    finally:
        await client.close()
    return "".join(text), None


def directives(marker: str, chunks: int) -> dict[str, str]:
    return {
        "x-mock-request-id": marker,
        "x-mock-words": str(chunks),
        "x-mock-chunks": str(chunks),
        "x-mock-delay-ms": str(CHUNK_DELAY_MS),
    }


Stream = Callable[
    [ProxyServer, str, int, asyncio.Event], Awaitable[tuple[str, BaseException | None]]
]


async def terminate_during_streams(
    proxy: ProxyServer, prefix: str
) -> list[tuple[Stream, str, int, tuple[str, BaseException | None]]]:
    """On each SDK, ``STREAMS`` streams that end within the grace period and as many that
    would not; SIGTERM once every one has its first event. Each stream's SDK, marker,
    length in chunks, and (text, error)."""
    assert proxy.server is not None and proxy.server.process is not None
    plan: list[tuple[Stream, str, int, asyncio.Event]] = [
        (kind, f"{prefix}-{kind.__name__}-{chunks}-{n}", chunks, asyncio.Event())
        for kind in (openai_stream, anthropic_stream)
        for chunks in (SHORT, LONG)
        for n in range(STREAMS)
    ]
    tasks = [
        asyncio.create_task(kind(proxy, marker, chunks, started))
        for kind, marker, chunks, started in plan
    ]
    async with asyncio.timeout(CLIENT_BOUND):
        await asyncio.gather(*(started.wait() for *_, started in plan))
    proxy.server.process.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*tasks)
    return [
        (kind, marker, chunks, result)
        for (kind, marker, chunks, _), result in zip(plan, results, strict=True)
    ]


def exit_status(proxy: ProxyServer) -> int:
    assert proxy.server is not None and proxy.server.process is not None
    return proxy.server.process.wait(timeout=CLIENT_BOUND + 30)


def stored(proxy: ProxyServer, mock: MockBackendServer, prefix: str) -> dict[str, Any]:
    """The rows of the streams by marker, once every forwarded one is recorded: the
    recorder writes what is queued before the process exits."""
    forwarded = backend_markers(mock, prefix)
    assert len(forwarded) == 4 * STREAMS
    rows, _, missing_markers = wait_recorded(proxy.database_url, [], forwarded)
    assert not missing_markers, f"never recorded: {sorted(missing_markers)[:5]}"
    mine = [row for row in rows if row.marker and row.marker.startswith(prefix)]
    assert len(mine) == len({row.marker for row in mine}) == 4 * STREAMS
    return {row.marker: row for row in mine}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigterm_with_live_streams(
    start_proxy: ProxyStarter,
    hardening_mock: MockBackendServer,
    database: str,
    request: pytest.FixtureRequest,
) -> None:
    """On both databases: the soak's 200 cut streams were lost on SQLite about one
    shutdown in two, the recorder's writer cancelled in the middle of an insert that
    waited for the lock (``recording.DatabaseRecorder.stop``)."""
    database_url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    proxy = start_proxy(
        policy=proxy_policy(hardening_mock.api_base),
        env={"SHUTDOWN_GRACE_SECONDS": str(GRACE)},
        database_url=database_url,
    )
    prefix = new_marker("sigterm")
    results = asyncio.run(terminate_during_streams(proxy, prefix))
    assert exit_status(proxy) == 0
    rows = stored(proxy, hardening_mock, prefix)
    for kind, marker, chunks, (text, error) in results:
        if chunks == SHORT:  # ended within the grace period: whole
            assert error is None, f"{marker}: {error!r}"
            assert text == " ".join(f"word{n}" for n in range(SHORT)), marker
            assert (rows[marker].status, rows[marker].outcome) == (200, "ok"), marker
            continue
        # Cut by shutdown: the SDK raises an API error (it read the error event), not a
        # broken connection, and the record says why it ended.
        api_error = openai.APIError if kind is openai_stream else anthropic.APIError
        connection_error = (
            openai.APIConnectionError if kind is openai_stream else anthropic.APIConnectionError
        )
        assert isinstance(error, api_error), f"{marker}: {error!r}"
        assert not isinstance(error, connection_error), f"{marker}: {error!r}"
        assert rows[marker].outcome == CUT_BY_SHUTDOWN, marker
    check_log(proxy)
