"""The read-only admin JSON API under ``/admin/api/``, behind ``ADMIN_API_KEY``.

Without ``ADMIN_API_KEY`` every admin route answers 401: the API is off.
"""

from __future__ import annotations

import hmac
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qs

from luthien_control.app import Services
from luthien_control.exceptions import AuthenticationFailed, ClientError, NotFound
from luthien_control.logs import parse_since
from luthien_control.responses import send_error, send_json
from luthien_control.transaction import new_transaction_id

PREFIX = "/admin/api/"
MAX_LIMIT = 1000


def _authorize(services: Services, headers: list[tuple[bytes, bytes]]) -> None:
    expected = services.settings.admin_api_key
    if not expected:
        raise AuthenticationFailed("the admin API is disabled: set ADMIN_API_KEY to enable it")
    given = ""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthenticationFailed("invalid admin API key")


async def handle_admin(services: Services, scope: MutableMapping[str, Any], send: Any) -> None:
    request_id = new_transaction_id()
    try:
        _authorize(services, scope["headers"])
        if scope["method"] != "GET":
            raise ClientError("the admin API is read-only: use GET")
        parts = scope["path"][len(PREFIX) :].strip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        body = await _route(services, parts, query)
    except Exception as exc:
        await send_error(send, exc, request_id, dev=services.settings.dev)
        return
    await send_json(send, 200, body, request_id)


async def _route(services: Services, parts: list[str], query: dict[str, str]) -> Any:
    from luthien_control.db.keys import list_keys
    from luthien_control.db.policies import get_policy, list_policies
    from luthien_control.db.transactions import (
        TransactionFilter,
        get_transaction,
        list_transactions,
    )

    engine = services.engine
    match parts:
        case ["transactions"]:
            try:
                limit = min(int(query.get("limit", "50")), MAX_LIMIT)
            except ValueError as exc:
                raise ClientError("limit must be a number", param="limit") from exc
            where = TransactionFilter(
                outcome=query.get("outcome"),
                model=query.get("model"),
                key_name=query.get("key"),
                since=parse_since(query["since"], "since") if "since" in query else None,
            )
            return {"data": await list_transactions(engine, where, limit=max(limit, 1))}
        case ["transactions", transaction_id]:
            record = await get_transaction(engine, transaction_id)
            if record is None:
                raise NotFound(f"no transaction {transaction_id!r}")
            return record
        case ["policies"]:
            return {
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
        case ["policies", name]:
            stored = await get_policy(engine, name)
            if stored is None:
                raise NotFound(f"no policy {name!r}")
            return {"name": stored.name, "version": stored.version, "definition": stored.definition}
        case ["keys"]:
            return {
                "data": [
                    {
                        "name": k.name,
                        "prefix": k.prefix,
                        "created_at": k.created_at,
                        "revoked_at": k.revoked_at,
                        "active": k.active,
                    }
                    for k in await list_keys(engine)
                ]
            }
    raise NotFound(f"no admin route /{'/'.join(parts)}")
