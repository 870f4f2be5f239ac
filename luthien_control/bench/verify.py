"""Before measuring: does every request through each side reach the backend exactly once?

A proxy that answered from a cache, retried behind the client's back or never forwarded
the ``x-mock-*`` directives would be measured doing something else than relaying. A few
tagged requests per side are sent, streamed and not, and the mock's request log must
then hold exactly those, each completed; through the proxy, the backend must have seen
the backend key, never the client's.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from luthien_control.bench.load import MODEL, expected_content

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


def _check_answer(status: int, raw: bytes, stream: bool, expected: str) -> str | None:
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    if not stream:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "not a chat completion"
        return None if content == expected else "wrong content"
    text = []
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    if not raw.rstrip().endswith(b"data: [DONE]"):
        return "the stream did not end with [DONE]"
    return None if "".join(text) == expected else "wrong content"


def verify_side(
    side: str, url: str, key: str, mock_base: str, backend_key: str | None, words: int
) -> list[str]:
    """Problems found with ``side``, each with how many requests had it (empty: all well).
    ``backend_key``: the key the backend must see instead of the client's, when known."""
    status, _ = _call(f"{mock_base}/_mock/requests", "DELETE")
    if status != 200:
        return [f"cannot clear the mock's request log (HTTP {status})"]
    found: Counter[str] = Counter()
    expected = expected_content(words)
    sent: set[str] = set()
    for index in range(2 * REQUESTS_PER_KIND):
        stream = index % 2 == 0
        request_id = f"bench-verify-{side}-{index}"
        sent.add(request_id)
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "x-mock-words": str(words),
            "x-mock-chunks": str(min(words, 8)),
            "x-mock-request-id": request_id,
        }
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        kind = "streamed" if stream else "non-streamed"
        try:
            status, raw = _call(
                f"{url}/chat/completions", "POST", json.dumps(body).encode(), headers
            )
        except OSError as exc:
            found[f"{kind} request failed: {exc}"] += 1
            continue
        problem = _check_answer(status, raw, stream, expected)
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
        authorization = record["headers"].get("authorization")
        if backend_key is not None and authorization == f"Bearer {key}":
            found["the client's key reached the backend"] += 1
        elif backend_key is not None and authorization != f"Bearer {backend_key}":
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
) -> list[str]:
    """Check both sides; the problems are reported, the run goes on. ``check_backend_key``:
    the proxy is ours, so the key it must send to the backend is known."""
    mock_base = direct_url.removesuffix("/v1")
    problems: list[str] = []
    for side, url, key in (("direct", direct_url, backend_key), ("proxy", proxy_url, proxy_key)):
        try:
            expected_key = backend_key if side == "proxy" and check_backend_key else None
            problems += verify_side(side, url, key, mock_base, expected_key, words)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{side}: verification failed: {exc!r}")
    return problems
