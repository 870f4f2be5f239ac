"""The policy abstraction: a hook on the request, a hook on the response, a stream transform.

A policy tree is applied in order with ``apply(tx)``. Position decides the side: until
``SendBackendRequest`` has run, ``tx.response`` is ``None`` and ``on_request`` is called;
after it, ``on_response`` sees a buffered response, and a streamed response gets the
policy's ``stream_transform`` appended to its chain.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal

import regex
from pydantic import AfterValidator, BaseModel, ConfigDict

from luthien_control.exceptions import PolicyBlocked
from luthien_control.transaction import StreamTransform, Transaction


def _check_pattern(pattern: str) -> str:
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from exc
    return pattern


def _check_http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


# Config value types more than one policy takes.
RegexPattern = Annotated[str, AfterValidator(_check_pattern)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


class PolicyConfig(BaseModel):
    """Base of every policy's config model: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str | None = None


BlockWith = Literal["error", "message"]


class BlockingConfig(PolicyConfig):
    """Config of a policy that can block. ``block_with: message`` answers a block with a
    normal, complete answer in the client's dialect that says what was blocked and why
    (an agent takes it as the model's reply instead of retrying an error); ``error``
    (the default) answers 403, or ends a stream with the dialect's error event."""

    block_with: BlockWith = "error"


class Policy:
    """Base of every control policy.

    Subclasses set ``type_name`` (the ``type`` in a policy file), declare their config
    as a ``PolicyConfig`` subclass in ``Config``, and override the hooks they need.
    ``config`` is the validated model; ``raw_config`` the mapping exactly as given, so
    that ``serialize()`` round-trips. Composite policies build their members from
    ``raw_config`` in ``__init__`` through ``policies.loader``.

    ``reads_content`` says whether the policy reads request or response bodies: true
    unless a policy says otherwise, so a custom policy is assumed to. While one in the
    tree does, bodies are decoded strictly or refused (``luthien_control.decoding``).
    """

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    reads_content: bool = True

    def __init__(self, config: PolicyConfig, raw_config: dict[str, Any]) -> None:
        self.config = config
        self.raw_config = raw_config
        self.name = config.name or self.type_name
        # The name this policy was loaded under (an alias such as CompoundPolicy, or an
        # import path); serialize() gives it back so that a round trip is exact.
        self.loaded_as = self.type_name

    async def apply(self, tx: Transaction) -> None:
        response = tx.response
        if response is None:
            await self.on_request(tx)
        elif response.stream is None:
            await self.on_response(tx)
        else:
            transform = self.stream_transform(tx)
            if transform is not None:
                response.stream.transforms.append(transform)

    async def on_request(self, tx: Transaction) -> None:
        """Inspect or change ``tx.request`` (or raise ``PolicyBlocked``)."""

    async def on_response(self, tx: Transaction) -> None:
        """Inspect or change a buffered ``tx.response``."""

    def stream_transform(self, tx: Transaction) -> StreamTransform | None:
        """A transform for this transaction's streamed response, or None to leave it alone."""
        return None

    def refuse(self, message: str) -> PolicyBlocked:
        """The ``PolicyBlocked`` this policy raises, ending as its ``block_with`` says."""
        block_with = getattr(self.config, "block_with", "error")
        return PolicyBlocked(message, policy=self.name, as_message=block_with == "message")

    def children(self) -> list[Policy]:
        """The policies this one contains (composites override it)."""
        return []

    def walk(self) -> Iterator[Policy]:
        """This policy and every policy below it, depth first."""
        yield self
        for child in self.children():
            yield from child.walk()

    @cached_property
    def tree_reads_content(self) -> bool:
        """Whether this policy or one below it reads bodies (worked out once per tree)."""
        return any(policy.reads_content for policy in self.walk())

    def serialize(self) -> dict[str, Any]:
        """``{"type": ..., "config": {...}}``, exactly as it was loaded."""
        return {"type": self.loaded_as, "config": copy.deepcopy(self.raw_config)}
