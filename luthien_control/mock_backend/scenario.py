"""Per-request directives: ``x-mock-*`` request headers that script one response.

Every directive is optional. A request without any (``x-mock-request-id`` aside) gets the
server's default scenario: ``DEFAULT_SCENARIO``, or the one the mock was started with
(``--scenario`` or ``$MOCK_SCENARIO``: the same directives as a JSON object, read by
``scenario_from_json``). Text values are percent-encoded UTF-8 (``urllib.parse.quote``)
so that any text fits in a header.

================================= ======================================================
header                            meaning
================================= ======================================================
``x-mock-content``                the exact assistant text
``x-mock-words: N``               N deterministic words, ``word0 word1 ...``
``x-mock-chunk-size: N``          characters per streamed delta (and per tool-call argument
                                  fragment, default 8)
``x-mock-chunks: N``              split the content into exactly N nearly equal deltas
``x-mock-delay-ms: F``            pause between streamed chunks
``x-mock-first-byte-delay-ms``    pause before anything is sent
``x-mock-tool-calls``             JSON list of ``{"name": ..., "arguments": ...}``; not
                                  repeated in the answer to a tool result (below)
``x-mock-thinking``               a signed thinking block before the text (Messages API)
``x-mock-cache-read-tokens``      ``cache_read_input_tokens`` in the usage (Messages API)
``x-mock-cache-creation-tokens``  ``cache_creation_input_tokens`` in the usage (Messages)
``x-mock-fail``                   ``status:N``, ``drop:N``, ``garbage:N``, ``error:N`` or ``hang``
``x-mock-retry-after``            ``Retry-After`` of an injected 429 (default 7)
``x-mock-request-id``             the id under which the request is recorded
================================= ======================================================

Failures: ``status:N`` answers HTTP status N; ``drop:N`` cuts the connection after N
events past the first (half the body when not streamed); ``garbage:N`` inserts an event
that is not JSON after N events past the first; ``error:N`` ends the stream after N events
past the first with the dialect's error event (``data: {"error": ...}`` on chat
completions, ``event: error`` on the Responses and Messages APIs) and no normal ending,
and answers a non-streamed request with the dialect's "overloaded" status (503, or 529 on
the Messages API); ``hang`` sends the headers and then nothing.

Scripted tool calls answer requests whose last message is not a tool result: a request
that ends with one (a ``tool`` message, a Responses ``*_output`` item, a Messages
``tool_result`` block) is answered with text only, so that an agent's loop comes to an end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import unquote

import orjson

DIRECTIVES = frozenset(
    {
        "x-mock-content",
        "x-mock-words",
        "x-mock-chunk-size",
        "x-mock-chunks",
        "x-mock-delay-ms",
        "x-mock-first-byte-delay-ms",
        "x-mock-tool-calls",
        "x-mock-thinking",
        "x-mock-cache-read-tokens",
        "x-mock-cache-creation-tokens",
        "x-mock-fail",
        "x-mock-retry-after",
        "x-mock-request-id",
    }
)
# The directives that script the answer (all of them but the request id).
SCRIPTING = DIRECTIVES - {"x-mock-request-id"}
DEFAULT_RETRY_AFTER = "7"
DEFAULT_ARGUMENT_FRAGMENT = 8

FailureKind = Literal["status", "drop", "garbage", "error", "hang"]
_COUNTED_FAILURES: dict[str, FailureKind] = {
    "status": "status",
    "drop": "drop",
    "garbage": "garbage",
    "error": "error",
}


class DirectiveError(ValueError):
    """An ``x-mock-*`` header that cannot be understood; answered with a 400."""

    def __init__(self, header: str, message: str) -> None:
        what = f"{header} header" if header.startswith("x-mock-") else header
        super().__init__(f"Invalid {what}: {message}")
        self.header = header


@dataclass(frozen=True, slots=True)
class Failure:
    """An injected failure: an error status, a dropped, garbled or failed stream, or a
    hang."""

    kind: FailureKind
    n: int = 0


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A scripted tool call; ``arguments`` is the JSON text the model would produce."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Scenario:
    """What one response should look like, as scripted by the request's headers."""

    request_id: str | None = None
    content: str | None = None
    words: int | None = None
    chunk_size: int | None = None
    chunks: int | None = None
    delay: float = 0.0
    first_byte_delay: float = 0.0
    tool_calls: tuple[ToolCall, ...] = ()
    thinking: str | None = None
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    failure: Failure | None = None
    retry_after: str = DEFAULT_RETRY_AFTER

    @property
    def has_content(self) -> bool:
        """Whether the text of the reply was scripted (as opposed to the default echo)."""
        return self.content is not None or self.words is not None

    def without_tool_calls(self) -> Scenario:
        """This scenario for the answer to a tool result: text only."""
        return replace(self, tool_calls=()) if self.tool_calls else self


DEFAULT_SCENARIO = Scenario()


def parse_scenario(headers: Mapping[str, str], default: Scenario = DEFAULT_SCENARIO) -> Scenario:
    """The scenario scripted by ``headers`` (lower-case names, latin-1 decoded values), or
    ``default`` (under the request's own id, if it has one) when they script nothing."""
    if DIRECTIVES.isdisjoint(headers):
        return default
    get = headers.get
    request_id = get("x-mock-request-id")
    if request_id is not None:
        request_id = request_id.strip() or None
    if SCRIPTING.isdisjoint(headers):
        return replace(default, request_id=request_id)
    content = get("x-mock-content")
    tool_calls = get("x-mock-tool-calls")
    thinking = get("x-mock-thinking")
    failure = get("x-mock-fail")
    retry_after = get("x-mock-retry-after")
    return Scenario(
        request_id=request_id,
        content=_text(content) if content is not None else None,
        words=_count(headers, "x-mock-words"),
        chunk_size=_count(headers, "x-mock-chunk-size", minimum=1),
        chunks=_count(headers, "x-mock-chunks", minimum=1),
        delay=_milliseconds(headers, "x-mock-delay-ms"),
        first_byte_delay=_milliseconds(headers, "x-mock-first-byte-delay-ms"),
        tool_calls=_tool_calls(tool_calls) if tool_calls is not None else (),
        thinking=_text(thinking) if thinking is not None else None,
        cache_read_tokens=_count(headers, "x-mock-cache-read-tokens") or 0,
        cache_creation_tokens=_count(headers, "x-mock-cache-creation-tokens") or 0,
        failure=_failure(failure) if failure is not None else None,
        retry_after=_retry_after(retry_after) if retry_after is not None else DEFAULT_RETRY_AFTER,
    )


def scenario_from_json(text: str) -> Scenario:
    """A server-wide default scenario: a JSON object of directives, such as
    ``{"x-mock-tool-calls": "[{\"name\": \"Bash\", \"arguments\": \"{}\"}]"}``.

    Values are read as the header values would be (strings, or numbers for the counts);
    raises ``DirectiveError`` for anything a header would not accept, for an unknown
    directive and for ``x-mock-request-id``, which names one request only.
    """
    source = "scenario"
    try:
        directives = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise DirectiveError(source, f"not JSON ({exc})") from None
    if not isinstance(directives, dict):
        raise DirectiveError(source, "expected a JSON object of x-mock-* directives")
    headers: dict[str, str] = {}
    for name, value in directives.items():
        header = name.lower()
        if header not in SCRIPTING:
            raise DirectiveError(source, f"{name!r} is not a directive a scenario can set")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise DirectiveError(header, f"expected a string or a number, got {value!r}")
        # As a header would carry it: UTF-8 bytes, read as latin-1.
        headers[header] = str(value).encode().decode("latin-1")
    return parse_scenario(headers)


def _text(value: str) -> str:
    # Header values arrive latin-1 decoded; a client may also have sent raw UTF-8.
    return unquote(value.encode("latin-1").decode("utf-8", "replace"))


def _count(headers: Mapping[str, str], header: str, *, minimum: int = 0) -> int | None:
    value = headers.get(header)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise DirectiveError(header, f"expected an integer, got {value!r}") from None
    if number < minimum:
        raise DirectiveError(header, f"must be at least {minimum}, got {number}")
    return number


def _milliseconds(headers: Mapping[str, str], header: str) -> float:
    value = headers.get(header)
    if value is None:
        return 0.0
    try:
        milliseconds = float(value.strip())
    except ValueError:
        raise DirectiveError(header, f"expected a number of milliseconds, got {value!r}") from None
    if not math.isfinite(milliseconds) or milliseconds < 0:
        raise DirectiveError(header, f"must be a finite number >= 0, got {value!r}")
    return milliseconds / 1000.0


def _tool_calls(value: str) -> tuple[ToolCall, ...]:
    header = "x-mock-tool-calls"
    try:
        calls = orjson.loads(_text(value))
    except orjson.JSONDecodeError as exc:
        raise DirectiveError(header, f"not JSON ({exc})") from None
    if not isinstance(calls, list):
        raise DirectiveError(header, "expected a JSON list of tool calls")
    parsed = []
    for index, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DirectiveError(header, f"item {index} needs a string 'name'")
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        parsed.append(ToolCall(name=call["name"], arguments=arguments))
    return tuple(parsed)


def _failure(value: str) -> Failure:
    header = "x-mock-fail"
    name, _, argument = value.strip().partition(":")
    if name == "hang" and not argument:
        return Failure("hang")
    kind = _COUNTED_FAILURES.get(name)
    if kind is None:
        raise DirectiveError(
            header, f"expected status:N, drop:N, garbage:N, error:N or hang, got {value!r}"
        )
    try:
        n = int(argument)
    except ValueError:
        raise DirectiveError(header, f"{kind} needs an integer, got {value!r}") from None
    if kind == "status" and not 400 <= n <= 599:
        raise DirectiveError(header, f"status must be between 400 and 599, got {n}")
    if n < 0:
        raise DirectiveError(header, f"{kind} must be >= 0, got {n}")
    return Failure(kind, n)


def _retry_after(value: str) -> str:
    value = value.strip()
    if not value.isdigit():
        raise DirectiveError("x-mock-retry-after", f"expected whole seconds, got {value!r}")
    return value
