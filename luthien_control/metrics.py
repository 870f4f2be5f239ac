"""Prometheus metrics, served at ``/metrics`` (docs/operations.md says what each means).

With several workers (``serve --workers N`` sets ``PROMETHEUS_MULTIPROC_DIR``), every
worker writes its values to that directory and ``/metrics`` adds them up, whichever
worker answers.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from luthien_control.transaction import Transaction

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter(
    "luthien_requests",
    "Proxied requests, by API route, HTTP status and outcome.",
    ["route", "status", "outcome"],
    registry=REGISTRY,
)
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

ACTIVE = Gauge(
    "luthien_active_transactions",
    "Transactions in progress.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
CHUNKS = Counter("luthien_stream_chunks", "Streamed events relayed to clients.", registry=REGISTRY)
TIME_TO_FIRST_BYTE = Histogram(
    "luthien_time_to_first_byte_seconds",
    "From receiving a request to the first byte sent to the client.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ADDED_LATENCY = Histogram(
    "luthien_added_first_byte_latency_seconds",
    "What the proxy added before the first byte: time to first byte minus the backend's.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
DECISIONS = Counter(
    "luthien_policy_decisions",
    "Policy decisions, by policy name and action.",
    ["policy", "action"],
    registry=REGISTRY,
)


ACTIVE_STREAMS = Gauge(
    "luthien_active_streams",
    "Streamed responses being relayed.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
RECORDER_BACKLOG = Gauge(
    "luthien_recorder_backlog",
    "Finished transactions waiting to be written to the database.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
REVIEWS = Counter(
    "luthien_reviews",
    "Verdicts people gave on flagged transactions in the operator console, by verdict.",
    ["verdict"],
    registry=REGISTRY,
)
RECORDER_REFUSED = Counter(
    "luthien_recorder_refused",
    "Transaction records the database refused, each written to the dead-letter file.",
    registry=REGISTRY,
)
RECORDER_LOST = Counter(
    "luthien_recorder_lost",
    "Refused transaction records that could not be written to the dead-letter file either.",
    registry=REGISTRY,
)
RECORDER_OVERFLOW = Counter(
    "luthien_recorder_overflow",
    "Transaction records dropped because the recorder backlog was full.",
    registry=REGISTRY,
)


def route_label(path: str) -> str:
    """``/chat/completions`` as it is; ``/models/gpt-4o`` → ``/models/*``; a path whose
    first segment is no API's resource → ``/other`` (bounded labels: the path is the
    client's text, a key in it would otherwise be a label)."""
    if path in _ROUTES:
        return path
    head = path.split("/", 2)[1] if path.count("/") >= 1 else path
    return f"/{head}/*" if head in _ROUTE_HEADS else "/other"


_ROUTES = frozenset(
    {"/chat/completions", "/completions", "/embeddings", "/models", "/responses", "/moderations"}
)
# The first segments of the OpenAI and Anthropic APIs' paths.
_ROUTE_HEADS = frozenset(
    {
        "assistants",
        "audio",
        "batches",
        "chat",
        "completions",
        "containers",
        "conversations",
        "embeddings",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "messages",
        "models",
        "moderations",
        "organization",
        "realtime",
        "responses",
        "threads",
        "uploads",
        "vector_stores",
    }
)


_REQUEST_COUNTERS: dict[tuple[str, str, str], Any] = {}  # bounded: routes, statuses, outcomes


def observe(tx: Transaction) -> None:
    """Count a finished transaction."""
    labels = (route_label(tx.request.path), str(tx.status or 0), tx.outcome)
    counter = _REQUEST_COUNTERS.get(labels)
    if counter is None:  # labels() takes a lock and validates: once per combination
        counter = _REQUEST_COUNTERS[labels] = REQUESTS.labels(*labels)
    counter.inc()
    if tx.chunks_sent:
        CHUNKS.inc(tx.chunks_sent)
    timings = tx.timings
    if timings.client_first_byte is not None:
        TIME_TO_FIRST_BYTE.observe(timings.client_first_byte - timings.start)
        if timings.backend_ready is not None and timings.backend_sent is not None:
            ADDED_LATENCY.observe(
                max(0.0, timings.client_first_byte - timings.backend_ready)
                + max(0.0, timings.backend_sent - timings.start)
            )
    for decision in tx.decisions:
        DECISIONS.labels(decision.policy, decision.action).inc()


def worker_stopped() -> None:
    """Forget this worker's live gauges (several workers only)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


async def send_metrics(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]], transaction_id: str
) -> None:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    headers = [
        (b"content-type", CONTENT_TYPE_LATEST.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"x-luthien-transaction-id", transaction_id.encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
