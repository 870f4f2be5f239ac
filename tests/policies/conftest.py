import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, StreamTransform, Transaction

# Policies for the tests, importable by path as ``luthien_test_policies:<Class>``.
POLICY_MODULE = "luthien_test_policies"
POLICY_SOURCE = '''
from typing import Any

from luthien_control.exceptions import PolicyBlocked, PolicyConfigError
from luthien_control.policies.base import Policy, PolicyConfig


class Recorder(Policy):
    """Notes that it was applied, under its name."""

    type_name = "Recorder"

    async def apply(self, tx):
        tx.record(self.name, "applied")


class Blocker(Policy):
    type_name = "Blocker"

    async def apply(self, tx):
        tx.record(self.name, "blocked")
        raise PolicyBlocked("blocked by test", policy=self.name)


class Patterns(Policy):
    type_name = "Patterns"

    class Config(PolicyConfig):
        patterns: list[str]
        limits: dict[str, int] = {}


class BadInit(Policy):
    """Rejects its config in __init__, with a path relative to itself."""

    def __init__(self, config: PolicyConfig, raw_config: dict[str, Any]) -> None:
        raise PolicyConfigError("rejected by __init__", path="config.name")


class NotAPolicy:
    pass
'''


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def policy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of an importable module holding the test policies."""
    (tmp_path / f"{POLICY_MODULE}.py").write_text(textwrap.dedent(POLICY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield POLICY_MODULE
    sys.modules.pop(POLICY_MODULE, None)


def _make_tx(payload: Any) -> Transaction:
    body = orjson.dumps(payload)
    request = ProxyRequest("POST", "/chat/completions", b"", {}, body)
    return Transaction(request=request, services=None)


@pytest.fixture
def make_tx() -> Callable[[Any], Transaction]:
    """Builds a chat-completion transaction (before the backend) with the given payload."""
    return _make_tx


@pytest.fixture
def tx() -> Transaction:
    """A chat-completion transaction, before the backend."""
    return _make_tx(
        {
            "model": "gpt-4o",
            "max_tokens": 100,
            "temperature": 0.5,
            "tags": ["alpha", "beta"],
            "metadata": {"team": "red"},
            "messages": [{"role": "user", "content": "Hello there"}],
        }
    )


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> Chunk:
    """A chat-completion chunk with ``delta`` (and ``content``) in its only choice."""
    if content is not None:
        delta["content"] = content
    data = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return Chunk(b"data: " + orjson.dumps(data) + b"\n\n")


async def through(transform: StreamTransform, chunks: list[Chunk]) -> list[Chunk]:
    """What a stream transform lets out of ``chunks``, its end included."""
    out: list[Chunk] = []
    for c in chunks:
        out.extend(await transform.on_chunk(c))
    out.extend(await transform.on_end())
    return out
