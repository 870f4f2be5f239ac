"""Errors become HTTP here, and only here: OpenAI's error shape, as JSON or as an event."""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

from luthien_control.exceptions import LuthienError
from luthien_control.upstream.client import REDACTED, display_url

logger = logging.getLogger(__name__)

TRANSACTION_HEADER = b"x-luthien-transaction-id"

# Headers that describe one hop of the connection (RFC 9110 7.6.1): never forwarded,
# in either direction, nor is the length of a body the proxy may rewrite.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
JSON_CONTENT_TYPE = b"application/json"

# What a dev ``detail`` must not show: URLs (userinfo, query credentials), a credential
# after an auth scheme, and the value after a credential's name (a header, a parameter).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SCHEME_VALUE = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[^\s'\",;)]+")
_NAMED_VALUE = re.compile(
    r"(?i)((?:authorization|api[-_]?key|token|secret|passw(?:or)?d|cookie)['\"]?\s*[:=]\s*['\"]?)"
    r"[^'\"\s,;&})]+"
)

STREAM_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]


def error_status_and_body(
    exc: BaseException, transaction_id: str, *, dev: bool = False
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped ``{"error": {...}}`` for any exception.

    A ``LuthienError`` keeps its own status and message; anything else is a bug of the
    proxy: 500, logged with its traceback, and the message names the transaction id so
    that the log entry can be found. ``dev`` adds the exception's details.
    """
    if isinstance(exc, LuthienError):
        status = exc.status_code
        error: dict[str, Any] = {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        }
        if status >= 500 and dev and exc.__cause__ is not None:
            error["detail"] = safe_detail(exc.__cause__)
    else:
        logger.error("internal error in transaction %s", transaction_id, exc_info=exc)
        status = 500
        error = {
            "message": f"internal error in the proxy (transaction {transaction_id})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
        if dev:
            error["detail"] = safe_detail(exc)
    error["transaction_id"] = transaction_id
    return status, {"error": error}


def safe_detail(exc: BaseException) -> str:
    """``repr(exc)`` for a dev error body, with nothing in it that could be a secret: a
    lower layer's error may quote the backend URL or a header. URLs are shown as
    ``display_url`` shows them; credentials (after ``Bearer``, after a name such as
    ``x-api-key`` or ``token=``, or matching a known secret pattern) become
    ``[REDACTED]``."""
    from luthien_control.policies.secrets import default_secrets  # policies import this module

    text = _URL.sub(lambda match: display_url(match.group()), repr(exc))
    text = _SCHEME_VALUE.sub(rf"\1\2{REDACTED}", text)
    text = _NAMED_VALUE.sub(rf"\1{REDACTED}", text)
    return default_secrets().redact(text)[0]


def json_headers(body: bytes, transaction_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", JSON_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
        (TRANSACTION_HEADER, transaction_id.encode()),
    ]


async def send_json(send: Any, status: int, payload: Any, transaction_id: str) -> bytes:
    """Send a complete JSON response (ASGI); returns the body sent."""
    body = orjson.dumps(payload, default=str)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": json_headers(body, transaction_id),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return body


async def send_error(send: Any, exc: BaseException, transaction_id: str, *, dev: bool) -> int:
    status, payload = error_status_and_body(exc, transaction_id, dev=dev)
    await send_json(send, status, payload, transaction_id)
    return status


def error_event(exc: BaseException, transaction_id: str, *, dev: bool) -> bytes:
    """The last event of a stream that failed after it began (no ``[DONE]`` follows)."""
    _, payload = error_status_and_body(exc, transaction_id, dev=dev)
    return b"data: " + orjson.dumps(payload) + b"\n\n"
