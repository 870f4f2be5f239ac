"""Policies that prepare and send the backend request.

``SendBackendRequest`` is the hinge of a policy tree: members before it see the request,
members after it see the response.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import orjson
from pydantic import field_validator

from luthien_control.decoding import decode_response, decoded_stream
from luthien_control.exceptions import ConfigurationError, MalformedRequest, PolicyError
from luthien_control.policies.base import HttpUrl, Policy, PolicyConfig
from luthien_control.responses import HOP_BY_HOP
from luthien_control.transaction import ProxyResponse, ResponseStream, Transaction
from luthien_control.upstream.client import DOT_SEGMENT_REFUSED, REDACTED, has_dot_segment

# Request headers that carry the client's own credentials: ``ClientApiKeyAuth`` takes the
# client key from the first two. The backend gets the backend key, never the client's.
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
# Request headers that describe one hop, that the proxy sets itself, or that carry the
# client's credentials.
_NOT_FORWARDED = HOP_BY_HOP | {"accept-encoding", "cookie", "expect", "host", *CLIENT_KEY_HEADERS}
# A key shorter than this is looked for as a whole header value only, and is not
# redacted from a backend's error answer: any text holds a short string somewhere.
MIN_KEY_CHARS = 8
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110: a header name
_NOT_A_KEY_HEADER = HOP_BY_HOP | {"host", "cookie", "content-type", "accept-encoding"}


def credentials(values: Iterable[str]) -> list[str]:
    """The credentials in header values: each comma-separated part, without the scheme
    that precedes it (``Bearer sk-...`` gives ``sk-...``)."""
    found = []
    for value in values:
        for part in value.split(","):
            scheme, space, credential = part.strip().partition(" ")
            credential = credential.strip() if space else scheme
            if credential:
                found.append(credential)
    return found


def client_keys(headers: dict[str, str]) -> list[str]:
    """The client's own credentials, from the headers that carry them: never forwarded,
    stored or logged, wherever else the client copied them."""
    keys = credentials(headers[name] for name in CLIENT_KEY_HEADERS if name in headers)
    return [key for key in keys if len(key) >= MIN_KEY_CHARS]


def redact_keys(text: str, keys: list[str]) -> str:
    """``text`` with each of ``keys`` replaced by ``[REDACTED]``."""
    for key in keys:
        if key in text:
            text = text.replace(key, REDACTED)
    return text


def backend_query(query: bytes, keys: list[str]) -> bytes:
    """The query as the backend gets it: a parameter holding the client's key (percent-
    decoded too: ``?api-key=...``) is left out."""
    if not keys or not query:
        return query
    kept = [part for part in query.split(b"&") if not _holds(unquote(part.decode("latin-1")), keys)]
    return b"&".join(kept)


def _holds(value: str, keys: list[str]) -> bool:
    return any(key in value if len(key) >= MIN_KEY_CHARS else key == value.strip() for key in keys)


def backend_request_headers(headers: dict[str, str]) -> dict[str, str]:
    """The client's headers as the backend gets them, before the backend key is added.

    The client key goes nowhere: the credential headers are dropped, and so is any other
    header whose value holds one of their values (a client that copies its key into
    ``api-key``, ``x-goog-api-key`` or a custom header)."""
    keys = credentials(headers[name] for name in CLIENT_KEY_HEADERS if name in headers)
    out = {
        name: value
        for name, value in headers.items()
        if name not in _NOT_FORWARDED
        and not name.startswith("x-luthien-")
        and not (keys and _holds(value, keys))
    }
    out["accept-encoding"] = "identity"  # policies read the body; streams stay uncompressed
    return out


def backend_keys(tx: Transaction, base_url: str) -> list[str]:
    """The credentials the proxy itself adds to the backend request, in every form it
    sends them: the values of ``tx.backend_headers``, and the backend URL's userinfo as
    written (percent-encoded), decoded, and as the ``Authorization: Basic`` credential
    the backend client makes of it (base64 of ``user:password``, without its padding:
    an echo may drop it). Only those long enough to redact (``MIN_KEY_CHARS``)."""
    keys = credentials(tx.backend_headers.values())
    if "@" in base_url:
        try:
            parts = urlsplit(base_url)
            user, password = parts.username, parts.password
        except ValueError:  # refused by the backend client anyway
            user = password = None
        if user is not None:
            for part in (user, password):
                if part:
                    keys.extend({part, unquote(part), quote(unquote(part), safe="")})
            basic = f"{unquote(user)}:{unquote(password or '')}"
            keys.append(base64.b64encode(basic.encode()).decode().rstrip("="))
    return [key for key in keys if len(key) >= MIN_KEY_CHARS]


def sent_keys(tx: Transaction) -> list[str]:
    """``backend_keys`` of this transaction: its backend URL as sent (before it is sent,
    as chosen)."""
    sent = tx.trail.backend_request
    url = sent["url"] if sent else tx.backend_url
    if url is None:
        url = getattr(tx.services, "default_backend_url", None)
    return backend_keys(tx, url or "")


def without_keys(data: bytes, keys: list[str]) -> bytes:
    """``data`` with every key, as written or as a JSON string escapes it, redacted."""
    for key in keys:
        raw = key.encode()
        for form in {raw, orjson.dumps(key)[1:-1]}:
            if form in data:
                data = data.replace(form, REDACTED.encode())
    return data


class SendBackendRequest(Policy):
    """Sends the request to the backend; what follows it in the tree acts on the response."""

    type_name = "SendBackendRequest"
    reads_content = False

    async def apply(self, tx: Transaction) -> None:
        if tx.response is not None:
            raise PolicyError(f"{self.name}: the transaction already has a response")
        request = tx.request
        services = tx.services
        if has_dot_segment(request.path):  # the edge refuses the client's; this, a policy's
            raise MalformedRequest(DOT_SEGMENT_REFUSED)
        base_url = tx.backend_url or services.default_backend_url
        url = base_url + request.path
        query = backend_query(request.query, client_keys(request.headers))
        if query:
            url += "?" + query.decode("latin-1")
        if request.wants_stream and tx.dialect.ask_for_usage(request.payload):
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
        # A client that asked for a stream parses the answer as one whatever its content
        # type says (the SDKs do): with a content policy in force, so does the proxy.
        if response.status < 400 and (
            response.is_event_stream or (tx.reads_content and request.wants_stream)
        ):
            stream = ResponseStream(decoded_stream(response_headers, response.iter_bytes()))
            tx.response = ProxyResponse(response.status, response_headers, stream=stream)
        else:
            body_bytes = await response.read()
            tx.timings.backend_ready = time.perf_counter()
            body_bytes = decode_response(tx, response_headers, body_bytes)  # decoding.py
            if response.status >= 400:
                body_bytes = self._unechoed(tx, base_url, response_headers, body_bytes)
            tx.trail.backend_body = body_bytes
            tx.response = ProxyResponse(response.status, response_headers, body_bytes)

    def _unechoed(
        self, tx: Transaction, base_url: str, headers: dict[str, str], body: bytes
    ) -> bytes:
        """A backend's error answer without the backend key it may quote ("Incorrect API
        key provided: ..."): neither the client nor the record gets it. ``headers`` are
        cleaned in place."""
        keys = backend_keys(tx, base_url)
        if not keys:
            return body
        cleaned = without_keys(body, keys)
        echoed = cleaned != body
        for name, value in headers.items():
            if _holds(value, keys):
                headers[name] = without_keys(value.encode("latin-1"), keys).decode("latin-1")
                echoed = True
        if echoed:
            tx.record(
                self.name, "redacted", "the backend key, quoted in the backend's error answer"
            )
        return cleaned


class AddApiKeyHeader(Policy):
    """Authenticates to the backend: ``OPENAI_API_KEY`` as ``Authorization: Bearer``, or
    on Anthropic's Messages API ``ANTHROPIC_API_KEY`` as ``x-api-key`` (from the settings)."""

    type_name = "AddApiKeyHeader"
    reads_content = False

    async def on_request(self, tx: Transaction) -> None:
        settings = tx.services.settings
        if tx.dialect.vendor == "anthropic":
            if settings.anthropic_api_key:
                tx.backend_headers["x-api-key"] = settings.anthropic_api_key
        elif settings.openai_api_key:
            tx.backend_headers["authorization"] = f"Bearer {settings.openai_api_key}"


class AddApiKeyHeaderFromEnv(Policy):
    """Authenticates to the backend with the key in the named environment variable, as
    ``Authorization: Bearer <key>`` or, with another ``header_name`` (``x-api-key``), as
    the bare key in that header."""

    type_name = "AddApiKeyHeaderFromEnv"
    reads_content = False

    class Config(PolicyConfig):
        api_key_env_var_name: str
        header_name: str = "Authorization"

        @field_validator("header_name")
        @classmethod
        def _header_name(cls, value: str) -> str:
            if not _TOKEN.fullmatch(value):
                raise ValueError("must be an HTTP header name")
            if value.lower() in _NOT_A_KEY_HEADER:
                raise ValueError(f"{value} cannot carry the backend key: the proxy manages it")
            return value

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.variable = config.api_key_env_var_name
        self.header = config.header_name.lower()

    async def on_request(self, tx: Transaction) -> None:
        key = os.environ.get(self.variable)
        if not key:
            raise ConfigurationError(
                f"{self.name}: the environment variable {self.variable} is not set"
            )
        tx.backend_headers[self.header] = f"Bearer {key}" if self.header == "authorization" else key


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
