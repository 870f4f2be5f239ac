"""OpenAI's legacy completions (``/completions``) and embeddings (``/embeddings``).

Completions: a ``prompt`` (a string or strings) in; ``choices[].text`` out, streamed as
chunks whose ``text`` the SDK joins per choice, ended by ``data: [DONE]``. Embeddings:
text only in the request's ``input``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from luthien_control.dialects.base import (
    ChannelKey,
    Dialect,
    Released,
    TextSlot,
    request_model,
    sse,
)
from luthien_control.dialects.chat import ChatDialect
from luthien_control.sse import DONE_EVENT, Chunk

if TYPE_CHECKING:
    from luthien_control.transaction import Transaction


def _strings_of(payload: Any, name: str) -> list[TextSlot]:
    """``payload[name]`` when it is a string, or each string of it when it is a list."""
    if not isinstance(payload, dict):
        return []
    value = payload.get(name)
    if isinstance(value, str):
        return [TextSlot((name,), payload, name, "text")]
    if isinstance(value, list):
        return [
            TextSlot((name, index), value, index, "text")
            for index, item in enumerate(value)
            if isinstance(item, str)
        ]
    return []


class CompletionsDialect(ChatDialect):
    """``POST /completions``: chat's stream rules, ``choices[].text`` for the text."""

    name = "completions"

    def ask_for_usage(self, payload: Any) -> bool:
        return False

    def usage_book(self, tx: Transaction) -> None:
        return None

    def validate_request(self, payload: Any) -> None:
        pass  # the backend's business

    def request_slots(self, payload: Any) -> list[TextSlot]:
        return _strings_of(payload, "prompt")

    def answer_slots(self, payload: Any) -> list[TextSlot]:
        choices = payload.get("choices") if isinstance(payload, dict) else None
        return [
            TextSlot((choice.get("index", 0),), choice, "text", "text")
            for choice in (choices if isinstance(choices, list) else ())
            if isinstance(choice, dict) and isinstance(choice.get("text"), str)
        ]

    def text_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        choices = data.get("choices")
        if not choices or not isinstance(choices, list):
            return []
        return [
            TextSlot((choice.get("index", 0), "text", -1), choice, "text", "text")
            for choice in choices
            if isinstance(choice, dict) and isinstance(choice.get("text"), str)
        ]

    def release(self, chunk: Chunk, data: dict[str, Any], held: list[Released]) -> list[Chunk]:
        by_index = {c.get("index", 0): c for c in data.get("choices") or () if isinstance(c, dict)}
        for piece in held:
            choice = by_index.get(piece.key[0])
            if choice is not None:
                choice["text"] = (choice.get("text") or "") + piece.text
        chunk.mark_changed()
        return [chunk]

    def release_at_end(self, held: list[Released], template: dict[str, Any]) -> list[Chunk]:
        texts: dict[int, str] = {}
        for piece in held:
            texts[piece.key[0]] = texts.get(piece.key[0], "") + piece.text
        choices = [{"index": index, "text": texts[index]} for index in sorted(texts)]
        return [Chunk.from_data({**template, "choices": choices})]

    def blocked_answer(self, notice: str, tx: Transaction) -> bytes | None:
        choice = {"index": 0, "text": notice, "logprobs": None, "finish_reason": "stop"}
        return orjson.dumps({**self._head(tx), "choices": [choice]})

    def blocked_stream(self, notice: str, tx: Transaction) -> bytes | None:
        return self._ending(tx, [0], notice)

    def blocked_ending(self, notice: str, tx: Transaction, sent: Any) -> bytes | None:
        return self._ending(tx, sorted(sent.choices) or [0], "\n\n" + notice)

    def _ending(self, tx: Transaction, indexes: list[int], text: str) -> bytes:
        choices = [{"index": i, "text": text, "finish_reason": "stop"} for i in indexes]
        return sse({**self._head(tx), "choices": choices}) + DONE_EVENT

    @staticmethod
    def _head(tx: Transaction) -> dict[str, Any]:
        return {
            "id": f"cmpl-{tx.id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request_model(tx),
        }

    def emptied(self, data: dict[str, Any]) -> bool:
        choices = data.get("choices") or ()
        return "usage" not in data and all(
            isinstance(c, dict) and not c.get("finish_reason") and c.get("text") == ""
            for c in choices
        )


class EmbeddingsDialect(Dialect):
    """``POST /embeddings``: text in the request only."""

    name = "embeddings"

    def request_slots(self, payload: Any) -> list[TextSlot]:
        return _strings_of(payload, "input")


__all__ = ["ChannelKey", "CompletionsDialect", "EmbeddingsDialect"]
