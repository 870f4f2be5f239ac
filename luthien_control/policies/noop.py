"""``NoopPolicy``: a policy that does nothing (a placeholder, or an empty branch)."""

from __future__ import annotations

from luthien_control.policies.base import Policy
from luthien_control.transaction import Transaction


class NoopPolicy(Policy):
    """Does nothing, on either side."""

    type_name = "NoopPolicy"
    reads_content = False

    async def apply(self, tx: Transaction) -> None:
        return None
