"""``BranchingPolicy``: the policy of the first matching condition, else a default.

``cond_to_policy_map`` takes either form, and ``serialize()`` gives back the one given:

- a list of ``{"condition": CONDITION, "policy": POLICY}`` entries (easier in YAML);
- a mapping from a condition's JSON text to a policy, in order (the earlier format):
  ``{"{\\"type\\": \\"equals\\", ...}": {"type": ..., "config": {...}}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies.base import Policy, PolicyConfig
from luthien_control.policies.conditions import Condition, load_condition
from luthien_control.policies.loader import (
    build_member,
    check_keys,
    join_path,
    key_path,
    type_label,
)
from luthien_control.transaction import Transaction

_MAP = "cond_to_policy_map"
_ENTRY_KEYS = ("condition", "policy")
# Transaction paths that hold no body: a condition on them reads no content.
_NOT_CONTENT = (
    "request.method",
    "request.path",
    "request.query",
    "request.headers",
    "response.status",
    "response.headers",
    "client_key_name",
    "backend_url",
    "policy_name",
)


class BranchingPolicy(Policy):
    """Applies the policy of the first condition that holds, else ``default_policy``."""

    type_name = "BranchingPolicy"

    class Config(PolicyConfig):
        # Both are checked by __init__, so that errors name the members' own paths
        # (``cond_to_policy_map[0].policy``, ``default_policy``).
        cond_to_policy_map: Any
        default_policy: Any = None

    def __init__(self, config: PolicyConfig, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        if not isinstance(config, BranchingPolicy.Config):
            raise TypeError(f"expected BranchingPolicy.Config, got {type(config).__name__}")
        self.branches: list[tuple[Condition, Policy]] = _load_branches(config.cond_to_policy_map)
        self.default_policy: Policy | None = (
            None
            if config.default_policy is None
            else build_member(config.default_policy, "default_policy")
        )
        self.reads_content = any(
            _reads_content(condition.serialize()) for condition, _ in self.branches
        )

    def children(self) -> list[Policy]:
        members = [policy for _, policy in self.branches]
        return members if self.default_policy is None else [*members, self.default_policy]

    async def apply(self, tx: Transaction) -> None:
        for condition, policy in self.branches:
            if condition.evaluate(tx):
                await policy.apply(tx)
                return
        if self.default_policy is not None:
            await self.default_policy.apply(tx)


def _reads_content(condition: Any) -> bool:
    """Whether a serialized condition reads a transaction path that may hold a body."""
    if isinstance(condition, dict):
        if condition.get("type") == "transaction_path":
            path = str(condition.get("path"))
            return not any(path == p or path.startswith(p + ".") for p in _NOT_CONTENT)
        return any(_reads_content(value) for value in condition.values())
    if isinstance(condition, list):
        return any(_reads_content(value) for value in condition)
    return False


def _load_branches(value: Any) -> list[tuple[Condition, Policy]]:
    if isinstance(value, list):
        return [_load_entry(entry, join_path(_MAP, i)) for i, entry in enumerate(value)]
    if isinstance(value, Mapping):
        return [_load_keyed(key, policy) for key, policy in value.items()]
    raise PolicyConfigError(
        "must be a list of {condition, policy} entries or a mapping from condition JSON "
        f"to policy, got {type_label(value)}",
        path=join_path("config", _MAP),
    )


def _load_entry(entry: Any, path: str) -> tuple[Condition, Policy]:
    """The list form: ``{"condition": ..., "policy": ...}``."""
    if not isinstance(entry, Mapping):
        raise PolicyConfigError(
            f"an entry must be a mapping with 'condition' and 'policy', got {type_label(entry)}",
            path=path,
        )
    check_keys(entry, _ENTRY_KEYS, "an entry", path)
    condition = load_condition(entry["condition"], join_path(path, "condition"))
    return condition, build_member(entry["policy"], join_path(path, "policy"))


def _load_keyed(key: Any, policy: Any) -> tuple[Condition, Policy]:
    """The mapping form: the key is a condition's JSON text, the value its policy.

    Errors inside the key cannot be given a path of their own, so they name the entry
    and say where in the condition they are.
    """
    if not isinstance(key, str):
        raise PolicyConfigError(
            f"a key must be a condition's JSON text, got {type_label(key)} {key!r}",
            path=join_path("config", _MAP),
        )
    path = key_path(_MAP, key)
    try:
        data = json.loads(key)
    except json.JSONDecodeError as exc:
        raise PolicyConfigError(f"the key is not a JSON condition: {exc}", path=path) from exc
    try:
        condition = load_condition(data)
    except PolicyConfigError as exc:
        where = f" at {exc.path}" if exc.path else ""
        raise PolicyConfigError(
            f"in the condition key{where}: {exc.reason}", path=path
        ) from exc.__cause__
    return condition, build_member(policy, path)
