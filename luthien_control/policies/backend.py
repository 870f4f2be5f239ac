"""Policies that prepare and send the backend request.

``SendBackendRequest`` is the hinge of a policy tree: members before it see the request,
members after it see the response.
"""

from __future__ import annotations

import os
import time
from typing import Any

from luthien_control.chat import client_wants_usage
from luthien_control.decoding import decode_response, decoded_stream
from luthien_control.exceptions import ConfigurationError, PolicyError
from luthien_control.policies.base import HttpUrl, Policy, PolicyConfig
from luthien_control.responses import HOP_BY_HOP
from luthien_control.transaction import ProxyResponse, ResponseStream, Transaction

# Request headers that describe one hop, that the proxy sets itself, or that carry the
# client's own credentials (the backend gets the backend key, never the client's).
_NOT_FORWARDED = HOP_BY_HOP | {"accept-encoding", "authorization", "cookie", "expect", "host"}


def backend_request_headers(headers: dict[str, str]) -> dict[str, str]:
    out = {
        name: value
        for name, value in headers.items()
        if name not in _NOT_FORWARDED and not name.startswith("x-luthien-")
    }
    out["accept-encoding"] = "identity"  # policies read the body; streams stay uncompressed
    return out


class SendBackendRequest(Policy):
    """Sends the request to the backend; what follows it in the tree acts on the response."""

    type_name = "SendBackendRequest"
    reads_content = False

    async def apply(self, tx: Transaction) -> None:
        if tx.response is not None:
            raise PolicyError(f"{self.name}: the transaction already has a response")
        request = tx.request
        services = tx.services
        url = (tx.backend_url or services.default_backend_url) + request.path
        if request.query:
            url += "?" + request.query.decode("latin-1")
        if request.is_chat_completion and request.wants_stream:
            payload = request.payload
            if not client_wants_usage(payload):
                # Usage is recorded for every stream; the relay hides it again.
                options = payload.get("stream_options")
                payload["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                request.mark_changed()
                tx.usage_injected = True
        headers = backend_request_headers(request.headers)
        headers.update(tx.backend_headers)
        body = request.body or None
        tx.trail.backend_request = {
            "method": request.method,
            "url": url,
            "headers": headers,
            "body": body,
        }
        tx.timings.backend_sent = time.perf_counter()
        response = await tx.resources.enter_async_context(
            services.backend.open(request.method, url, headers, body)
        )
        tx.timings.backend_first_byte = time.perf_counter()
        response_headers = dict(response.headers)  # lower-case names, repeats joined
        tx.trail.backend_status = response.status
        tx.trail.backend_headers = response_headers
        if response.is_event_stream and response.status < 400:
            stream = ResponseStream(decoded_stream(response_headers, response.iter_bytes()))
            tx.response = ProxyResponse(response.status, response_headers, stream=stream)
        else:
            body_bytes = await response.read()
            tx.timings.backend_ready = time.perf_counter()
            body_bytes = decode_response(tx, response_headers, body_bytes)  # decoding.py
            tx.trail.backend_body = body_bytes
            tx.response = ProxyResponse(response.status, response_headers, body_bytes)


class AddApiKeyHeader(Policy):
    """Authenticates to the backend with ``OPENAI_API_KEY`` (from the settings)."""

    type_name = "AddApiKeyHeader"
    reads_content = False

    async def on_request(self, tx: Transaction) -> None:
        key = tx.services.settings.openai_api_key
        if key:
            tx.backend_headers["authorization"] = f"Bearer {key}"


class AddApiKeyHeaderFromEnv(Policy):
    """Authenticates to the backend with the key in the named environment variable."""

    type_name = "AddApiKeyHeaderFromEnv"
    reads_content = False

    class Config(PolicyConfig):
        api_key_env_var_name: str

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.variable = config.api_key_env_var_name

    async def on_request(self, tx: Transaction) -> None:
        key = os.environ.get(self.variable)
        if not key:
            raise ConfigurationError(
                f"{self.name}: the environment variable {self.variable} is not set"
            )
        tx.backend_headers["authorization"] = f"Bearer {key}"


class SetBackendPolicy(Policy):
    """Chooses the backend (its base URL, such as ``https://api.openai.com/v1``)."""

    type_name = "SetBackendPolicy"
    reads_content = False

    class Config(PolicyConfig):
        backend_url: HttpUrl

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.backend_url = config.backend_url.rstrip("/")

    async def on_request(self, tx: Transaction) -> None:
        tx.backend_url = self.backend_url


class ModelNameReplacement(Policy):
    """Rewrites the requested ``model`` through a mapping (``{"fast": "gpt-4o-mini"}``)."""

    type_name = "ModelNameReplacement"

    class Config(PolicyConfig):
        model_mapping: dict[str, str]

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.mapping = dict(config.model_mapping)

    async def on_request(self, tx: Transaction) -> None:
        payload = tx.request.payload
        if not isinstance(payload, dict):
            return
        model = payload.get("model")
        if isinstance(model, str) and model in self.mapping:
            payload["model"] = self.mapping[model]
            tx.request.mark_changed()
            tx.record(self.name, "changed", f"model {model} -> {payload['model']}")
