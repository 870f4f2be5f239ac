"""What the recorder's queue holds: built rows, never transactions, within bounds in
rows and in bytes (``RECORDER_BACKLOG``, ``RECORDER_BACKLOG_BYTES``).

A queued transaction kept everything its request had touched alive until the writer got
to it: the parsed bodies, the stream's assemblers and the backend stream with its last
network read, about 30 KB per streamed transaction; under load the writer fell behind
by thousands of them (docs/performance.md). Memory is measured by
``luthien-control bench``; these tests check the bounds themselves.
"""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from luthien_control import metrics, recording
from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.db.search import PROMPT_HEAD_CHARS, PROMPT_TAIL_CHARS
from luthien_control.recording import ROW_OVERHEAD, DatabaseRecorder, Redactor, row_size
from luthien_control.transaction import ProxyRequest, ProxyResponse, ResponseStream, Transaction

MB = 1024 * 1024


def answered(content: str = "hi") -> Transaction:
    """A chat transaction as the edge hands it to the recorder: answered 200."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})
    request = ProxyRequest("POST", "/chat/completions", b"", {}, body.encode())
    tx = Transaction(request=request, services=None)
    tx.trail.request_body = body.encode()
    tx.status, tx.outcome = 200, "ok"
    tx.timings.end = tx.timings.start + 0.002
    return tx


def recorder(tmp_path: Path, **bounds: int) -> DatabaseRecorder:
    """A recorder that is never started: what it queues stays queued."""
    engine = create_engine(f"sqlite:///{tmp_path / 'unused.db'}")  # never connected
    return DatabaseRecorder(engine, Redactor(), dead_letter=tmp_path / "unused.jsonl", **bounds)


def overflowed() -> float:
    return metrics.REGISTRY.get_sample_value("luthien_recorder_overflow_total") or 0.0


async def backend_stream() -> AsyncIterator[bytes]:
    yield b'data: {"choices":[]}\n\n'


def test_a_queued_record_keeps_nothing_of_its_transaction_alive(tmp_path: Path) -> None:
    queue = recorder(tmp_path)
    tx = answered()
    source = backend_stream()  # what the relay read from, with its last network read
    tx.response = ProxyResponse(200, {}, stream=ResponseStream(source))
    watched = weakref.ref(source)
    queue.record(tx)
    del tx, source
    gc.collect()
    assert watched() is None
    assert queue.backlog == 1


def test_the_backlog_is_bounded_in_bytes(tmp_path: Path) -> None:
    queue = recorder(tmp_path, backlog_bytes=MB)
    dropped_before = overflowed()
    for _ in range(10):
        queue.record(answered("x" * 300_000))
    # Each row holds its 300,000 characters once, and the prompt's head and tail in its
    # search text: three fit in 1 MB with room to spare, the fourth is taken (the bound is
    # checked before a row), the others are dropped.
    searched = PROMPT_HEAD_CHARS + 1 + PROMPT_TAIL_CHARS
    assert queue.backlog == 4
    assert 4 * (300_000 + searched) < queue.backlog_bytes
    assert queue.backlog_bytes < 4 * (300_000 + searched + 2 * ROW_OVERHEAD)
    assert overflowed() == dropped_before + 6


def test_the_backlog_is_bounded_in_rows(tmp_path: Path) -> None:
    queue = recorder(tmp_path, backlog=3)
    dropped_before = overflowed()
    for _ in range(5):
        queue.record(answered())
    assert queue.backlog == 3
    assert overflowed() == dropped_before + 2


def test_row_size_counts_the_text_columns_and_the_overhead() -> None:
    row = {"id": "abc", "status": 200, "request": "x" * 1000, "error": None}
    assert row_size(row) == ROW_OVERHEAD + 3 + 1000


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_writer_gives_memory_back_once_idle_after_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    released: list[int] = []  # the backlog at each release
    monkeypatch.setattr(recording, "IDLE_RELEASE_AFTER", 0.05)
    engine = create_engine(f"sqlite:///{tmp_path / 'luthien.db'}")
    await upgrade(engine)
    queue = DatabaseRecorder(engine, Redactor(), dead_letter=tmp_path / "unused.jsonl")
    monkeypatch.setattr(recording, "release_free_memory", lambda: released.append(queue.backlog))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0  # a bound against hanging, never a measure of speed
    queue.start()
    try:
        queue.record(answered())
        while not released:
            assert loop.time() < deadline, "the memory was never released"
            await asyncio.sleep(0.02)
        # Released once the record was written, and once only while nothing comes.
        await asyncio.sleep(0.3)
        assert released == [0]
        queue.record(answered())
        while len(released) < 2:
            assert loop.time() < deadline, "the memory was not released after new traffic"
            await asyncio.sleep(0.02)
        assert released == [0, 0]
    finally:
        await queue.stop()
        await engine.dispose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_take_the_writers_pace_when_it_falls_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """Beyond ``PACE_ROWS`` queued rows a new request waits for the writer (at most
    ``PACE_WAIT``) until half of them are written: a saturated worker ran thousands of
    rows ahead of its writer, tens of MB that stayed fragmented once written."""
    monkeypatch.setattr(recording, "PACE_ROWS", 4)
    monkeypatch.setattr(recording, "BATCH_SIZE", 1)  # the writer frees a row at a time
    engine = create_engine(f"sqlite:///{tmp_path / 'luthien.db'}")
    await upgrade(engine)
    queue = DatabaseRecorder(engine, Redactor(), dead_letter=tmp_path / "unused.jsonl")
    try:
        for _ in range(4):
            queue.record(answered())
        assert queue.paced.is_set()  # 4 rows: within the pace
        queue.record(answered())
        assert not queue.paced.is_set()  # 5: a new request would wait
        monkeypatch.setattr(recording, "PACE_WAIT", 0.05)
        await queue.pace()  # a writer that does not write: the wait is bounded
        assert queue.backlog == 5
        monkeypatch.setattr(recording, "PACE_WAIT", 30.0)  # a bound against hanging only
        written: list[int] = []
        queue.start()
        await queue.pace()
        written.append(queue.backlog)
        assert written == [2]  # let go once the backlog was half the pace
        assert queue.paced.is_set()
    finally:
        await queue.stop()
        await engine.dispose()
    assert queue.backlog == 0
