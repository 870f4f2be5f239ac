"""Conditions for ``BranchingPolicy``: tests on a transaction, serialized as mappings.

A comparison compares two values::

    {"type": "equals", "left": VALUE, "right": VALUE, "comparator": "equals"}

for ``equals``, ``not_equals``, ``contains``, ``less_than``, ``less_than_or_equal``,
``greater_than``, ``greater_than_or_equal`` and ``regex_match`` (``comparator`` may be
left out; if given it repeats the type). A value is ``{"type": "static", "value": ANY}``
or ``{"type": "transaction_path", "path": "request.payload.model"}``. Conditions combine
as ``{"type": "not", "cond": C}``, ``{"type": "all", "conditions": [...]}`` and
``{"type": "any", "conditions": [...]}``.

Values that cannot be compared (``None < 3``, ``"a" < 1``) make a comparison false; a
condition never raises while it is evaluated.
"""

from __future__ import annotations

import copy
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies.loader import join_path, type_label
from luthien_control.transaction import Transaction

# --- values -------------------------------------------------------------------------


class Value(ABC):
    """One side of a comparison."""

    @abstractmethod
    def resolve(self, tx: Transaction) -> Any: ...

    @abstractmethod
    def serialize(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Static(Value):
    """A value written in the policy."""

    value: Any

    def resolve(self, tx: Transaction) -> Any:
        return self.value

    def serialize(self) -> dict[str, Any]:
        return {"type": "static", "value": copy.deepcopy(self.value)}


@dataclass(frozen=True, slots=True)
class TransactionPath(Value):
    """A value read from the transaction at a dotted path (``request.payload.model``)."""

    path: str

    def resolve(self, tx: Transaction) -> Any:
        return tx.lookup(self.path)

    def serialize(self) -> dict[str, Any]:
        return {"type": "transaction_path", "path": self.path}


# --- comparators --------------------------------------------------------------------


def _ordered(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], bool]:
    def compare(left: Any, right: Any) -> bool:
        try:
            return bool(op(left, right))
        except TypeError:  # None < 3, "a" < 1: not comparable, so not true
            return False

    return compare


def _contains(left: Any, right: Any) -> bool:
    """Substring of a string, item of a list, key of a mapping."""
    if isinstance(left, str):
        return isinstance(right, str) and right in left
    if isinstance(left, list | tuple | Mapping | set | frozenset):
        try:
            return right in left
        except TypeError:  # an unhashable value looked up among mapping keys
            return False
    return False


def _regex_match(left: Any, right: Any) -> bool:
    """``re.search`` of the pattern (right) in the string (left)."""
    if not isinstance(left, str):
        return False
    if isinstance(right, re.Pattern):
        return right.search(left) is not None
    if not isinstance(right, str):
        return False
    try:
        return re.search(right, left) is not None
    except re.error:  # a pattern read from the transaction may be invalid
        return False


COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "equals": _ordered(operator.eq),
    "not_equals": _ordered(operator.ne),
    "contains": _contains,
    "less_than": _ordered(operator.lt),
    "less_than_or_equal": _ordered(operator.le),
    "greater_than": _ordered(operator.gt),
    "greater_than_or_equal": _ordered(operator.ge),
    "regex_match": _regex_match,
}


# --- conditions ---------------------------------------------------------------------


class Condition(ABC):
    """A test on a transaction."""

    @abstractmethod
    def evaluate(self, tx: Transaction) -> bool: ...

    @abstractmethod
    def serialize(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Comparison(Condition):
    """``left <comparator> right``; a static ``regex_match`` pattern is compiled once, here."""

    comparator: str
    left: Value
    right: Value
    _pattern: re.Pattern[str] | None = field(init=False, default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.comparator not in COMPARATORS:
            raise ValueError(f"unknown comparator {self.comparator!r}")
        if self.comparator == "regex_match" and isinstance(self.right, Static):
            if not isinstance(self.right.value, str):
                raise TypeError("a regex_match pattern must be a string")
            object.__setattr__(self, "_pattern", re.compile(self.right.value))

    def evaluate(self, tx: Transaction) -> bool:
        right = self._pattern if self._pattern is not None else self.right.resolve(tx)
        return COMPARATORS[self.comparator](self.left.resolve(tx), right)

    def serialize(self) -> dict[str, Any]:
        return {
            "type": self.comparator,
            "left": self.left.serialize(),
            "right": self.right.serialize(),
            "comparator": self.comparator,
        }


@dataclass(frozen=True, slots=True)
class Not(Condition):
    cond: Condition

    def evaluate(self, tx: Transaction) -> bool:
        return not self.cond.evaluate(tx)

    def serialize(self) -> dict[str, Any]:
        return {"type": "not", "cond": self.cond.serialize()}


@dataclass(frozen=True, slots=True)
class AllOf(Condition):
    """True when every condition is (so true when there are none)."""

    conditions: tuple[Condition, ...]

    def evaluate(self, tx: Transaction) -> bool:
        return all(condition.evaluate(tx) for condition in self.conditions)

    def serialize(self) -> dict[str, Any]:
        return {"type": "all", "conditions": [c.serialize() for c in self.conditions]}


@dataclass(frozen=True, slots=True)
class AnyOf(Condition):
    """True when at least one condition is (so false when there are none)."""

    conditions: tuple[Condition, ...]

    def evaluate(self, tx: Transaction) -> bool:
        return any(condition.evaluate(tx) for condition in self.conditions)

    def serialize(self) -> dict[str, Any]:
        return {"type": "any", "conditions": [c.serialize() for c in self.conditions]}


# --- loading ------------------------------------------------------------------------

CONDITION_TYPES: tuple[str, ...] = (*COMPARATORS, "not", "all", "any")
VALUE_TYPES: tuple[str, ...] = ("static", "transaction_path")


def load_condition(data: Any, path: str = "") -> Condition:
    """The condition ``data`` defines; errors name ``path`` (``...condition.left``)."""
    kind = _kind(data, path, "condition", CONDITION_TYPES)
    if kind in COMPARATORS:
        _check_keys(data, path, kind, required=("left", "right"), optional=("comparator",))
        comparator = data.get("comparator", kind)
        if comparator != kind:
            raise PolicyConfigError(
                f"must be {kind!r} (the condition's type), got {comparator!r}",
                path=join_path(path, "comparator"),
            )
        left = load_value(data["left"], join_path(path, "left"))
        right = load_value(data["right"], join_path(path, "right"))
        pattern_path = join_path(path, "right", "value")
        if kind == "regex_match" and isinstance(right, Static) and not isinstance(right.value, str):
            raise PolicyConfigError(
                f"a regex_match pattern must be a string, got {type_label(right.value)}",
                path=pattern_path,
            )
        try:
            return Comparison(kind, left, right)
        except re.error as exc:
            raise PolicyConfigError(
                f"invalid regular expression: {exc}", path=pattern_path
            ) from exc
    if kind == "not":
        _check_keys(data, path, kind, required=("cond",))
        return Not(load_condition(data["cond"], join_path(path, "cond")))
    _check_keys(data, path, kind, required=("conditions",))
    items = data["conditions"]
    items_path = join_path(path, "conditions")
    if not isinstance(items, list):
        raise PolicyConfigError(f"must be a list, got {type_label(items)}", path=items_path)
    conditions = tuple(
        load_condition(item, join_path(items_path, i)) for i, item in enumerate(items)
    )
    return AllOf(conditions) if kind == "all" else AnyOf(conditions)


def load_value(data: Any, path: str = "") -> Value:
    """The comparison value ``data`` defines (static, or read from the transaction)."""
    kind = _kind(data, path, "value", VALUE_TYPES)
    if kind == "static":
        _check_keys(data, path, kind, required=("value",))
        return Static(copy.deepcopy(data["value"]))
    _check_keys(data, path, kind, required=("path",))
    where = data["path"]
    if not isinstance(where, str) or not where:
        raise PolicyConfigError(
            "must be a dotted path such as 'request.payload.model', "
            f"got {type_label(where)} {where!r}",
            path=join_path(path, "path"),
        )
    return TransactionPath(where)


def _kind(data: Any, path: str, what: str, known: Sequence[str]) -> str:
    if not isinstance(data, Mapping):
        raise PolicyConfigError(
            f"a {what} must be a mapping with a 'type', got {type_label(data)}", path=path
        )
    type_path = join_path(path, "type")
    if "type" not in data:
        raise PolicyConfigError(f"missing 'type' of the {what}", path=type_path)
    kind = data["type"]
    if not isinstance(kind, str):
        raise PolicyConfigError(f"must be a string, got {type_label(kind)}", path=type_path)
    if kind not in known:
        raise PolicyConfigError(
            f"unknown {what} type {kind!r} (known: {', '.join(known)})", path=type_path
        )
    return kind


def _check_keys(
    data: Mapping[str, Any],
    path: str,
    kind: str,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> None:
    allowed = ("type", *required, *optional)
    for key in data:
        if key not in allowed:
            expected = ", ".join(repr(k) for k in allowed)
            raise PolicyConfigError(
                f"unknown key {key!r} for {kind!r} (expected {expected})",
                path=join_path(path, str(key)),
            )
    for key in required:
        if key not in data:
            raise PolicyConfigError(f"missing {key!r} for {kind!r}", path=join_path(path, key))
