"""The chat request check: its fast path never accepts what pydantic's model refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from luthien_control.dialects.chat import _ChatRequest, _plainly_valid, validate_chat_request
from luthien_control.exceptions import MalformedRequest

BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": []},
    ],
    "stream": True,
    "stream_options": {"include_usage": True},
    "n": 1,
    "temperature": 0.5,
    "top_p": 1.0,
    "max_tokens": 10,
    "max_completion_tokens": 10,
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "user": "someone",  # unknown fields are the backend's business
}
MISSING = object()
VALUES: list[Any] = [
    MISSING,
    None,
    "text",
    "",
    0,
    7,
    -1,
    1.5,
    0.0,
    True,
    False,
    [],
    ["text"],
    [{}],
    [{"role": "user"}],
    [{"role": 1}],
    [{"role": "user", "content": ["part"]}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [None],
    {},
    {"include_usage": True},
    {"include_usage": 1},
    {"include_usage": None},
]


def variants() -> list[dict[str, Any]]:
    """The base request with each field (top level, first message, stream options) set
    to each value of VALUES in turn."""
    out = [copy.deepcopy(BASE)]
    paths: list[tuple[str, ...]] = [(key,) for key in BASE if key != "user"]
    paths += [("messages", "0", "role"), ("messages", "0", "content"), ("messages", "0")]
    paths += [("stream_options", "include_usage"), ("tools", "0")]
    for path in paths:
        for value in VALUES:
            payload = copy.deepcopy(BASE)
            holder: Any = payload
            for step in path[:-1]:
                holder = holder[int(step)] if isinstance(holder, list) else holder[step]
            last: Any = int(path[-1]) if isinstance(holder, list) else path[-1]
            if value is MISSING:
                if isinstance(holder, list):
                    continue
                holder.pop(last, None)
            else:
                holder[last] = copy.deepcopy(value)
            out.append(payload)
    return out


def pydantic_accepts(payload: dict[str, Any]) -> bool:
    try:
        _ChatRequest.model_validate(payload)
    except ValidationError:
        return False
    return True


def test_the_fast_path_accepts_only_what_the_model_accepts() -> None:
    cases = variants()
    fast = [payload for payload in cases if _plainly_valid(payload)]
    assert len(cases) > 250 and len(fast) > 40  # both paths are exercised
    refused = [payload for payload in fast if not pydantic_accepts(payload)]
    assert refused == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": True}, "invalid value for 'n': Input should be a valid integer"),
        ({"temperature": "hot"}, "invalid value for 'temperature': Input should be a valid"),
        ({"messages": [{"content": "hi"}]}, "invalid value for 'messages[0].role': Field required"),
    ],
)
def test_what_the_fast_path_leaves_gets_pydantics_words(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedRequest) as caught:
        validate_chat_request({**BASE, **change})
    assert caught.value.message.startswith(message)
