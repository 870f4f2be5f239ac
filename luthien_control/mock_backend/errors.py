"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
    "contact us through our help center at help.openai.com.)"
)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """An HTTP error with OpenAI's body; ``headers`` are extra response headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return orjson.dumps({"error": error})


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


def injected(status: int, model: str | None, retry_after: str) -> ErrorResponse:
    """The error a real backend gives with ``status``, as asked for by ``x-mock-fail``."""
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
        return ErrorResponse(
            500,
            "The server had an error while processing your request. Sorry about that!",
            type="server_error",
        )
    if status == 503:
        return ErrorResponse(
            503,
            "The engine is currently overloaded, please try again later.",
            type="server_error",
        )
    if status >= 500:
        return ErrorResponse(status, f"Injected mock failure ({status}).", type="server_error")
    return ErrorResponse(status, f"Injected mock failure ({status}).")
