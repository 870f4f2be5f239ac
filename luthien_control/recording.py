"""Where a finished transaction is handed over for the record.

The proxy calls ``Recorder.record(tx)`` once per transaction, after the client has
its answer; a recorder must never block or fail the request path.
"""

from __future__ import annotations

import logging
from typing import Protocol

from luthien_control.transaction import Transaction

logger = logging.getLogger("luthien_control.transactions")


class Recorder(Protocol):
    def record(self, tx: Transaction) -> None: ...


class LogRecorder:
    """Writes one summary line per transaction to the ``luthien_control.transactions`` log."""

    def record(self, tx: Transaction) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        timings = tx.timings
        total_ms = ((timings.end or timings.start) - timings.start) * 1000
        usage = tx.usage
        logger.info(
            "tx=%s %s %s outcome=%s status=%s key=%s chunks=%d tokens=%s ms=%.1f%s",
            tx.id,
            tx.request.method,
            tx.request.path,
            tx.outcome,
            tx.status or "-",
            tx.client_key_name or "-",
            tx.chunks_sent,
            usage.total_tokens if usage is not None else "-",
            total_ms,
            "".join(f" {d.policy}:{d.action}" for d in tx.decisions),
        )
