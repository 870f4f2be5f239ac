"""``SerialPolicy`` (alias ``CompoundPolicy``): members applied one after another."""

from __future__ import annotations

from typing import Any

from luthien_control.policies.base import Policy, PolicyConfig
from luthien_control.policies.loader import build_member, join_path
from luthien_control.transaction import Transaction


class SerialPolicy(Policy):
    """Applies its members in order; a member that raises ends the chain.

    Position in ``policies`` decides the side: members before ``SendBackendRequest``
    see the request, members after it the response.
    """

    type_name = "SerialPolicy"
    reads_content = False  # its members say for themselves

    class Config(PolicyConfig):
        # Members are checked by the loader, at their own paths (``policies[i]``).
        policies: list[Any]

    def __init__(self, config: PolicyConfig, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        if not isinstance(config, SerialPolicy.Config):
            raise TypeError(f"expected SerialPolicy.Config, got {type(config).__name__}")
        self.policies: list[Policy] = [
            build_member(member, join_path("policies", i))
            for i, member in enumerate(config.policies)
        ]

    def children(self) -> list[Policy]:
        return list(self.policies)

    async def apply(self, tx: Transaction) -> None:
        for policy in self.policies:
            await policy.apply(tx)
