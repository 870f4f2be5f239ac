"""The one exception tree of Luthien Control.

Every error the proxy raises on purpose is a ``LuthienError``. Lower-layer errors
(aiohttp, SQLAlchemy, YAML, JSON) are translated into this tree where they happen,
with ``raise X from exc``; they are turned into HTTP responses in one place
(``luthien_control.responses.error_status_and_body``) and into one-line command-line
messages by ``luthien_control.cli.main``::

    LuthienError
    ├── ClientError                  the client's request is wrong          (4xx)
    │   ├── MalformedRequest         bad JSON, wrong types                  400
    │   ├── RequestTooLarge          body above the configured limit        413
    │   ├── RequestTimeout           head or body not received in time      408
    │   ├── HeadTooLarge             request line and headers too large     431
    │   ├── NotFound                 no such route                          404
    │   └── AuthenticationFailed     missing or unknown client key          401
    ├── PolicyError                  a control policy acted or failed
    │   ├── PolicyBlocked            a policy refused the transaction       403
    │   └── PolicyConfigError        a policy definition is invalid (names the path)
    ├── BackendError                 the backend could not give an answer
    │   ├── BackendUnreachable       connection refused, DNS, TLS           502
    │   ├── BackendBroken            dropped mid-response, garbled          502
    │   └── BackendTimeout           connect or read timeout                504
    ├── Unavailable                  the proxy takes no request just now    503
    │   ├── OverCapacity             MAX_CONNECTIONS connections are open
    │   └── ShuttingDown             the shutdown's grace period is over
    ├── StorageError                 the database failed or is unreachable  503
    │   └── StorageRefused           it answered: this data cannot be stored (a constraint, a value)
    └── ConfigurationError           settings or files are wrong (start-up, CLI)

A ``BackendHTTPError`` is deliberately *not* part of the tree: a backend's own 4xx/5xx
answer is a response that passes through unchanged, not an error of the proxy.
"""

from __future__ import annotations


class LuthienError(Exception):
    """Base of every error Luthien Control raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ClientError(LuthienError):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None


class MalformedRequest(ClientError):
    status_code = 400
    code = "invalid_request"


class RequestTooLarge(ClientError):
    status_code = 413
    code = "request_too_large"


class RequestTimeout(ClientError):
    """The client did not send its request head, or its body, in time."""

    status_code = 408
    code = "request_timeout"


class HeadTooLarge(ClientError):
    status_code = 431
    code = "request_header_fields_too_large"


class NotFound(ClientError):
    status_code = 404
    code = "not_found"


class AuthenticationFailed(ClientError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PolicyError(LuthienError):
    status_code = 500
    error_type = "server_error"
    code = "policy_error"


class PolicyBlocked(PolicyError):
    """A policy refused the transaction: 403 before streaming, an error event after."""

    status_code = 403
    error_type = "permission_error"
    code = "policy_blocked"

    def __init__(
        self, message: str, *, policy: str, param: str | None = None, as_message: bool = False
    ) -> None:
        super().__init__(message, param=param)
        self.policy = policy
        # The policy's ``block_with: message``: the client gets a normal, complete answer
        # that says what was blocked and why, not an error (agents retry errors).
        self.as_message = as_message


class PolicyConfigError(PolicyError):
    """A policy definition is invalid; ``path`` names the place in the tree."""

    code = "policy_config_error"

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class BackendError(LuthienError):
    status_code = 502
    error_type = "backend_error"
    code = "backend_error"


class BackendUnreachable(BackendError):
    code = "backend_unreachable"


class BackendBroken(BackendError):
    code = "backend_broken"


class BackendTimeout(BackendError):
    status_code = 504
    code = "backend_timeout"


class Unavailable(LuthienError):
    """The proxy cannot take this request now; the client may try again (``Retry-After``)."""

    status_code = 503
    error_type = "server_error"
    code = "unavailable"


class OverCapacity(Unavailable):
    """The worker already holds ``MAX_CONNECTIONS`` connections."""

    code = "over_capacity"


class ShuttingDown(Unavailable):
    """The proxy is shutting down and its grace period is over: what still runs is cut."""

    code = "shutting_down"


class StorageError(LuthienError):
    status_code = 503
    error_type = "server_error"
    code = "storage_unavailable"


class StorageRefused(StorageError):
    """The database answered that this data cannot be stored (a constraint, a trigger, a
    value it cannot take): trying the same data again cannot succeed. Every other
    ``StorageError`` (locked, busy, unreachable, no permission) may pass."""


class ConfigurationError(LuthienError):
    code = "configuration_error"
