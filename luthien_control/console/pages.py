"""The console's pages. Each takes the request and the signed-in ``Visit``; what it shows
comes from the database (any worker's records), rendered by ``Console.render``."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from luthien_control.console import Visit
from luthien_control.console.conversation import answer_turns, request_turns
from luthien_control.db.models import utcnow
from luthien_control.exceptions import ClientError, NotFound

PAGE_SIZE = 50
OUTCOMES = (
    "ok",
    "blocked",
    "rejected",
    "backend_error",
    "backend_error_status",
    "client_disconnected",
)


def _render(request: Request, template: str, **context: Any) -> Response:
    console = request.scope["luthien_console"]
    return console.render(request, template, **context)  # type: ignore[no-any-return]


def _engine(request: Request) -> Any:
    return request.scope["luthien_console"].services.engine


async def overview(request: Request, visit: Visit) -> Response:
    from luthien_control.db.transactions import overview as summaries

    windows = await summaries(_engine(request), utcnow())
    for window in windows:
        buckets = window["buckets"]
        window["charts"] = [
            bar_chart(label, unit, [b[key] for b in buckets], [b["start"] for b in buckets])
            for key, label, unit in CHARTS
        ]
    return _render(request, "overview.html", title="Overview", visit=visit, windows=windows)


# The overview's charts: (bucket key, title, unit).
CHARTS = (
    ("requests", "Requests", "requests"),
    ("blocked", "Blocked", "blocked"),
    ("flagged", "Flagged", "flagged"),
    ("tokens", "Tokens", "tokens"),
    ("ttft_p90", "TTFT p90", "ms"),
)
CHART_WIDTH = 240  # SVG user units; the page scales the chart to its box
CHART_HEIGHT = 80


def bar_chart(
    title: str, unit: str, values: list[float | None], starts: list[Any]
) -> dict[str, Any]:
    """One series as bars, laid out here so that the template only writes attributes
    (the CSP allows no inline style): each bar's box and its own text (a ``<title>``), a
    one-sentence description of the whole, the axis's top value and the window's ends."""
    shown = [v for v in values if v is not None]
    top = max(shown, default=0) or 1
    step = CHART_WIDTH / max(len(values), 1)
    bars = []
    for k, (value, start) in enumerate(zip(values, starts, strict=True)):
        height = 0.0 if value is None else round(value / top * CHART_HEIGHT, 2)
        if value is not None and value > 0:
            height = max(height, 1.0)  # a count of one stays visible beside a thousand
        bars.append(
            {
                "x": round(k * step + step * 0.1, 2),
                "y": round(CHART_HEIGHT - height, 2),
                "width": round(step * 0.8, 2),
                "height": height,
                "label": f"{start:%H:%M}: {_amount(value, unit)}",
            }
        )
    peak = max(range(len(values)), key=lambda k: values[k] or 0) if shown else None
    if peak is None or not values[peak]:
        description = f"No {unit} in this window."
    else:
        description = (
            f"{len(values)} bars from {starts[0]:%H:%M} UTC; highest "
            f"{_amount(values[peak], unit)} at {starts[peak]:%H:%M}."
        )
    return {
        "title": title,
        "unit": unit,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bars": bars,
        "top": _amount(max(shown, default=0), unit),
        "first": f"{starts[0]:%H:%M}" if starts else "",
        "description": description,
    }


def _amount(value: float | None, unit: str) -> str:
    if value is None:
        return "no data"
    if unit == "ms":
        return f"{value:,.0f} ms"
    return f"{value:,.0f} {unit}"


async def traffic(request: Request, visit: Visit) -> Response:
    from luthien_control.db.search import checked_query
    from luthien_control.db.transactions import TransactionFilter, list_transactions
    from luthien_control.logs import parse_since

    query = request.query_params
    before = query.get("before", "")
    if before and not re.fullmatch(r"[0-9]{1,18}", before):
        raise ClientError("'before' must be a record number")
    since = query.get("since", "").strip()
    search = query.get("q", "").strip()
    where = TransactionFilter(
        outcome=query.get("outcome") or None,
        model=query.get("model") or None,
        key_name=query.get("key") or None,
        since=parse_since(since, "since") if since else None,
        before_seq=int(before) if before else None,
        flagged=True if query.get("flagged") else None,
        search=checked_query(search) if search else None,
    )
    rows = await list_transactions(_engine(request), where, limit=PAGE_SIZE + 1, by_seq=True)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    filters = {k: query.get(k, "") for k in ("q", "outcome", "model", "key", "since", "flagged")}
    older = None
    if more:
        older = {**{k: v for k, v in filters.items() if v}, "before": str(rows[-1]["seq"])}
    # The live feed adds only what the page's filters would show; every new row is "since".
    live = {k: v for k, v in filters.items() if v and k != "since"}
    return _render(
        request,
        "traffic.html",
        title="Traffic",
        visit=visit,
        rows=rows,
        filters=filters,
        outcomes=OUTCOMES,
        older=older,
        live=live,
        paged=bool(before),
    )


async def transaction(request: Request, visit: Visit) -> Response:
    from luthien_control.db.transactions import get_transaction

    transaction_id = request.path_params["transaction_id"]
    record = await get_transaction(_engine(request), transaction_id)
    if record is None:
        raise NotFound(f"no transaction {transaction_id!r}")
    endpoint = record["endpoint"]
    sent_request = (record["request"] or {}).get("sent") or {}
    received_request = (record["request"] or {}).get("received") or {}
    response = record["response"] or {}
    turns = request_turns(endpoint, sent_request.get("body") or received_request.get("body"))
    answer = answer_turns(endpoint, response.get("sent"))
    redactor = _redactor(request)
    for turn in (*turns, *answer):
        # The view joins and decodes (a message's parts, a tool call's JSON arguments):
        # what it shows is redacted again, as the record was.
        turn["text"] = redactor.text(turn["text"])
        turn["name"] = redactor.text(turn["name"])
    return _render(
        request,
        "transaction.html",
        title=f"Transaction {transaction_id}",
        visit=visit,
        record=record,
        turns=turns,
        answer=answer,
        request_diff=side_by_side(received_request.get("body"), sent_request.get("body")),
        response_diff=side_by_side(
            _answer_document(response.get("received")), _answer_document(response.get("sent"))
        ),
    )


def _redactor(request: Request) -> Any:
    """The recorder's redactor (the patterns in force), else the built-in one."""
    from luthien_control.recording import Redactor

    recorder = request.scope["luthien_console"].services.recorder
    return recorder.redactor if recorder is not None else Redactor()


def _answer_document(side: Any) -> Any:
    if not isinstance(side, dict):
        return None
    return side.get("stream") if side.get("stream") is not None else side.get("body")


MAX_DIFF_LINES = 5000  # of each document shown; the rest is cut, and the page says so
MAX_DIFF_WORK = 250_000  # lines x lines of a changed middle that difflib may compare


def side_by_side(left: Any, right: Any) -> list[tuple[str, str, str, str]]:
    """Two JSON documents as indented lines side by side, each pair tagged ``same``,
    ``changed``, ``removed`` (only on the left) or ``added`` (only on the right): what the
    policies changed between what was received and what was sent.

    The documents are attacker-controlled, so the work is bounded: the common first and
    last lines are matched in linear time; only a changed middle small enough
    (``MAX_DIFF_WORK``) is aligned by difflib, a larger one is paired line by line; each
    side is cut at ``MAX_DIFF_LINES``."""
    a = _lines(left)
    b = _lines(right)
    cut = len(a) > MAX_DIFF_LINES or len(b) > MAX_DIFF_LINES
    a, b = a[:MAX_DIFF_LINES], b[:MAX_DIFF_LINES]
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    rows: list[tuple[str, str, str, str]] = [("same", line, "same", line) for line in a[:head]]
    middle_a, middle_b = a[head : len(a) - tail], b[head : len(b) - tail]
    if middle_a or middle_b:
        if len(middle_a) * len(middle_b) <= MAX_DIFF_WORK:
            matcher = difflib.SequenceMatcher(a=middle_a, b=middle_b, autojunk=False)
            opcodes = matcher.get_opcodes()
        else:
            opcodes = [("replace", 0, len(middle_a), 0, len(middle_b))]
        for tag, i1, i2, j1, j2 in opcodes:
            if tag == "equal":
                rows += [("same", line, "same", line) for line in middle_a[i1:i2]]
                continue
            rows += _paired(middle_a[i1:i2], middle_b[j1:j2])
    rows += [("same", line, "same", line) for line in a[len(a) - tail :]]
    if cut:
        note = f"... cut here: only the first {MAX_DIFF_LINES} lines are shown"
        rows.append(("same", note, "same", note))
    return rows


def _paired(olds: list[str], news: list[str]) -> list[tuple[str, str, str, str]]:
    rows = []
    for k in range(max(len(olds), len(news))):
        old = olds[k] if k < len(olds) else None
        new = news[k] if k < len(news) else None
        both = old is not None and new is not None
        rows.append(
            ("changed" if both else "removed", old or "", "changed" if both else "added", new or "")
        )
    return rows


def _lines(document: Any) -> list[str]:
    if document is None:
        return []
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            return list(document.splitlines())
    return json.dumps(document, ensure_ascii=False, indent=2, default=str).splitlines()


async def keys(request: Request, visit: Visit) -> Response:
    return await _keys_page(request, visit)


async def _keys_page(
    request: Request, visit: Visit, *, created: dict[str, str] | None = None, status: int = 200
) -> Response:
    from luthien_control.db.keys import list_keys

    listing = await list_keys(_engine(request))
    return _render(
        request,
        "keys.html",
        title="Keys",
        visit=visit,
        keys=listing,
        created=created,
        status=status,
    )


async def create_key(request: Request, visit: Visit) -> Response:
    from luthien_control.db.keys import add_key, generate_key

    name = request.state.form.get("name", "").strip()
    value = generate_key()
    await add_key(_engine(request), name, value)
    # Shown in this answer only (no-store): never stored, never shown again.
    return await _keys_page(request, visit, created={"name": name, "key": value}, status=201)


async def revoke_key(request: Request, visit: Visit) -> Response:
    from starlette.responses import RedirectResponse

    from luthien_control.console import PREFIX, secure
    from luthien_control.db.keys import revoke_key as revoke

    await revoke(_engine(request), request.state.form.get("name", ""))
    return secure(RedirectResponse(f"{PREFIX}/keys", status_code=303))


async def review(request: Request, visit: Visit) -> Response:
    from luthien_control.db.reviews import review_queue

    after = request.query_params.get("after", "")
    if after and not re.fullmatch(r"[0-9]{1,18}", after):
        raise ClientError("'after' must be a record number")
    rows = await review_queue(
        _engine(request), limit=PAGE_SIZE + 1, after_seq=int(after) if after else None
    )
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return _render(
        request,
        "review.html",
        title="Review",
        visit=visit,
        rows=rows,
        newer={"after": str(rows[-1]["seq"])} if more else None,
    )


async def add_review(request: Request, visit: Visit) -> Response:
    from starlette.responses import RedirectResponse

    from luthien_control import metrics
    from luthien_control.console import PREFIX, secure
    from luthien_control.db.reviews import add_review as store

    form = request.state.form
    verdict = form.get("verdict", "")
    await store(
        _engine(request),
        request.path_params["transaction_id"],
        verdict,
        form.get("note", "").strip(),
        visit.label,
    )
    metrics.REVIEWS.labels(verdict).inc()
    return secure(RedirectResponse(f"{PREFIX}/review", status_code=303))
