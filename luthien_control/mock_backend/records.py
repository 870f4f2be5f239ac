"""The request log: one record per ``/v1`` request, updated while the response runs.

A record is a plain JSON-ready dict, so ``GET /_mock/requests`` serializes the live
objects as they are::

    {"id", "method", "path", "query", "headers", "body", "model", "stream", "status",
     "outcome", "chunks_sent", "started_at", "ended_at"}

``outcome`` is ``in_progress`` until the response ends as ``completed``, ``cancelled``
(the client went away first, a stream included), ``error_response`` (an HTTP error was
sent), ``error_event`` (a stream ended with its error event, ``x-mock-fail: error:N``) or
``dropped`` (the mock cut the connection on purpose).
"""

from __future__ import annotations

import time
from typing import Any, Literal

DEFAULT_MAX_RECORDS = 10_000

Outcome = Literal[
    "in_progress", "completed", "cancelled", "error_response", "error_event", "dropped"
]
Record = dict[str, Any]


class RequestLog:
    """The newest ``max_records`` records, oldest first, addressable by id.

    A request that reuses an id replaces the older record of that id.
    """

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.max_records = max_records
        self._records: dict[str, Record] = {}

    def start(
        self, request_id: str, method: str, path: str, query: str, headers: dict[str, str]
    ) -> Record:
        """Record a request that has just arrived (its body is filled in once read)."""
        record: Record = {
            "id": request_id,
            "method": method,
            "path": path,
            "query": query,
            "headers": headers,
            "body": None,
            "model": None,
            "stream": False,
            "status": None,
            "outcome": "in_progress",
            "chunks_sent": 0,
            "started_at": time.time(),
            "ended_at": None,
        }
        records = self._records
        records.pop(request_id, None)
        records[request_id] = record
        if len(records) > self.max_records:
            del records[next(iter(records))]
        return record

    def get(self, request_id: str) -> Record | None:
        return self._records.get(request_id)

    def all(self) -> list[Record]:
        return list(self._records.values())

    def clear(self) -> None:
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)


def finish(record: Record, outcome: Outcome) -> None:
    """Close ``record`` with its final ``outcome``."""
    record["outcome"] = outcome
    record["ended_at"] = time.time()
