from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.db.engine import create_engine
from luthien_control.db.policies import (
    activate_version,
    get_policy,
    get_version,
    list_policies,
    list_versions,
    policy_version,
    save_policy,
)
from luthien_control.exceptions import MalformedRequest, NotFound

pytestmark = pytest.mark.anyio

FIRST: dict[str, Any] = {
    "type": "SerialPolicy",
    "config": {"name": "E2E", "policies": [{"type": "NoopPolicy", "config": {}}]},
}
SECOND: dict[str, Any] = {"type": "NoopPolicy", "config": {"name": "quiet"}}


async def test_save_creates_version_one(db: AsyncEngine) -> None:
    stored = await save_policy(db, "root", FIRST)
    assert (stored.name, stored.definition, stored.version) == ("root", FIRST, 1)
    assert stored.created_at == stored.updated_at
    assert await get_policy(db, "root") == stored


async def test_save_again_replaces_the_definition_and_bumps_the_version(db: AsyncEngine) -> None:
    first = await save_policy(db, "root", FIRST)
    second = await save_policy(db, "root", SECOND)
    third = await save_policy(db, "root", SECOND)
    assert (second.version, third.version) == (2, 3)
    assert second.definition == SECOND
    assert third.created_at == first.created_at
    assert first.updated_at <= second.updated_at <= third.updated_at
    assert await get_policy(db, "root") == third
    assert [policy.name for policy in await list_policies(db)] == ["root"]


async def test_policy_version_follows_the_replacements(db: AsyncEngine) -> None:
    assert await policy_version(db, "root") is None
    await save_policy(db, "root", FIRST)
    assert await policy_version(db, "root") == 1
    await save_policy(db, "other", SECOND)
    await save_policy(db, "root", SECOND)
    assert await policy_version(db, "root") == 2
    assert await policy_version(db, "other") == 1


async def test_an_unknown_policy_is_none(db: AsyncEngine) -> None:
    assert await get_policy(db, "nothing") is None


async def test_list_is_sorted_by_name(db: AsyncEngine) -> None:
    assert await list_policies(db) == []
    for name in ("root", "canary", "audit"):
        await save_policy(db, name, FIRST)
    assert [policy.name for policy in await list_policies(db)] == ["audit", "canary", "root"]


async def test_the_definition_comes_back_exactly_with_its_key_order(db: AsyncEngine) -> None:
    definition = {
        "type": "BranchingPolicy",
        "config": {
            "zeta": [1, 2.5, None, True, "ünïcode"],
            "alpha": {"b": 1, "a": {"nested": []}},
        },
    }
    await save_policy(db, "ordered", definition)
    stored = await get_policy(db, "ordered")
    assert stored is not None
    assert json.dumps(stored.definition) == json.dumps(definition)


async def test_saving_copies_the_definition(db: AsyncEngine) -> None:
    definition: dict[str, Any] = {"type": "NoopPolicy", "config": {}}
    stored = await save_policy(db, "root", definition)
    definition["config"]["name"] = "changed afterwards"
    assert stored.definition == {"type": "NoopPolicy", "config": {}}


@pytest.mark.parametrize("name", ["", "  ", "p" * 201])
async def test_invalid_names_are_refused(db: AsyncEngine, name: str) -> None:
    with pytest.raises(MalformedRequest, match="policy name"):
        await save_policy(db, name, FIRST)
    assert await list_policies(db) == []


async def test_concurrent_saves_of_a_new_policy_all_succeed_with_distinct_versions(
    db: AsyncEngine,
) -> None:
    engines = [create_engine(db.url.render_as_string(hide_password=False)) for _ in range(4)]
    versions: list[int] = []

    async def save(engine: AsyncEngine, index: int) -> None:
        stored = await save_policy(engine, "new", {"type": "NoopPolicy", "config": {"n": index}})
        versions.append(stored.version)

    try:
        async with anyio.create_task_group() as group:
            for index, engine in enumerate(engines * 3):
                group.start_soon(save, engine, index)
    finally:
        for engine in engines:
            await engine.dispose()
    assert sorted(versions) == list(range(1, 13))
    assert await policy_version(db, "new") == 12


async def test_every_version_is_kept_newest_first_with_who_stored_it(db: AsyncEngine) -> None:
    await save_policy(db, "root", FIRST, by="cli")
    await save_policy(db, "root", SECOND, by="Ada")
    await save_policy(db, "other", SECOND)
    versions = await list_versions(db, "root")
    assert [(v.version, v.definition, v.created_by, v.in_force) for v in versions] == [
        (2, SECOND, "Ada", True),
        (1, FIRST, "cli", False),
    ]
    assert await list_versions(db, "nothing") == []


async def test_a_version_saved_without_activating_waits_beside_the_one_in_force(
    db: AsyncEngine,
) -> None:
    await save_policy(db, "root", FIRST)
    stored = await save_policy(db, "root", SECOND, activate=False)
    assert (stored.version, stored.definition) == (1, FIRST)
    assert await policy_version(db, "root") == 1
    draft = await get_version(db, "root", 2)
    assert draft is not None
    assert (draft.definition, draft.in_force) == (SECOND, False)
    # The next save numbers after the draft, not after the version in force.
    assert (await save_policy(db, "root", FIRST)).version == 3


async def test_the_first_version_of_a_policy_is_in_force_even_when_not_activated(
    db: AsyncEngine,
) -> None:
    stored = await save_policy(db, "root", FIRST, activate=False)
    assert (stored.version, stored.definition) == (1, FIRST)
    assert [v.in_force for v in await list_versions(db, "root")] == [True]


async def test_activating_an_older_version_puts_it_back_in_force(db: AsyncEngine) -> None:
    await save_policy(db, "root", FIRST)
    await save_policy(db, "root", SECOND)
    stored = await activate_version(db, "root", 1)
    assert (stored.version, stored.definition) == (1, FIRST)
    assert await get_policy(db, "root") == stored
    assert await policy_version(db, "root") == 1
    assert [(v.version, v.in_force) for v in await list_versions(db, "root")] == [
        (2, False),
        (1, True),
    ]
    # Versions are never renumbered: the next save is version 3.
    assert (await save_policy(db, "root", SECOND)).version == 3


async def test_activating_a_version_that_does_not_exist_is_refused(db: AsyncEngine) -> None:
    await save_policy(db, "root", FIRST)
    with pytest.raises(NotFound, match="has no version 7"):
        await activate_version(db, "root", 7)
    with pytest.raises(NotFound, match="has no version 1"):
        await activate_version(db, "nothing", 1)
    assert await policy_version(db, "root") == 1
