"""Policy type names: the built-in ones, and custom policies named by import path.

Built-ins are kept as ``"module:Class"`` strings and imported only when a policy file
uses them, so importing the registry imports no policy module and creates no cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies.base import Policy

_BUILTINS: dict[str, str] = {
    "SerialPolicy": "luthien_control.policies.serial:SerialPolicy",
    "CompoundPolicy": "luthien_control.policies.serial:SerialPolicy",
    "BranchingPolicy": "luthien_control.policies.branching:BranchingPolicy",
    "NoopPolicy": "luthien_control.policies.noop:NoopPolicy",
    "ClientApiKeyAuth": "luthien_control.policies.auth:ClientApiKeyAuth",
    "LeakedApiKeyDetection": "luthien_control.policies.secrets:LeakedApiKeyDetection",
    "AddApiKeyHeader": "luthien_control.policies.backend:AddApiKeyHeader",
    "AddApiKeyHeaderFromEnv": "luthien_control.policies.backend:AddApiKeyHeaderFromEnv",
    "SetBackendPolicy": "luthien_control.policies.backend:SetBackendPolicy",
    "ModelNameReplacement": "luthien_control.policies.backend:ModelNameReplacement",
    "SendBackendRequest": "luthien_control.policies.backend:SendBackendRequest",
    "IncrementIntegers": "luthien_control.policies.rewrite:IncrementIntegers",
    "LLMJudgePolicy": "luthien_control.policies.judge:LLMJudgePolicy",
    "ToolCallPolicy": "luthien_control.policies.tools:ToolCallPolicy",
    "TransactionContextLoggingPolicy": (
        "luthien_control.policies.audit_log:TransactionContextLoggingPolicy"
    ),
}


def builtin_type_names() -> list[str]:
    """The ``type`` names a policy file may use without an import path."""
    return list(_BUILTINS)


def resolve(type_name: str, path: str) -> type[Policy]:
    """The policy class for ``type_name``: a built-in name or ``package.module:ClassName``.

    ``path`` is where the name stands in the policy tree (``policies[2].type``), for
    the error raised when the name is unknown, cannot be imported or is not a policy.
    """
    target = _BUILTINS.get(type_name)
    if target is None:
        if ":" not in type_name:
            known = ", ".join(_BUILTINS)
            raise PolicyConfigError(
                f"unknown policy type {type_name!r} (known: {known}; "
                "or a custom policy as 'package.module:ClassName')",
                path=path,
            )
        target = type_name
    return _import_policy(target, path)


def _import_policy(target: str, path: str) -> type[Policy]:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise PolicyConfigError(
            f"invalid import path {target!r}: expected 'package.module:ClassName'", path=path
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a custom module may fail in any way while importing
        raise PolicyConfigError(f"cannot import {module_name!r}: {exc}", path=path) from exc
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PolicyConfigError(
                f"{module_name!r} has no attribute {attribute!r}", path=path
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        raise PolicyConfigError(f"{target!r} is not a Policy", path=path)
    return obj
