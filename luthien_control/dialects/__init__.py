"""API dialects: one module per API, each the only place that knows its JSON shapes.

``dialect_for(path)`` picks the dialect of a request from its path relative to the API
root; the transaction keeps it as ``tx.dialect``. See ``base.Dialect`` for the interface.
"""

from __future__ import annotations

from luthien_control.dialects.base import Dialect, Released, StreamAssembler, TextSlot
from luthien_control.dialects.chat import ChatDialect
from luthien_control.dialects.completions import CompletionsDialect, EmbeddingsDialect
from luthien_control.dialects.messages import AnthropicDialect, MessagesDialect
from luthien_control.dialects.responses import ResponsesDialect

RAW = Dialect()
CHAT = ChatDialect()
RESPONSES = ResponsesDialect()
MESSAGES = MessagesDialect()
ANTHROPIC = AnthropicDialect()
COMPLETIONS = CompletionsDialect()
EMBEDDINGS = EmbeddingsDialect()

_BY_PATH: dict[str, Dialect] = {
    "/chat/completions": CHAT,
    "/responses": RESPONSES,
    "/messages": MESSAGES,
    "/completions": COMPLETIONS,
    "/embeddings": EMBEDDINGS,
}


def dialect_for(path: str) -> Dialect:
    """The dialect of a request to ``path`` (``/chat/completions``; a query excluded)."""
    dialect = _BY_PATH.get(path)
    if dialect is not None:
        return dialect
    if path.startswith("/messages/"):
        return ANTHROPIC
    return RAW


__all__ = [
    "ANTHROPIC",
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "MESSAGES",
    "RAW",
    "RESPONSES",
    "Dialect",
    "Released",
    "StreamAssembler",
    "TextSlot",
    "dialect_for",
]
