"""Error responses and stream error events, in each dialect's shape.

OpenAI's body is ``{"error": {"message", "type", "param", "code"}}``; Anthropic's (on
``/v1/messages*``) is ``{"type": "error", "error": {"type", "message"}}``, its ``type``
given by the status (``ANTHROPIC_TYPES``). An ``ErrorResponse`` is built once and turned
into Anthropic's shape by ``as_anthropic`` where the route asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson

INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
    "contact us through our help center at help.openai.com.)"
)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OPENAI_OVERLOADED = 503
ANTHROPIC_OVERLOADED = 529
SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """An HTTP error with OpenAI's body (Anthropic's when ``anthropic``); ``headers`` are
    extra response headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    anthropic: bool = False

    def body(self) -> bytes:
        if self.anthropic:
            return orjson.dumps(
                {"type": "error", "error": {"type": self.type, "message": self.message}}
            )
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return orjson.dumps({"error": error})

    def as_anthropic(self) -> ErrorResponse:
        """The same error in Anthropic's shape, its type the one of its status."""
        if self.anthropic:
            return self
        return replace(
            self, type=anthropic_type(self.status), param=None, code=None, anthropic=True
        )


def anthropic_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP ``status``."""
    known = ANTHROPIC_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic(status: int, message: str) -> ErrorResponse:
    """An error in Anthropic's shape."""
    return ErrorResponse(status, message, anthropic_type(status), anthropic=True)


def model_not_found(model: str) -> ErrorResponse:
    return ErrorResponse(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def invalid_json() -> ErrorResponse:
    return ErrorResponse(400, INVALID_JSON_MESSAGE)


def missing_parameter(param: str) -> ErrorResponse:
    return ErrorResponse(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def invalid_type(param: str, expected: str, value: object) -> ErrorResponse:
    got = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a decimal",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), "an unknown type")
    return ErrorResponse(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
        param=param,
        code="invalid_type",
    )


def bad_directive(message: str) -> ErrorResponse:
    return ErrorResponse(400, message)


def missing_api_key() -> ErrorResponse:
    return ErrorResponse(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        code="invalid_api_key",
    )


def incorrect_api_key(key: str) -> ErrorResponse:
    masked = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:] if len(key) > 8 else "*" * len(key)
    return ErrorResponse(
        401,
        f"Incorrect API key provided: {masked}. "
        "You can find your API key at https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


def not_found(method: str, path: str) -> ErrorResponse:
    return ErrorResponse(404, f"Invalid URL ({method} {path})")


def request_not_found(request_id: str) -> ErrorResponse:
    return ErrorResponse(404, f"No recorded request with id '{request_id}'.")


def injected(
    status: int, model: str | None, retry_after: str, *, anthropic: bool = False
) -> ErrorResponse:
    """The error a real backend gives with ``status``, as asked for by ``x-mock-fail``;
    Anthropic's when ``anthropic``."""
    if anthropic:
        return _injected_anthropic(status, retry_after)
    if status == 429:
        return ErrorResponse(
            429,
            f"Rate limit reached for {model or 'requests'} in organization org-mock on requests "
            f"per min (RPM): Limit 3, Used 3, Requested 1. Please try again in {retry_after}s.",
            type="requests",
            code="rate_limit_exceeded",
            headers=((b"retry-after", retry_after.encode()),),
        )
    if status == 500:
        return ErrorResponse(500, SERVER_ERROR_MESSAGE, type="server_error")
    if status == 503:
        return ErrorResponse(
            503,
            "The engine is currently overloaded, please try again later.",
            type="server_error",
        )
    if status >= 500:
        return ErrorResponse(status, f"Injected mock failure ({status}).", type="server_error")
    return ErrorResponse(status, f"Injected mock failure ({status}).")


def _injected_anthropic(status: int, retry_after: str) -> ErrorResponse:
    if status == 429:
        return replace(
            anthropic(
                429,
                "Number of request tokens has exceeded your per-minute rate limit; see the "
                "response headers for current usage. Please reduce the prompt length or the "
                "maximum tokens requested, or try again later.",
            ),
            headers=((b"retry-after", retry_after.encode()),),
        )
    if status == 500:
        return anthropic(500, "Internal server error")
    if status == ANTHROPIC_OVERLOADED:
        return anthropic(status, "Overloaded")
    return anthropic(status, f"Injected mock failure ({status}).")


def chat_error_event(index: int) -> bytes:
    """The event that ends a failed chat or legacy completions stream (no ``[DONE]``)."""
    error = {"message": SERVER_ERROR_MESSAGE, "type": "server_error", "param": None, "code": None}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def responses_error_event(sequence_number: int) -> bytes:
    """The ``error`` event that ends a failed Responses API stream."""
    data = {
        "type": "error",
        "code": "server_error",
        "message": SERVER_ERROR_MESSAGE,
        "param": None,
        "sequence_number": sequence_number,
    }
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def messages_error_event(index: int) -> bytes:
    """The ``error`` event that ends a failed Messages API stream (no ``message_stop``)."""
    return (
        b'event: error\ndata: {"type":"error","error":'
        b'{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
