"""Client authentication: the caller must present an active stored key."""

from __future__ import annotations

from luthien_control.exceptions import AuthenticationFailed
from luthien_control.policies.base import Policy
from luthien_control.transaction import Transaction


class ClientApiKeyAuth(Policy):
    """``Authorization: Bearer <key>`` must be an active key (checked against the cache)."""

    type_name = "ClientApiKeyAuth"
    reads_content = False

    async def on_request(self, tx: Transaction) -> None:
        header = tx.request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "missing client API key: send it as 'Authorization: Bearer <key>'"
            )
        name = tx.services.keys.name_for(key)
        if name is None:
            raise AuthenticationFailed("invalid client API key")
        tx.client_key_name = name
