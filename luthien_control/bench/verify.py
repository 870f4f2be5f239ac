"""Before measuring: does every request through each side reach the backend exactly once?

A proxy that answered from a cache, retried behind the client's back or never forwarded
the ``x-mock-*`` directives would be measured doing something else than relaying. A few
tagged requests per side are sent, streamed and not, and the mock's request log must
then hold exactly those, each completed; through the proxy, the backend must have seen
the backend key, never the client's. Each API the run measures is checked (chat
completions, and Anthropic's Messages API).
"""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from luthien_control.bench.load import (
    answer_content,
    api_path,
    auth_headers,
    expected_content,
    request_body,
)

REQUESTS_PER_KIND = 3
TIMEOUT = 10.0


def _call(
    url: str, method: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _check_answer(status: int, raw: bytes, stream: bool, expected: str, api: str) -> str | None:
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    if not stream:
        content = answer_content(api, raw)
        if content is None:
            return "not a message" if api == "messages" else "not a chat completion"
        return None if content == expected else "wrong content"
    if api == "messages":
        return _check_messages_stream(raw, expected)
    text = []
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    if not raw.rstrip().endswith(b"data: [DONE]"):
        return "the stream did not end with [DONE]"
    return None if "".join(text) == expected else "wrong content"


def _check_messages_stream(raw: bytes, expected: str) -> str | None:
    text = []
    kinds = []
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("data:"):
            event = json.loads(line[5:])
            kinds.append(event.get("type"))
            delta = event.get("delta") if event.get("type") == "content_block_delta" else None
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text.append(delta.get("text") or "")
    if "error" in kinds:
        return "an error event in the stream"
    if not kinds or kinds[-1] != "message_stop":
        return "the stream did not end with message_stop"
    return None if "".join(text) == expected else "wrong content"


def verify_side(
    side: str,
    url: str,
    key: str,
    mock_base: str,
    backend_key: str | None,
    words: int,
    apis: tuple[str, ...] = ("chat",),
) -> list[str]:
    """Problems found with ``side``, each with how many requests had it (empty: all well).
    ``backend_key``: the key the backend must see instead of the client's, when known."""
    status, _ = _call(f"{mock_base}/_mock/requests", "DELETE")
    if status != 200:
        return [f"cannot clear the mock's request log (HTTP {status})"]
    found: Counter[str] = Counter()
    expected = expected_content(words)
    sent: set[str] = set()
    for api, index in itertools.product(apis, range(2 * REQUESTS_PER_KIND)):
        stream = index % 2 == 0
        request_id = f"bench-verify-{side}-{api}-{index}"
        sent.add(request_id)
        headers = {
            **auth_headers(api, key),
            "Content-Type": "application/json",
            "x-mock-words": str(words),
            "x-mock-chunks": str(min(words, 8)),
            "x-mock-request-id": request_id,
        }
        body = request_body(api, stream=stream, prompt="hi")
        kind = ("streamed" if stream else "non-streamed") + (
            " Messages" if api == "messages" else ""
        )
        try:
            status, raw = _call(f"{url}{api_path(api)}", "POST", body, headers)
        except OSError as exc:
            found[f"{kind} request failed: {exc}"] += 1
            continue
        problem = _check_answer(status, raw, stream, expected, api)
        if problem is not None:
            found[f"{kind} request: {problem}"] += 1
    status, raw = _call(f"{mock_base}/_mock/requests", "GET")
    if status != 200:
        found[f"cannot read the mock's request log (HTTP {status})"] += 1
        return _listed(side, found, len(sent))
    records: list[dict[str, Any]] = json.loads(raw)
    seen = [record["id"] for record in records]
    if len(seen) != len(sent) or set(seen) != sent:
        found[
            f"{len(sent)} requests sent, the backend saw {len(seen)} "
            f"({len(set(seen) & sent)} of ours)"
        ] += 1
    for record in records:
        if record["outcome"] != "completed":
            found[f"request ended {record['outcome']} at the backend"] += 1
        if backend_key is None:
            continue
        presented = {record["headers"].get("authorization"), record["headers"].get("x-api-key")}
        if f"Bearer {key}" in presented or key in presented:
            found["the client's key reached the backend"] += 1
        elif f"Bearer {backend_key}" not in presented and backend_key not in presented:
            found["the backend did not get the backend key"] += 1
    return _listed(side, found, len(sent))


def _listed(side: str, found: Counter[str], requests: int) -> list[str]:
    return [f"{side}: {problem} ({count} of {requests})" for problem, count in found.items()]


def verify(
    direct_url: str,
    backend_key: str,
    proxy_url: str,
    proxy_key: str,
    words: int,
    *,
    check_backend_key: bool,
    apis: tuple[str, ...] = ("chat",),
) -> list[str]:
    """Check both sides; the problems are reported, the run goes on. ``check_backend_key``:
    the proxy is ours, so the key it must send to the backend is known."""
    mock_base = direct_url.removesuffix("/v1")
    problems: list[str] = []
    for side, url, key in (("direct", direct_url, backend_key), ("proxy", proxy_url, proxy_key)):
        try:
            expected_key = backend_key if side == "proxy" and check_backend_key else None
            problems += verify_side(side, url, key, mock_base, expected_key, words, apis)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{side}: verification failed: {exc!r}")
    return problems
