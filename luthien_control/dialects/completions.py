"""OpenAI's legacy completions (``/completions``) and embeddings (``/embeddings``).

Completions: a ``prompt`` (a string or strings) in; ``choices[].text`` out, streamed as
chunks whose ``text`` the SDK joins per choice, ended by ``data: [DONE]``. Embeddings:
text only in the request's ``input``.
"""

from __future__ import annotations

from typing import Any

from luthien_control.dialects.base import ChannelKey, Dialect, Released, TextSlot
from luthien_control.dialects.chat import ChatDialect
from luthien_control.sse import Chunk


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
    injects_usage = False

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
