"""The models the mock serves: a fixed list, plus any name that starts with ``mock-`` or
``claude-`` (the models Claude Code and the Anthropic SDK ask for)."""

from __future__ import annotations

from typing import Any

KNOWN_MODELS = (
    "gpt-3.5-turbo",
    "gpt-4",
    "gpt-4o",
    "gpt-4o-mini",
    "mock-model",
    "text-embedding-3-small",
)
MOCK_MODEL_PREFIX = "mock-"
CLAUDE_MODEL_PREFIX = "claude-"
CREATED = 1700000000
OWNER = "luthien-mock"


def is_known_model(name: str) -> bool:
    return name in KNOWN_MODELS or name.startswith((MOCK_MODEL_PREFIX, CLAUDE_MODEL_PREFIX))


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": OWNER}


def model_list() -> dict[str, Any]:
    return {"object": "list", "data": [model_object(name) for name in KNOWN_MODELS]}
