import re
from collections.abc import Callable
from typing import Any

import pytest

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies.conditions import (
    AllOf,
    AnyOf,
    Comparison,
    Not,
    Static,
    TransactionPath,
    load_condition,
    load_value,
)
from luthien_control.transaction import Transaction


def static(value: Any) -> dict[str, Any]:
    return {"type": "static", "value": value}


def at(path: Any) -> dict[str, Any]:
    return {"type": "transaction_path", "path": path}


def compare(kind: str, left: Any, right: Any) -> dict[str, Any]:
    return {"type": kind, "left": left, "right": right}


def holds(tx: Transaction, data: dict[str, Any]) -> bool:
    return load_condition(data).evaluate(tx)


TRUE = compare("equals", static(1), static(1))
FALSE = compare("equals", static(1), static(2))


# --- values -------------------------------------------------------------------------


def test_values_resolve(tx: Transaction) -> None:
    assert load_value(static({"a": [1]})).resolve(tx) == {"a": [1]}
    assert load_value(static(None)).resolve(tx) is None
    assert load_value(at("request.payload.model")).resolve(tx) == "gpt-4o"
    assert load_value(at("request.payload.messages.0.role")).resolve(tx) == "user"
    assert load_value(at("request.payload.absent.deeper")).resolve(tx) is None
    assert load_value(at("request.method")).resolve(tx) == "POST"


def test_values_serialize() -> None:
    assert Static([1, 2]).serialize() == static([1, 2])
    assert TransactionPath("request.payload.model").serialize() == at("request.payload.model")


# --- comparisons --------------------------------------------------------------------

MODEL = at("request.payload.model")
MAX_TOKENS = at("request.payload.max_tokens")
TEMPERATURE = at("request.payload.temperature")
ABSENT = at("request.payload.absent")


@pytest.mark.parametrize(
    ("kind", "left", "right", "expected"),
    [
        ("equals", MODEL, static("gpt-4o"), True),
        ("equals", MODEL, static("gpt-4"), False),
        ("equals", static("gpt-4o"), MODEL, True),
        ("equals", MODEL, MODEL, True),
        ("equals", ABSENT, static(None), True),
        ("equals", MAX_TOKENS, static("100"), False),
        ("equals", MAX_TOKENS, static(100.0), True),
        ("equals", at("request.payload.tags"), static(["alpha", "beta"]), True),
        ("not_equals", MODEL, static("gpt-4"), True),
        ("not_equals", MODEL, static("gpt-4o"), False),
        ("not_equals", ABSENT, static(3), True),
        ("less_than", MAX_TOKENS, static(101), True),
        ("less_than", MAX_TOKENS, static(100), False),
        ("less_than", ABSENT, static(3), False),
        ("less_than", static("a"), static(1), False),
        ("less_than", static("a"), static("b"), True),
        ("less_than_or_equal", MAX_TOKENS, static(100), True),
        ("less_than_or_equal", MAX_TOKENS, static(99), False),
        ("less_than_or_equal", static(None), static(None), False),
        ("greater_than", TEMPERATURE, static(0.1), True),
        ("greater_than", TEMPERATURE, static(0.5), False),
        ("greater_than", static({"a": 1}), static({}), False),
        ("greater_than_or_equal", TEMPERATURE, static(0.5), True),
        ("greater_than_or_equal", TEMPERATURE, static(0.6), False),
        ("greater_than_or_equal", MODEL, static(3), False),
    ],
)
def test_comparisons(tx: Transaction, kind: str, left: Any, right: Any, expected: bool) -> None:
    assert holds(tx, compare(kind, left, right)) is expected


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (MODEL, static("gpt"), True),
        (MODEL, static("claude"), False),
        (MODEL, static(4), False),
        (at("request.payload.tags"), static("beta"), True),
        (at("request.payload.tags"), static("gamma"), False),
        (at("request.payload.tags"), static(["beta"]), False),
        (at("request.payload.metadata"), static("team"), True),
        (at("request.payload.metadata"), static("red"), False),
        (at("request.payload.metadata"), static(["unhashable"]), False),
        (ABSENT, static("x"), False),
        (MAX_TOKENS, static(1), False),
    ],
)
def test_contains(tx: Transaction, left: Any, right: Any, expected: bool) -> None:
    assert holds(tx, compare("contains", left, right)) is expected


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (MODEL, static(r"^gpt-\d"), True),
        (MODEL, static(r"4o$"), True),
        (MODEL, static(r"^4o"), False),
        (at("request.payload.messages.0.content"), static(r"(?i)hello"), True),
        (MAX_TOKENS, static(r"100"), False),
        (ABSENT, static(r".*"), False),
        # A pattern read from the transaction is compiled when evaluated; an invalid
        # one, or one that is not a string, does not match.
        (static("gpt-4o-mini"), MODEL, True),
        (static("abc"), at("request.payload.metadata.team"), False),
        (static("abc"), MAX_TOKENS, False),
    ],
)
def test_regex_match(tx: Transaction, left: Any, right: Any, expected: bool) -> None:
    assert holds(tx, compare("regex_match", left, right)) is expected


def test_invalid_pattern_from_the_transaction_does_not_match(
    make_tx: Callable[[Any], Transaction],
) -> None:
    tx = make_tx({"pattern": "[unclosed"})
    assert holds(tx, compare("regex_match", static("abc"), at("request.payload.pattern"))) is False


def test_static_pattern_is_compiled_once() -> None:
    condition = load_condition(compare("regex_match", MODEL, static("^gpt")))
    assert isinstance(condition, Comparison)
    assert condition._pattern == re.compile("^gpt")


# --- combinations -------------------------------------------------------------------


def test_not(tx: Transaction) -> None:
    assert holds(tx, {"type": "not", "cond": FALSE}) is True
    assert holds(tx, {"type": "not", "cond": TRUE}) is False
    assert holds(tx, {"type": "not", "cond": {"type": "not", "cond": TRUE}}) is True


@pytest.mark.parametrize(
    ("members", "all_", "any_"),
    [
        ([TRUE, TRUE], True, True),
        ([TRUE, FALSE], False, True),
        ([FALSE, FALSE], False, False),
        ([], True, False),
    ],
)
def test_all_and_any(tx: Transaction, members: list[Any], all_: bool, any_: bool) -> None:
    assert holds(tx, {"type": "all", "conditions": members}) is all_
    assert holds(tx, {"type": "any", "conditions": members}) is any_


def test_nested_combination(tx: Transaction) -> None:
    data = {
        "type": "all",
        "conditions": [
            compare("regex_match", MODEL, static("^gpt")),
            {"type": "any", "conditions": [FALSE, compare("less_than", MAX_TOKENS, static(500))]},
            {"type": "not", "cond": compare("contains", at("request.payload.tags"), static("x"))},
        ],
    }
    assert holds(tx, data) is True


def test_loaded_types() -> None:
    condition = load_condition({"type": "any", "conditions": [{"type": "not", "cond": TRUE}]})
    assert condition == AnyOf((Not(Comparison("equals", Static(1), Static(1))),))
    assert isinstance(load_condition({"type": "all", "conditions": []}), AllOf)


# --- serialization ------------------------------------------------------------------

CANONICAL = [
    {**compare("equals", MODEL, static("gpt-4o")), "comparator": "equals"},
    {**compare("regex_match", MODEL, static("^gpt")), "comparator": "regex_match"},
    {**compare("contains", static([1, {"a": None}]), MAX_TOKENS), "comparator": "contains"},
    {"type": "not", "cond": {**TRUE, "comparator": "equals"}},
    {
        "type": "all",
        "conditions": [
            {"type": "any", "conditions": []},
            {**compare("greater_than", MAX_TOKENS, static(1)), "comparator": "greater_than"},
        ],
    },
]


@pytest.mark.parametrize("data", CANONICAL)
def test_serialize_round_trip(data: dict[str, Any]) -> None:
    assert load_condition(data).serialize() == data


def test_serialize_adds_the_comparator() -> None:
    assert load_condition(TRUE).serialize() == {**TRUE, "comparator": "equals"}


# --- loading errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ("equals", "", "a condition must be a mapping with a 'type', got string"),
        ({"left": static(1)}, "type", "missing 'type' of the condition"),
        ({"type": 1}, "type", "must be a string, got number"),
        (
            {"type": "matches"},
            "type",
            "unknown condition type 'matches' (known: equals, not_equals, contains, less_than, "
            "less_than_or_equal, greater_than, greater_than_or_equal, regex_match, not, all, any)",
        ),
        (
            {**TRUE, "extra": 1},
            "extra",
            "unknown key 'extra' for 'equals' (expected 'type', 'left', 'right', 'comparator')",
        ),
        ({"type": "equals", "left": static(1)}, "right", "missing 'right' for 'equals'"),
        (
            {**TRUE, "comparator": "not_equals"},
            "comparator",
            "must be 'equals' (the condition's type), got 'not_equals'",
        ),
        (
            compare("equals", 1, static(1)),
            "left",
            "a value must be a mapping with a 'type', got number",
        ),
        (
            compare("equals", {"type": "literal", "value": 1}, static(1)),
            "left.type",
            "unknown value type 'literal' (known: static, transaction_path)",
        ),
        (
            compare("equals", {"type": "static"}, static(1)),
            "left.value",
            "missing 'value' for 'static'",
        ),
        (
            compare("equals", static(1), {"type": "static", "value": 1, "path": "x"}),
            "right.path",
            "unknown key 'path' for 'static' (expected 'type', 'value')",
        ),
        (
            compare("equals", at(""), static(1)),
            "left.path",
            "must be a dotted path such as 'request.payload.model', got string ''",
        ),
        (
            compare("equals", at(3), static(1)),
            "left.path",
            "must be a dotted path such as 'request.payload.model', got number 3",
        ),
        (
            compare("regex_match", MODEL, static("(unclosed")),
            "right.value",
            "invalid regular expression: missing ), unterminated subpattern at position 0",
        ),
        (
            compare("regex_match", MODEL, static(3)),
            "right.value",
            "a regex_match pattern must be a string, got number",
        ),
        ({"type": "not"}, "cond", "missing 'cond' for 'not'"),
        (
            {"type": "not", "cond": None},
            "cond",
            "a condition must be a mapping with a 'type', got null",
        ),
        ({"type": "all", "conditions": TRUE}, "conditions", "must be a list, got mapping"),
        (
            {"type": "any", "conditions": [TRUE], "cond": TRUE},
            "cond",
            "unknown key 'cond' for 'any' (expected 'type', 'conditions')",
        ),
    ],
)
def test_load_errors(data: Any, path: str, reason: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        load_condition(data)
    assert (info.value.path, info.value.reason) == (path, reason)


def test_load_error_paths_are_relative_to_the_given_path() -> None:
    data = {
        "type": "all",
        "conditions": [
            TRUE,
            {"type": "not", "cond": TRUE},
            {"type": "any", "conditions": [FALSE, compare("regex_match", MODEL, static("a)"))]},
        ],
    }
    with pytest.raises(PolicyConfigError) as info:
        load_condition(data, "cond_to_policy_map[0].condition")
    assert (
        info.value.path == "cond_to_policy_map[0].condition.conditions[2].conditions[1].right.value"
    )
    assert info.value.reason.startswith("invalid regular expression: unbalanced parenthesis")
    assert isinstance(info.value.__cause__, re.error)

    data["conditions"][2] = compare("less_than", {"type": "static"}, static(1))
    with pytest.raises(PolicyConfigError) as info:
        load_condition(data, "cond_to_policy_map[0].condition")
    assert info.value.path == "cond_to_policy_map[0].condition.conditions[2].left.value"
