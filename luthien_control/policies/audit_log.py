"""Writes the transaction to the application log, with every secret redacted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import orjson

from luthien_control.dialects.base import TextSlot, joined_slots
from luthien_control.policies.backend import client_keys, redact_keys, sent_keys
from luthien_control.policies.base import Policy, PolicyConfig
from luthien_control.policies.secrets import (
    SecretPattern,
    copy_json,
    default_secrets,
    joined_secrets,
    rewrite_json,
)
from luthien_control.sse import Chunk
from luthien_control.transaction import Message, StreamTransform, Transaction

logger = logging.getLogger("luthien_control.policies.transaction_log")

SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"}
)
_SECRETS = default_secrets()


def _secrets(tx: Transaction) -> SecretPattern:
    """The patterns, and the keys the proxy sent the backend in ``tx`` (literals)."""
    return _SECRETS.with_literals(sent_keys(tx))


def redacted_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: ("[REDACTED]" if k in SECRET_HEADERS else v) for k, v in headers.items()}


def redacted_body(
    message: Message,
    slots: Callable[[Any], list[TextSlot]] | None = None,
    secrets: SecretPattern = _SECRETS,
) -> Any:
    """The body as JSON (or text) with every known secret pattern replaced, in every
    decoded string and object key (a copy: the message is not touched). ``slots`` finds
    the strings read as one text (a dialect's ``request_slots``, ``answer_slots``): a key
    split across them is redacted too."""
    payload = message.payload
    if payload is None:
        return secrets.scrub(message.body.decode("utf-8", "replace"))
    copy = copy_json(payload)
    if slots is not None:
        _redact_joined(secrets, slots(copy))
    return rewrite_json(copy, secrets.scrub)[0]


def _redact_joined(secrets: SecretPattern, slots: list[TextSlot]) -> None:
    for group in joined_slots(slots):
        joined_secrets(secrets, group, redact=True)


class TransactionContextLoggingPolicy(Policy):
    """Logs the request (before the backend) or the response (after it), secrets redacted."""

    type_name = "TransactionContextLoggingPolicy"

    class Config(PolicyConfig):
        log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.level = logging.getLevelName(config.log_level)

    def _log(self, tx: Transaction, side: str, entry: dict[str, Any]) -> None:
        if logger.isEnabledFor(self.level):
            record = {"transaction_id": tx.id, "side": side, **entry}
            # Every decoded string and key of what is logged (path, headers, body,
            # assembled stream), never the serialized line: no escape hides a key; nor
            # the client's own key, wherever the client copied it, nor the keys the
            # proxy sent the backend, whatever their shape.
            keys = client_keys(tx.request.headers)
            secrets = _secrets(tx)
            rewrite_json(record, lambda text: redact_keys(secrets.scrub(text), keys))
            logger.log(self.level, "%s", orjson.dumps(record).decode())

    async def on_request(self, tx: Transaction) -> None:
        if not logger.isEnabledFor(self.level):
            return
        request = tx.request
        self._log(
            tx,
            "request",
            {
                "method": request.method,
                "path": request.path,
                "headers": redacted_headers(request.headers),
                "body": redacted_body(request, tx.dialect.request_slots, _secrets(tx)),
                "client_key_name": tx.client_key_name,
            },
        )

    async def on_response(self, tx: Transaction) -> None:
        response = tx.response
        if response is None or not logger.isEnabledFor(self.level):
            return
        self._log(
            tx,
            "response",
            {
                "status": response.status,
                "headers": redacted_headers(response.headers),
                "body": redacted_body(response, tx.dialect.answer_slots, _secrets(tx)),
            },
        )

    def stream_transform(self, tx: Transaction) -> StreamTransform | None:
        if not logger.isEnabledFor(self.level):
            return None
        return _StreamLog(self, tx)


class _StreamLog:
    """Passes every chunk on untouched; logs the assembled message when the stream ends."""

    def __init__(self, policy: TransactionContextLoggingPolicy, tx: Transaction) -> None:
        self._policy = policy
        self._tx = tx
        self._assembler = tx.dialect.new_assembler()

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        self._assembler.feed(chunk.data)
        return [chunk]

    async def on_end(self) -> list[Chunk]:
        tx = self._tx
        summary = self._assembler.summary()  # chunks, and the message(s) the stream spelled
        _redact_joined(_secrets(tx), tx.dialect.assembled_slots(summary))
        self._policy._log(  # redacts what it logs
            tx,
            "response",
            {
                "status": tx.response.status if tx.response else None,
                "streamed": True,
                **summary,
            },
        )
        return []
