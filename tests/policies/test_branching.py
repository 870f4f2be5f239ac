import json
from typing import Any

import pytest

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies import load_policy
from luthien_control.policies.branching import BranchingPolicy
from luthien_control.policies.conditions import Comparison
from luthien_control.policies.noop import NoopPolicy
from luthien_control.transaction import Transaction


def applied(tx: Transaction) -> list[tuple[str, str]]:
    return [(d.policy, d.action) for d in tx.decisions]


def model_is(model: str) -> dict[str, Any]:
    return {
        "type": "equals",
        "left": {"type": "transaction_path", "path": "request.payload.model"},
        "right": {"type": "static", "value": model},
        "comparator": "equals",
    }


def branching(entries: Any, default: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "BranchingPolicy",
        "config": {**extra, "cond_to_policy_map": entries, "default_policy": default},
    }


def as_list(*pairs: tuple[dict[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"condition": c, "policy": p} for c, p in pairs]


def as_map(*pairs: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return {json.dumps(c): p for c, p in pairs}


FORMS = [as_list, as_map]


@pytest.fixture
def rec(policy_module: str) -> Any:
    def make(name: str) -> dict[str, Any]:
        return {"type": f"{policy_module}:Recorder", "config": {"name": name}}

    return make


def error_of(data: Any) -> PolicyConfigError:
    with pytest.raises(PolicyConfigError) as info:
        load_policy(data)
    return info.value


# --- loading and round trips --------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_both_forms_round_trip(form: Any) -> None:
    noop = {"type": "NoopPolicy", "config": {}}
    data = branching(form((model_is("a"), noop), (model_is("b"), noop)), noop, name="Route")
    policy = load_policy(data)
    assert policy.serialize() == data
    assert isinstance(policy, BranchingPolicy)
    assert [c.serialize() for c, _ in policy.branches] == [model_is("a"), model_is("b")]
    assert isinstance(policy.default_policy, NoopPolicy)
    assert policy.name == "Route"


def test_map_form_keeps_the_key_text_exactly() -> None:
    # Keys written without "comparator" and with other spacing come back as written.
    key = '{"type":"equals","left":{"type":"static","value":1},"right":{"type":"static","value":1}}'
    data = branching({key: {"type": "NoopPolicy", "config": {}}})
    assert load_policy(data).serialize() == data


def test_default_policy_may_be_absent() -> None:
    data = {"type": "BranchingPolicy", "config": {"cond_to_policy_map": []}}
    policy = load_policy(data)
    assert isinstance(policy, BranchingPolicy)
    assert policy.default_policy is None
    assert policy.branches == []
    assert policy.serialize() == data


def test_conditions_are_loaded() -> None:
    data = branching(
        as_list(
            (
                {**model_is("x"), "type": "regex_match", "comparator": "regex_match"},
                {"type": "NoopPolicy", "config": {}},
            )
        )
    )
    policy = load_policy(data)
    assert isinstance(policy, BranchingPolicy)
    condition = policy.branches[0][0]
    assert isinstance(condition, Comparison)
    assert condition.comparator == "regex_match"


# --- apply --------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("form", FORMS)
async def test_first_matching_branch_is_applied(tx: Transaction, rec: Any, form: Any) -> None:
    data = branching(
        form(
            (model_is("gpt-3.5"), rec("first")),
            (model_is("gpt-4o"), rec("second")),
            ({"type": "all", "conditions": []}, rec("third")),
        ),
        rec("default"),
    )
    await load_policy(data).apply(tx)
    assert applied(tx) == [("second", "applied")]


@pytest.mark.anyio
@pytest.mark.parametrize("form", FORMS)
async def test_default_when_nothing_matches(tx: Transaction, rec: Any, form: Any) -> None:
    data = branching(form((model_is("gpt-3.5"), rec("first"))), rec("default"))
    await load_policy(data).apply(tx)
    assert applied(tx) == [("default", "applied")]


@pytest.mark.anyio
async def test_nothing_when_nothing_matches_and_no_default(tx: Transaction, rec: Any) -> None:
    await load_policy(branching(as_list((model_is("gpt-3.5"), rec("first"))))).apply(tx)
    assert tx.decisions == []


@pytest.mark.anyio
async def test_nested_composites(tx: Transaction, rec: Any) -> None:
    inner = branching(
        as_map(
            (
                {"type": "not", "cond": model_is("gpt-4o")},
                {"type": "SerialPolicy", "config": {"policies": [rec("wrong")]}},
            ),
        ),
        {"type": "CompoundPolicy", "config": {"policies": [rec("inner-default"), rec("inner-2")]}},
    )
    outer = {
        "type": "SerialPolicy",
        "config": {
            "policies": [
                rec("before"),
                branching(
                    as_list(
                        (
                            {
                                "type": "all",
                                "conditions": [
                                    model_is("gpt-4o"),
                                    {
                                        "type": "greater_than",
                                        "left": {
                                            "type": "transaction_path",
                                            "path": "request.payload.max_tokens",
                                        },
                                        "right": {"type": "static", "value": 10},
                                    },
                                ],
                            },
                            {"type": "SerialPolicy", "config": {"policies": [rec("big"), inner]}},
                        )
                    ),
                    rec("small"),
                ),
                rec("after"),
            ]
        },
    }
    policy = load_policy(outer)
    assert policy.serialize() == outer
    await policy.apply(tx)
    assert applied(tx) == [
        ("before", "applied"),
        ("big", "applied"),
        ("inner-default", "applied"),
        ("inner-2", "applied"),
        ("after", "applied"),
    ]


# --- errors -------------------------------------------------------------------------

NOOP = {"type": "NoopPolicy", "config": {}}
BAD_NOOP = {"type": "NoopPolicy", "config": {"name": 5}}


def test_policy_of_a_list_entry() -> None:
    error = error_of(branching(as_list((model_is("a"), NOOP), (model_is("b"), BAD_NOOP))))
    assert (error.path, error.reason) == (
        "cond_to_policy_map[1].policy.config.name",
        "Input should be a valid string",
    )


def test_condition_of_a_list_entry_inside_a_serial() -> None:
    condition = {
        "type": "all",
        "conditions": [model_is("a"), model_is("b"), {**model_is("c"), "left": 1}],
    }
    data = {
        "type": "SerialPolicy",
        "config": {"policies": [NOOP, branching(as_list((condition, NOOP)))]},
    }
    error = error_of(data)
    assert error.path == "policies[1].cond_to_policy_map[0].condition.conditions[2].left"
    assert error.reason == "a value must be a mapping with a 'type', got number"


def test_bad_regex_names_the_path() -> None:
    condition = {**model_is("(a"), "type": "regex_match", "comparator": "regex_match"}
    error = error_of(branching(as_list((model_is("a"), NOOP), (condition, NOOP))))
    assert error.path == "cond_to_policy_map[1].condition.right.value"
    assert error.reason.startswith("invalid regular expression: missing ), unterminated subpattern")


def test_default_policy_errors() -> None:
    error = error_of(branching([], BAD_NOOP))
    assert error.path == "default_policy.config.name"
    error = error_of(branching([], "NoopPolicy"))
    assert (error.path, error.reason) == (
        "default_policy",
        "a policy must be a mapping with 'type' and 'config', got string",
    )
    nested = {
        "type": "SerialPolicy",
        "config": {"policies": [branching([], {"type": "Nope", "config": {}})]},
    }
    assert error_of(nested).path == "policies[0].default_policy.type"


def test_policy_of_a_map_entry() -> None:
    key = json.dumps({"type": "any", "conditions": []})
    error = error_of(branching({key: BAD_NOOP}))
    assert (
        error.path
        == 'cond_to_policy_map["{\\"type\\": \\"any\\", \\"conditions\\": []}"].config.name'
    )
    assert error.reason == "Input should be a valid string"


def test_condition_in_a_map_key() -> None:
    key = json.dumps({"type": "not", "cond": {**model_is("a"), "comparator": "less_than"}})
    error = error_of(branching({key: NOOP}))
    assert error.path == f"cond_to_policy_map[{json.dumps(key)}]"
    assert error.reason == (
        "in the condition key at cond.comparator: "
        "must be 'equals' (the condition's type), got 'less_than'"
    )
    error = error_of(branching({"[]": NOOP}))
    assert (
        error.reason
        == "in the condition key: a condition must be a mapping with a 'type', got list"
    )


def test_map_key_that_is_not_json() -> None:
    error = error_of(branching({"model == 'a'": NOOP}))
    assert error.path == "cond_to_policy_map[\"model == 'a'\"]"
    assert error.reason.startswith("the key is not a JSON condition: Expecting value")


@pytest.mark.parametrize(
    ("entries", "path", "reason"),
    [
        (
            "x",
            "config.cond_to_policy_map",
            "must be a list of {condition, policy} entries or a mapping from condition JSON "
            "to policy, got string",
        ),
        (
            [NOOP],
            "cond_to_policy_map[0].type",
            "unknown key 'type': an entry has only 'condition' and 'policy'",
        ),
        (
            [[model_is("a"), NOOP]],
            "cond_to_policy_map[0]",
            "an entry must be a mapping with 'condition' and 'policy', got list",
        ),
        ([{"condition": model_is("a")}], "cond_to_policy_map[0].policy", "missing 'policy'"),
        ([{"policy": NOOP}], "cond_to_policy_map[0].condition", "missing 'condition'"),
    ],
)
def test_entry_errors(entries: Any, path: str, reason: str) -> None:
    error = error_of(branching(entries))
    assert (error.path, error.reason) == (path, reason)


def test_map_is_required_and_keys_are_checked() -> None:
    error = error_of({"type": "BranchingPolicy", "config": {"default_policy": NOOP}})
    assert (error.path, error.reason) == ("config.cond_to_policy_map", "Field required")
    error = error_of(
        {"type": "BranchingPolicy", "config": {"cond_to_policy_map": [], "default": NOOP}}
    )
    assert (error.path, error.reason) == ("config.default", "Extra inputs are not permitted")


def test_map_keys_must_be_strings() -> None:
    error = error_of(branching({1: NOOP}))
    assert (error.path, error.reason) == (
        "config.cond_to_policy_map",
        "a key must be a condition's JSON text, got number 1",
    )
