"""``luthien-control logs``: read the recorded transactions."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import orjson

from luthien_control.cli import printable
from luthien_control.exceptions import ClientError, NotFound
from luthien_control.settings import load_settings

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
COLUMNS = (
    "RECEIVED",
    "ID",
    "KEY",
    "MODEL",
    "ENDPOINT",
    "STREAM",
    "STATUS",
    "OUTCOME",
    "TOKENS",
    "MS",
)
FOLLOW_INTERVAL = 1.0


def parse_since(value: str, name: str = "--since") -> datetime:
    """``10m``, ``2h``, ``1d`` ago, or an ISO 8601 time (UTC when it names no zone)."""
    mistake = ClientError(
        f"{name}: expected a time like 10m, 2h, 1d or 2026-01-31T12:00:00, got {value!r}",
        param=name.lstrip("-"),
    )
    match = _RELATIVE.match(value.strip())
    try:
        if match:
            amount, unit = match.groups()
            return datetime.now(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
        moment = datetime.fromisoformat(value)
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        moment.astimezone(UTC)  # a time near year 1 or 9999 may not be one in UTC
    except (ValueError, OverflowError) as exc:  # not a time, or outside years 1 to 9999
        raise mistake from exc
    return moment


def _json_line(record: dict[str, Any]) -> str:
    return orjson.dumps(record, default=str).decode()


def _row(record: dict[str, Any]) -> list[str]:
    received: datetime = record["received_at"]
    return [
        received.strftime("%Y-%m-%d %H:%M:%S"),
        record["id"],
        record["client_key_name"] or "-",
        record["model"] or "-",
        record["endpoint"],
        "yes" if record["streamed"] else "no",
        str(record["status"] or "-"),
        record["outcome"],
        "-" if record["total_tokens"] is None else str(record["total_tokens"]),
        f"{record['duration_ms']:.1f}",
    ]


def _print_rows(rows: list[list[str]], out: TextIO, *, header: bool) -> None:
    # Models and key names come from clients: escaped, they cannot drive the terminal.
    rows = [[printable(value) for value in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    if header:
        print(
            "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip(), file=out
        )
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


async def run_logs(
    *,
    transaction_id: str | None,
    limit: int,
    follow: bool,
    as_json: bool,
    outcome: str | None,
    model: str | None,
    key_name: str | None,
    since: str | None,
    out: TextIO = sys.stdout,
) -> int:
    from luthien_control.db.engine import create_engine
    from luthien_control.db.init_db import upgrade_database
    from luthien_control.db.transactions import (
        TransactionFilter,
        follow_transactions,
        get_transaction,
        list_transactions,
    )

    if limit < 1:
        raise ClientError("--limit must be at least 1")
    settings = load_settings()
    await upgrade_database(settings.database_url)
    engine = create_engine(settings.database_url)
    try:
        if transaction_id is not None:
            record = await get_transaction(engine, transaction_id)
            if record is None:
                raise NotFound(f"no transaction {transaction_id!r}")
            if as_json:
                print(_json_line(record), file=out)
            else:
                print(
                    orjson.dumps(record, default=str, option=orjson.OPT_INDENT_2).decode(), file=out
                )
            return 0
        where = TransactionFilter(
            outcome=outcome,
            model=model,
            key_name=key_name,
            since=parse_since(since) if since else None,
        )
        records = list(reversed(await list_transactions(engine, where, limit=limit)))
        _emit(records, out, as_json=as_json, header=True)
        if not follow:
            if not records and not as_json:
                print("no transactions", file=out)
            return 0
        async for fresh in follow_transactions(engine, where, interval=FOLLOW_INTERVAL):
            _emit(fresh, out, as_json=as_json, header=False)
            out.flush()
        return 0  # not reached: following ends with an interrupt
    finally:
        await engine.dispose()


def _emit(records: list[dict[str, Any]], out: TextIO, *, as_json: bool, header: bool) -> None:
    if as_json:
        for record in records:
            print(_json_line(record), file=out)
    elif records:
        _print_rows([_row(r) for r in records], out, header=header)
