"""Client authentication: the caller must present an active stored key."""

from __future__ import annotations

from luthien_control.exceptions import AuthenticationFailed
from luthien_control.policies.base import Policy
from luthien_control.transaction import Transaction


class ClientApiKeyAuth(Policy):
    """The client key, as ``Authorization: Bearer <key>`` (OpenAI's SDKs) or as
    ``x-api-key: <key>`` (Anthropic's, Claude Code), must be an active key (checked
    against the cache). Neither header reaches the backend (``backend_request_headers``)."""

    type_name = "ClientApiKeyAuth"
    reads_content = False

    async def on_request(self, tx: Transaction) -> None:
        headers = tx.request.headers
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        offered = [
            key
            for key in (
                bearer.strip() if scheme.lower() == "bearer" else "",
                headers.get("x-api-key", "").strip(),
            )
            if key
        ]
        if not offered:
            raise AuthenticationFailed(
                "missing client API key: send it as 'Authorization: Bearer <key>' "
                "or as 'x-api-key: <key>'"
            )
        keys = tx.services.keys
        for key in offered:
            name = keys.name_for(key)
            if name is not None:
                tx.client_key_name = name
                return
        raise AuthenticationFailed("invalid client API key")
