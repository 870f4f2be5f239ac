from typing import Any

import pytest

from luthien_control.exceptions import PolicyBlocked, PolicyConfigError
from luthien_control.policies import load_policy
from luthien_control.policies.noop import NoopPolicy
from luthien_control.policies.serial import SerialPolicy
from luthien_control.transaction import Transaction


def applied(tx: Transaction) -> list[tuple[str, str]]:
    return [(d.policy, d.action) for d in tx.decisions]


@pytest.fixture
def recorder(policy_module: str) -> Any:
    def make(name: str) -> dict[str, Any]:
        return {"type": f"{policy_module}:Recorder", "config": {"name": name}}

    return make


@pytest.fixture
def blocker(policy_module: str) -> dict[str, Any]:
    return {"type": f"{policy_module}:Blocker", "config": {"name": "stop"}}


def serial(*members: dict[str, Any], alias: str = "SerialPolicy") -> dict[str, Any]:
    return {"type": alias, "config": {"policies": list(members)}}


def test_members_are_built_in_order() -> None:
    policy = load_policy(
        serial({"type": "NoopPolicy", "config": {"name": "a"}}, serial(), alias="CompoundPolicy")
    )
    assert isinstance(policy, SerialPolicy)
    assert [type(p) for p in policy.policies] == [NoopPolicy, SerialPolicy]
    assert [p.name for p in policy.policies] == ["a", "SerialPolicy"]
    assert policy.name == "SerialPolicy"


@pytest.mark.anyio
async def test_applies_members_in_order(tx: Transaction, recorder: Any) -> None:
    policy = load_policy(
        serial(recorder("one"), serial(recorder("two"), recorder("three")), recorder("four"))
    )
    await policy.apply(tx)
    assert applied(tx) == [
        ("one", "applied"),
        ("two", "applied"),
        ("three", "applied"),
        ("four", "applied"),
    ]


@pytest.mark.anyio
async def test_a_member_that_raises_stops_the_chain(
    tx: Transaction, recorder: Any, blocker: dict[str, Any]
) -> None:
    policy = load_policy(
        serial(recorder("one"), serial(recorder("two"), blocker), recorder("never"))
    )
    with pytest.raises(PolicyBlocked) as info:
        await policy.apply(tx)
    assert info.value.policy == "stop"
    assert applied(tx) == [("one", "applied"), ("two", "applied"), ("stop", "blocked")]


@pytest.mark.anyio
async def test_alias_applies_the_same_way(tx: Transaction, recorder: Any) -> None:
    policy = load_policy(serial(recorder("one"), recorder("two"), alias="CompoundPolicy"))
    await policy.apply(tx)
    assert applied(tx) == [("one", "applied"), ("two", "applied")]


@pytest.mark.anyio
async def test_empty_serial_does_nothing(tx: Transaction) -> None:
    await load_policy(serial()).apply(tx)
    assert tx.decisions == []
    assert tx.response is None


def test_member_errors_name_the_member() -> None:
    with pytest.raises(PolicyConfigError) as info:
        load_policy(serial(serial(), serial(serial(), {"type": "NoopPolicy", "config": {"x": 1}})))
    assert info.value.path == "policies[1].policies[1].config.x"


def test_config_must_be_a_serial_config() -> None:
    with pytest.raises(TypeError):
        SerialPolicy(NoopPolicy.Config(), {})
