"""The audit trail: every finished transaction becomes one record, written off the
request path.

The proxy calls ``Recorder.record(tx)`` once per transaction, after the client has its
answer. ``DatabaseRecorder`` queues the transaction and a background task turns queued
transactions into rows, redacts every secret, and inserts them in batches. While the
database is unreachable the queue holds the records (up to ``RECORDER_BACKLOG``) and the
writer retries; an insert is idempotent (the transaction id is the key), so a retry after
an ambiguous failure never writes a record twice. On shutdown the queue is flushed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections import deque
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from luthien_control import metrics
from luthien_control.db.engine import SerializedJSON
from luthien_control.db.models import ENDPOINT_LENGTH, NAME_LENGTH
from luthien_control.dialects import StreamAssembler
from luthien_control.exceptions import LuthienError
from luthien_control.policies.audit_log import redacted_headers
from luthien_control.policies.secrets import (
    DEFAULT_PATTERNS,
    SecretPattern,
    default_secrets,
    rewrite_json,
)
from luthien_control.settings import DEFAULT_RECORDER_BACKLOG
from luthien_control.transaction import Transaction
from luthien_control.upstream.client import REDACTED, display_url

logger = logging.getLogger("luthien_control.transactions")


BATCH_SIZE = 100  # the rows of one batch are prepared on the event loop: keep stalls short
BATCH_WAIT = 0.2  # seconds to wait for a batch to fill once the first record is in
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0)
REFUSALS_BEFORE_DROP = 3
REACHABLE_TIMEOUT = 3.0


class Recorder(Protocol):
    def record(self, tx: Transaction) -> None: ...


class Redactor:
    """Removes secrets from everything that is stored or logged: known patterns, and the
    patterns of every ``LeakedApiKeyDetection`` in the policy in force.

    It works on decoded values, never on serialized text: every string and every object
    key of a document, each also percent-decoded (a URL, a query), so that no escape
    (JSON's ``\\u0073k-...``, ``\\n`` before a key, a URL's ``%73k-...``) can hide a key."""

    def __init__(self, extra_patterns: list[str] | None = None) -> None:
        if not extra_patterns:
            self._secrets = default_secrets()
            return
        patterns = dict(DEFAULT_PATTERNS)
        for index, pattern in enumerate(extra_patterns):
            patterns[f"policy pattern {index}"] = pattern
        self._secrets = SecretPattern(patterns)

    def text(self, value: str) -> str:
        """``value`` with every secret replaced (``SecretPattern.scrub``)."""
        return self._secrets.scrub(value)

    def document(self, value: Any) -> SerializedJSON:
        """``value`` as JSON text with every secret redacted (``value`` is redacted in
        place). Serialized once when it is clean: a key can be in a decoded string only
        if one of the literals, a ``\\u`` escape or a percent escape is in the text."""
        serialized = _dumps(value)
        may_hold = self._secrets.may_contain_json(serialized) or _PERCENT_ESCAPE.search(serialized)
        if may_hold and rewrite_json(value, self.text)[1]:
            serialized = _dumps(value)
        return SerializedJSON(serialized.decode())


_PERCENT_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")


class _Raw(str):
    """JSON syntax already written, on the stack of ``_dumps_deep``."""

    __slots__ = ()


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255 levels)
        return _dumps_deep(value).encode()


def _dumps_deep(value: Any) -> str:
    """JSON text of a value nested at any depth, without recursion."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Raw:
            out.append(item)
        elif isinstance(item, dict):
            pending: list[Any] = []
            for key, child in item.items():
                pending.append(_Raw(("," if pending else "{") + _leaf(str(key)) + ":"))
                pending.append(child)
            pending.append(_Raw("}" if pending else "{}"))
            stack.extend(reversed(pending))
        elif isinstance(item, (list, tuple)):
            pending = []
            for child in item:
                pending.append(_Raw("," if pending else "["))
                pending.append(child)
            pending.append(_Raw("]" if pending else "[]"))
            stack.extend(reversed(pending))
        else:
            out.append(_leaf(item))
    return "".join(out)


def _leaf(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return json.dumps(value, ensure_ascii=False)


class _Bodies:
    """Bodies as stored: their JSON when they are JSON, else their text. Redaction comes
    later, over the decoded strings of the whole document (``Redactor.document``), so
    escapes the client wrote (\\u0073k-...) cannot hide a key. The same bytes object is
    parsed once (the body the backend got is most often the client's, unchanged)."""

    __slots__ = ("_parsed",)

    def __init__(self, known: tuple[bytes, Any] | None = None) -> None:
        self._parsed: dict[int, tuple[bytes, Any]] = {}
        if known is not None and known[1] is not None:
            self._parsed[id(known[0])] = known

    def value(self, body: bytes | None) -> Any:
        if body is None:
            return None
        if not body:
            return ""
        seen = self._parsed.get(id(body))
        if seen is not None and seen[0] is body:
            return seen[1]
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = body.decode("utf-8", "replace")  # not JSON: stored as text
        self._parsed[id(body)] = (body, parsed)
        return parsed


def _at(tx: Transaction, moment: float | None) -> datetime | None:
    if moment is None:
        return None
    timings = tx.timings
    return datetime.fromtimestamp(timings.received_at + (moment - timings.start), UTC)


def _stream(assembler: StreamAssembler | None) -> dict[str, Any] | None:
    """A stream as its dialect assembles it: the message, tool calls, usage."""
    return None if assembler is None else assembler.summary()


def _column(value: str | None, size: int) -> str | None:
    """Fit a value to its column: at most ``size`` characters, no NUL (PostgreSQL refuses it)."""
    if value is None:
        return None
    return value.replace("\x00", "")[:size]


def _headers_sent(headers: list[tuple[bytes, bytes]] | None) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers or ()}


def build_record(tx: Transaction, redactor: Redactor) -> dict[str, Any]:
    """The row of one finished transaction: plain values, and the JSON columns as
    redacted JSON text (``SerializedJSON``), serialized and scanned once each."""
    trail = tx.trail
    bodies = _Bodies()
    request = tx.request
    payload = request.payload if isinstance(request.payload, dict) else {}
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    timings = tx.timings
    backend_request = trail.backend_request
    streamed = trail.stream_sent is not None
    usage = tx.usage
    received_stream = _stream(trail.stream_received)
    # One assembler for both sides when no policy changed the stream (relay.py).
    sent_stream = (
        received_stream
        if trail.stream_sent is trail.stream_received
        else _stream(trail.stream_sent)
    )
    return {
        "id": tx.id,
        "received_at": datetime.fromtimestamp(timings.received_at, UTC),
        "backend_first_byte_at": _at(tx, timings.backend_first_byte),
        "client_first_byte_at": _at(tx, timings.client_first_byte),
        "ended_at": _at(tx, timings.end),
        "duration_ms": ((timings.end or timings.start) - timings.start) * 1000,
        "client_key_name": tx.client_key_name,
        "policy_name": _column(tx.policy_name, NAME_LENGTH),
        "method": _column(request.method, 16),
        "endpoint": _column(redactor.text(request.path), ENDPOINT_LENGTH),
        "model": _column(redactor.text(model) if model is not None else None, NAME_LENGTH),
        "streamed": streamed or request.wants_stream,
        "status": tx.status,
        "outcome": tx.outcome,
        "error": redactor.text(getattr(tx.error, "message", None) or repr(tx.error))
        if tx.error is not None
        else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
        # A stream cut short: whatever usage the backend reported covers only part of it.
        "usage_partial": streamed and tx.outcome == "client_disconnected",
        "chunks_sent": tx.chunks_sent,
        "request": redactor.document(
            {
                "received": {
                    "headers": redacted_headers(request.headers),
                    "query": request.query.decode("latin-1"),
                    "body": bodies.value(trail.request_body),
                },
                "sent": None
                if backend_request is None
                else {
                    "method": backend_request["method"],
                    "url": display_url(backend_request["url"]),  # no userinfo, no query key
                    # What the policies added carries the backend key, whatever its name.
                    "headers": redacted_headers(
                        {
                            **backend_request["headers"],
                            **dict.fromkeys(tx.backend_headers, REDACTED),
                        }
                    ),
                    "body": bodies.value(backend_request["body"]),
                },
            }
        ),
        "response": redactor.document(
            {
                "received": None
                if trail.backend_status is None
                else {
                    "status": trail.backend_status,
                    "headers": redacted_headers(trail.backend_headers or {}),
                    "body": bodies.value(trail.backend_body),
                    "stream": received_stream,
                },
                "sent": {
                    "status": tx.status,
                    "headers": redacted_headers(_headers_sent(trail.client_headers)),
                    "body": bodies.value(trail.client_body),
                    "stream": sent_stream,
                },
            }
        ),
        "decisions": redactor.document(
            [{"policy": d.policy, "action": d.action, "detail": d.detail} for d in tx.decisions]
        ),
    }


@functools.cache
def _default_redactor() -> Redactor:
    return Redactor()


class LogRecorder:
    """Writes one summary line per transaction to the ``luthien_control.transactions`` log,
    at DEBUG (``LOG_LEVEL=DEBUG``): the database holds the full record. The path is
    redacted as records are (``redactor``: the recorder's own, else the built-in one)."""

    def record(self, tx: Transaction, redactor: Redactor | None = None) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        timings = tx.timings
        total_ms = ((timings.end or timings.start) - timings.start) * 1000
        usage = tx.usage
        logger.debug(
            "tx=%s %s %s outcome=%s status=%s key=%s chunks=%d tokens=%s ms=%.1f%s",
            tx.id,
            tx.request.method,
            (redactor or _default_redactor()).text(tx.request.path),
            tx.outcome,
            tx.status or "-",
            tx.client_key_name or "-",
            tx.chunks_sent,
            usage.total_tokens if usage is not None else "-",
            total_ms,
            "".join(f" {d.policy}:{d.action}" for d in tx.decisions),
        )


class DatabaseRecorder:
    """Queues finished transactions and writes them in batches, in the background."""

    def __init__(
        self, engine: Any, redactor: Redactor, *, backlog: int = DEFAULT_RECORDER_BACKLOG
    ) -> None:
        self._engine = engine
        self.redactor = redactor
        self._queue: deque[tuple[Transaction, Redactor]] = deque()
        self._backlog = backlog
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log = LogRecorder()
        self._overflowed = 0
        self._refusals: dict[str, int] = {}
        self._failing = False

    def record(self, tx: Transaction) -> None:
        self._log.record(tx, self.redactor)
        if len(self._queue) >= self._backlog:
            self._overflowed += 1
            metrics.RECORDER_OVERFLOW.inc()
            if self._overflowed == 1 or self._overflowed % 1000 == 0:
                logger.error(
                    "recorder backlog full (%d records): %d record(s) dropped so far",
                    self._backlog,
                    self._overflowed,
                )
            return
        # The patterns in force when the transaction ran, not when it is written.
        self._queue.append((tx, self.redactor))
        self._wakeup.set()  # the writer updates the backlog gauge, once per batch

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="luthien-recorder")

    async def stop(self, grace: float = 30.0) -> None:
        """Write everything still queued (retrying for ``grace`` seconds), then stop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        deadline = asyncio.get_running_loop().time() + grace
        while self._queue:
            if not await self._write_batch():
                if asyncio.get_running_loop().time() >= deadline:
                    logger.error(
                        "shutting down with %d unwritten record(s): database unreachable",
                        len(self._queue),
                    )
                    return
                await asyncio.sleep(0.5)

    async def _run(self) -> None:
        attempt = 0
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if len(self._queue) < BATCH_SIZE:
                # Not a full batch: let it fill. Writing whatever came in during the
                # last write made batches of a few rows under load, each paying for a
                # whole database transaction.
                await asyncio.sleep(BATCH_WAIT)
            if await self._write_batch():
                attempt = 0
            else:
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1

    async def _write_batch(self) -> bool:
        """Write up to ``BATCH_SIZE`` queued records; False (records kept) if it failed."""
        from luthien_control.db.transactions import insert_records

        metrics.RECORDER_BACKLOG.set(len(self._queue))
        batch = [self._queue[i] for i in range(min(BATCH_SIZE, len(self._queue)))]
        if not batch:
            return True
        rows = []
        for number, (tx, redactor) in enumerate(batch, 1):
            try:
                rows.append(build_record(tx, redactor))
            except Exception:  # a bug in one record must not lose the others
                logger.exception("cannot build the record of transaction %s", tx.id)
            if number % 10 == 0:
                await asyncio.sleep(0)  # let streams in flight send their chunks
        try:
            await insert_records(self._engine, rows)
        except LuthienError as exc:
            if not await self._insert_one_by_one(rows):
                if not self._failing:
                    logger.error("cannot write transaction records, will retry: %s", exc.message)
                self._failing = True
                return False
        if self._failing:
            logger.info("transaction records are being written again")
            self._failing = False
        for _ in batch:
            self._queue.popleft()
        metrics.RECORDER_BACKLOG.set(len(self._queue))
        return True

    async def _insert_one_by_one(self, rows: list[dict[str, Any]]) -> bool:
        """After a failed batch: write the rows singly, so that one row the database
        refuses cannot hold back the others. False when none could be written (the
        database is away: the batch is kept and retried)."""
        from luthien_control.db.transactions import insert_records

        if not await self._reachable():
            return False  # away: not worth one connect timeout per row
        failed: list[tuple[dict[str, Any], str]] = []
        written = 0
        for row in rows:
            try:
                await insert_records(self._engine, [row])
            except LuthienError as exc:
                failed.append((row, exc.message))
            else:
                written += 1
        if written == 0 and len(rows) > 1:
            return False  # the database is away, not refusing: keep everything
        # A row is given up only after the database, reachable, refused it on its own
        # REFUSALS_BEFORE_DROP times: a blip between two attempts must not lose it.
        kept = False
        for row, reason in failed:
            count = self._refusals.get(row["id"], 0) + 1
            if count < REFUSALS_BEFORE_DROP:
                self._refusals[row["id"]] = count
                kept = True
                continue
            self._refusals.pop(row["id"], None)
            metrics.RECORDER_REFUSED.inc()
            logger.error("record of transaction %s refused by the database: %s", row["id"], reason)
        return not kept

    async def _reachable(self) -> bool:
        from sqlalchemy import text

        try:
            async with asyncio.timeout(REACHABLE_TIMEOUT), self._engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:  # any failure to reach it means "away"
            return False
        return True
