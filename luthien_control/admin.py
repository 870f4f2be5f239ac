"""The admin JSON API under ``/admin/api/``, behind ``ADMIN_API_KEY``.

Without ``ADMIN_API_KEY`` every admin route answers 401: the API is off. Reads
(``transactions``, ``transactions/{id}``, ``policies``, ``policies/{name}``, ``keys``)
answer ``GET``; besides them (``shared/SPEC.md``, "Admin API"):

- ``POST keys`` ``{"name": ...}`` creates a key; the answer holds its value, once (201);
- ``DELETE keys/{name}`` revokes it: every worker refuses it after its next refresh
  (``REFRESH_INTERVAL``, 1 s by default);
- ``PUT policies/{name}`` validates a policy definition and stores it (a new version);
  a definition that does not load is a 400 whose ``param`` is the path of its first
  error;
- ``GET reviews``: the review queue, flagged transactions no one reviewed yet, oldest
  first (``transactions/{id}`` holds each one's ``reviews``);
- ``GET events``: server-sent events, one ``transaction`` event per transaction
  recorded from now on (by any worker), with its summary; the same filters as
  ``transactions``.

Errors have the OpenAI shape, like every error of the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from luthien_control.app import Services
from luthien_control.decoding import DecodingError, strict_json
from luthien_control.exceptions import (
    AuthenticationFailed,
    ClientError,
    LuthienError,
    MalformedRequest,
    NotFound,
    PolicyConfigError,
    RequestTooLarge,
)
from luthien_control.logs import parse_since
from luthien_control.responses import (
    TRANSACTION_HEADER,
    error_status_and_body,
    send_error,
    send_json,
)
from luthien_control.transaction import new_transaction_id

PREFIX = "/admin/api/"
MAX_LIMIT = 1000
EVENTS_INTERVAL = 0.5  # seconds between two looks for new records
KEEPALIVE_INTERVAL = 15.0  # seconds without an event before a comment line goes out

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class MethodNotAllowed(ClientError):
    status_code = 405
    code = "method_not_allowed"


async def _authorize(services: Services, scope: MutableMapping[str, Any]) -> None:
    """The admin key as a bearer token; or, for reads only, the operator console's
    session cookie (the console's live view reads ``events`` with it: a browser's
    ``EventSource`` sends no header of its own). The cookie is SameSite=Strict and a read
    changes nothing, so no CSRF token is needed for it."""
    expected = services.settings.admin_api_key
    if not expected:
        raise AuthenticationFailed("the admin API is disabled: set ADMIN_API_KEY to enable it")
    given = ""
    cookie = ""
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        elif name == b"cookie":
            cookie = _console_cookie(value.decode("latin-1")) or cookie
    if given:
        if hmac.compare_digest(given.encode(), expected.encode()):
            return
        from luthien_control.console import failed_attempt

        await failed_attempt()
        raise AuthenticationFailed("invalid admin API key")
    if cookie and scope["method"] == "GET":
        from luthien_control.db.sessions import find_session

        if await find_session(services.engine, cookie, expected) is not None:
            return
    raise AuthenticationFailed("invalid admin API key")


def _console_cookie(header: str) -> str:
    """The console's session cookie, read as the console reads it (Starlette's parser)."""
    from starlette.requests import cookie_parser

    from luthien_control.console import COOKIE

    return cookie_parser(header).get(COOKIE, "")


async def handle_admin(
    services: Services, scope: MutableMapping[str, Any], receive: Receive, send: Send
) -> None:
    request_id = new_transaction_id()
    outer_send = send

    async def send(message: MutableMapping[str, Any]) -> None:  # type: ignore[no-redef]
        if message["type"] == "http.response.start":  # answers may hold a key, once
            message["headers"] = [*message.get("headers", []), (b"cache-control", b"no-store")]
        await outer_send(message)

    try:
        await _authorize(services, scope)
        method = scope["method"]
        # Split as written, then decode each part: a name may hold "/" or ".." (%2F).
        raw = scope.get("raw_path") or scope["path"].encode()
        written = raw.decode("latin-1").split("?", 1)[0]
        parts = [unquote(p) for p in written[len(PREFIX) :].strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        if parts == ["events"] and method == "GET":
            where = _filter(query)
            await _send_events(services, scope, where, receive, send, request_id)
            return
        body = None
        if method in ("POST", "PUT"):
            body = await _read_json(receive, services.settings.max_request_bytes)
        status, payload = await _route(services, method, parts, query, body)
    except Exception as exc:
        await send_error(send, exc, request_id, dev=services.settings.dev)
        return
    await send_json(send, status, payload, request_id)


async def _read_json(receive: Receive, limit: int) -> Any:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedRequest("the client went away before sending its whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        return strict_json(b"".join(chunks))
    except DecodingError as exc:
        raise MalformedRequest(f"the request body {exc}") from None


def _filter(query: dict[str, str]) -> Any:
    from luthien_control.db.search import checked_query
    from luthien_control.db.transactions import TransactionFilter

    before = query.get("before")
    if before is not None and not (before.isascii() and before.isdigit() and len(before) <= 18):
        raise ClientError("before must be a record's seq", param="before")
    return TransactionFilter(
        outcome=query.get("outcome"),
        model=query.get("model"),
        key_name=query.get("key"),
        since=parse_since(query["since"], "since") if "since" in query else None,
        flagged=True if query.get("flagged") in ("1", "true") else None,
        search=checked_query(query["q"]) if query.get("q") else None,
        before_seq=int(before) if before is not None else None,
    )


async def _route(
    services: Services, method: str, parts: list[str], query: dict[str, str], body: Any
) -> tuple[int, Any]:
    allowed = _ALLOWED.get(_shape(parts))
    if allowed is None:
        raise NotFound(f"no admin route /{'/'.join(parts)}")
    if method not in allowed:
        raise MethodNotAllowed(
            f"/admin/api/{'/'.join(parts)} answers {', '.join(sorted(allowed))}, not {method}"
        )
    engine = services.engine
    match method, parts:
        case "GET", ["transactions"]:
            from luthien_control.db.transactions import list_transactions

            try:
                limit = min(int(query.get("limit", "50")), MAX_LIMIT)
            except ValueError as exc:
                raise ClientError("limit must be a number", param="limit") from exc
            where = _filter(query)
            # A search or a page (before) goes by recording order: the last row's seq is
            # the next page's before, and the search index is read in that order.
            by_seq = where.search is not None or where.before_seq is not None
            rows = await list_transactions(engine, where, limit=max(limit, 1), by_seq=by_seq)
            return 200, {"data": rows}
        case "GET", ["transactions", transaction_id]:
            from luthien_control.db.transactions import get_transaction

            record = await get_transaction(engine, transaction_id)
            if record is None:
                raise NotFound(f"no transaction {transaction_id!r}")
            return 200, record
        case "GET", ["policies"]:
            from luthien_control.db.policies import list_policies

            return 200, {
                "data": [
                    {
                        "name": p.name,
                        "type": p.definition.get("type"),
                        "version": p.version,
                        "created_at": p.created_at,
                        "updated_at": p.updated_at,
                    }
                    for p in await list_policies(engine)
                ]
            }
        case "GET", ["policies", name]:
            from luthien_control.db.policies import get_policy

            stored = await get_policy(engine, name)
            if stored is None:
                raise NotFound(f"no policy {name!r}")
            return 200, _policy(stored)
        case "PUT", ["policies", name]:
            return 200, await _store_policy(services, name, body)
        case "GET", ["reviews"]:
            from luthien_control.db.reviews import review_queue

            return 200, {"data": await review_queue(engine, limit=MAX_LIMIT)}
        case "GET", ["keys"]:
            from luthien_control.db.keys import list_keys

            return 200, {"data": [_key(k) for k in await list_keys(engine)]}
        case "POST", ["keys"]:
            return 201, await _create_key(services, body)
        case "DELETE", ["keys", name]:
            from luthien_control.db.keys import revoke_key

            return 200, _key(await revoke_key(engine, name))
    raise NotFound(f"no admin route /{'/'.join(parts)}")  # pragma: no cover - _ALLOWED


def _shape(parts: list[str]) -> tuple[str, ...]:
    """A route's shape: its fixed first part, then ``*`` for a name or an id."""
    return (parts[0], *("*" for _ in parts[1:])) if parts and parts[0] else ()


_ALLOWED: dict[tuple[str, ...], frozenset[str]] = {
    ("transactions",): frozenset({"GET"}),
    ("transactions", "*"): frozenset({"GET"}),
    ("policies",): frozenset({"GET"}),
    ("policies", "*"): frozenset({"GET", "PUT"}),
    ("keys",): frozenset({"GET", "POST"}),
    ("keys", "*"): frozenset({"DELETE"}),
    ("events",): frozenset({"GET"}),
    ("reviews",): frozenset({"GET"}),
}


def _key(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "prefix": info.prefix,
        "created_at": info.created_at,
        "revoked_at": info.revoked_at,
        "last_used_at": info.last_used_at,
        "active": info.active,
    }


def _policy(stored: Any) -> dict[str, Any]:
    return {"name": stored.name, "version": stored.version, "definition": stored.definition}


async def _create_key(services: Services, body: Any) -> dict[str, Any]:
    from luthien_control.db.keys import add_key, generate_key

    if not isinstance(body, dict) or set(body) - {"name"} or "name" not in body:
        raise MalformedRequest('the body must be {"name": "<key name>"}')
    name = body["name"]
    if not isinstance(name, str):
        raise MalformedRequest("the key name must be a string", param="name")
    value = generate_key()
    info = await add_key(services.engine, name, value)
    return {**_key(info), "key": value}  # the only time the value is ever shown


async def _store_policy(services: Services, name: str, body: Any) -> dict[str, Any]:
    from luthien_control.db.policies import save_policy
    from luthien_control.policies.loader import load_policy

    try:
        definition = load_policy(body).serialize()
    except PolicyConfigError as exc:
        raise MalformedRequest(exc.message, param=exc.path or None) from None
    return _policy(await save_policy(services.engine, name, definition, by="admin api"))


async def _send_events(
    services: Services,
    scope: MutableMapping[str, Any],
    where: Any,
    receive: Receive,
    send: Send,
    request_id: str,
) -> None:
    """One ``transaction`` event per transaction recorded from now on, until the client
    goes away. Each event's ``id`` is the record's ``seq``: a browser that reconnects
    sends it back as ``Last-Event-ID`` and gets what it missed. A comment line every
    ``KEEPALIVE_INTERVAL`` seconds keeps intermediaries from closing a quiet stream. When
    the database fails, an ``error`` event ends the stream (the client reconnects)."""
    from luthien_control.db.transactions import follow_transactions

    after = _last_event_id(scope["headers"])
    follower = follow_transactions(
        services.engine, where, interval=EVENTS_INTERVAL, after_seq=after
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (TRANSACTION_HEADER, request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})

    async def produce() -> None:
        quiet = 0.0
        try:
            async for batch in follower:
                if batch:
                    quiet = 0.0
                    body = b"".join(_event(row) for row in batch)
                else:
                    quiet += EVENTS_INTERVAL
                    if quiet < KEEPALIVE_INTERVAL:
                        continue
                    quiet, body = 0.0, b": keep-alive\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except LuthienError as exc:
            _, payload = error_status_and_body(exc, request_id)
            body = b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    producer = asyncio.ensure_future(produce())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The server is shutting down (its grace period over): end the stream quietly,
        # as any stream the proxy cuts; the browser reconnects to another worker.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": b"", "more_body": False}), 1.0
            )
    finally:
        for task in (producer, watcher):
            task.cancel()
        await asyncio.gather(producer, watcher, return_exceptions=True)
        await follower.aclose()


def _event(row: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: transaction\ndata: %s\n\n" % (
        row["seq"],
        orjson.dumps(row, default=str),
    )


def _last_event_id(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"last-event-id":
            text = value.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 18:
                raise MalformedRequest("Last-Event-ID must be an event id this stream sent")
            return int(text)
    return None
