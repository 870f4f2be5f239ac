import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies import Policy, PolicyConfig, load_policy, load_policy_file
from luthien_control.policies.branching import BranchingPolicy
from luthien_control.policies.loader import join_path, key_path, load_policy_text, within
from luthien_control.policies.noop import NoopPolicy
from luthien_control.policies.registry import builtin_type_names, resolve
from luthien_control.policies.serial import SerialPolicy


def noop(name: str | None = None) -> dict[str, Any]:
    return {"type": "NoopPolicy", "config": {} if name is None else {"name": name}}


def serial(*members: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "SerialPolicy", "config": {**extra, "policies": list(members)}}


def config_error(data: Any) -> PolicyConfigError:
    with pytest.raises(PolicyConfigError) as info:
        load_policy(data)
    return info.value


# --- registry -----------------------------------------------------------------------


def test_builtin_type_names_lists_every_builtin() -> None:
    assert builtin_type_names() == [
        "SerialPolicy",
        "CompoundPolicy",
        "BranchingPolicy",
        "NoopPolicy",
        "ClientApiKeyAuth",
        "LeakedApiKeyDetection",
        "AddApiKeyHeader",
        "AddApiKeyHeaderFromEnv",
        "SetBackendPolicy",
        "ModelNameReplacement",
        "SendBackendRequest",
        "IncrementIntegers",
        "LLMJudgePolicy",
        "ToolCallPolicy",
        "TransactionContextLoggingPolicy",
    ]


def test_resolve_builtins_and_alias() -> None:
    assert resolve("SerialPolicy", "type") is SerialPolicy
    assert resolve("CompoundPolicy", "type") is SerialPolicy
    assert resolve("BranchingPolicy", "type") is BranchingPolicy
    assert resolve("NoopPolicy", "type") is NoopPolicy


def test_resolve_import_path_of_a_builtin() -> None:
    assert resolve("luthien_control.policies.noop:NoopPolicy", "type") is NoopPolicy


def test_resolve_unknown_name() -> None:
    with pytest.raises(PolicyConfigError) as info:
        resolve("Foo", "policies[2].type")
    assert info.value.path == "policies[2].type"
    assert info.value.reason.startswith("unknown policy type 'Foo' (known: SerialPolicy, ")
    assert "TransactionContextLoggingPolicy" in info.value.reason
    assert str(info.value).startswith("policies[2].type: unknown policy type 'Foo'")


def test_resolve_custom_policy(policy_module: str) -> None:
    cls = resolve(f"{policy_module}:Recorder", "type")
    assert issubclass(cls, Policy)
    assert cls.__name__ == "Recorder"


def test_resolve_unimportable_module() -> None:
    with pytest.raises(PolicyConfigError) as info:
        resolve("no_such_package_xyz.mod:Policy", "type")
    assert info.value.path == "type"
    assert info.value.reason == (
        "cannot import 'no_such_package_xyz.mod': No module named 'no_such_package_xyz'"
    )
    assert isinstance(info.value.__cause__, ImportError)


def test_resolve_class_that_is_not_a_policy(policy_module: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        resolve(f"{policy_module}:NotAPolicy", "type")
    assert info.value.reason == f"'{policy_module}:NotAPolicy' is not a Policy"


def test_resolve_missing_attribute(policy_module: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        resolve(f"{policy_module}:Missing", "type")
    assert info.value.reason == f"'{policy_module}' has no attribute 'Missing'"


@pytest.mark.parametrize("name", [":Class", "module:", ":"])
def test_resolve_malformed_import_path(name: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        resolve(name, "type")
    assert info.value.reason == (
        f"invalid import path {name!r}: expected 'package.module:ClassName'"
    )


def test_importing_the_registry_imports_no_policy_module() -> None:
    code = (
        "import sys, luthien_control.policies.registry; "
        "print(sorted(m for m in sys.modules if m.startswith('luthien_control.policies.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [
        "['luthien_control.policies.base',",
        "'luthien_control.policies.loader',",
        "'luthien_control.policies.registry']",
    ]


# --- paths --------------------------------------------------------------------------


def test_path_helpers() -> None:
    assert join_path("", "config") == "config"
    assert join_path("policies[1]", "config", "patterns", 2) == "policies[1].config.patterns[2]"
    assert join_path("policies", 0) == "policies[0]"
    assert join_path("config", "limits", 1, "[key]") == "config.limits[1][key]"
    assert key_path("cond_to_policy_map", 'a"b') == 'cond_to_policy_map["a\\"b"]'
    assert within("", "config.name") == "config.name"
    assert within("policies[1]", "") == "policies[1]"
    assert within("policies[1]", "config.name") == "policies[1].config.name"
    assert within("default_policy", "[0]") == "default_policy[0]"


# --- structural errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ([], "", "a policy must be a mapping with 'type' and 'config', got list"),
        ({"config": {}}, "type", "missing 'type'"),
        ({"type": "NoopPolicy"}, "config", "missing 'config'"),
        (
            {"type": "NoopPolicy", "config": {}, "name": "x"},
            "name",
            "unknown key 'name': a policy has only 'type' and 'config'",
        ),
        ({"type": 3, "config": {}}, "type", "must be a string, got number"),
        ({"type": "NoopPolicy", "config": None}, "config", "must be a mapping, got null"),
        ({"type": "NoopPolicy", "config": []}, "config", "must be a mapping, got list"),
    ],
)
def test_root_structure_errors(data: Any, path: str, reason: str) -> None:
    error = config_error(data)
    assert (error.path, error.reason) == (path, reason)


def test_root_unknown_type() -> None:
    error = config_error({"type": "Foo", "config": {}})
    assert error.path == "type"
    assert error.reason.startswith("unknown policy type 'Foo' (known: ")


@pytest.mark.parametrize(
    ("member", "path", "reason"),
    [
        (
            "NoopPolicy",
            "policies[1]",
            "a policy must be a mapping with 'type' and 'config', got string",
        ),
        ({"type": "NoopPolicy"}, "policies[1].config", "missing 'config'"),
        ({"config": {}}, "policies[1].type", "missing 'type'"),
        (
            {"type": "NoopPolicy", "config": {}, "extra": 1},
            "policies[1].extra",
            "unknown key 'extra': a policy has only 'type' and 'config'",
        ),
        (
            {"type": "NoopPolicy", "config": "x"},
            "policies[1].config",
            "must be a mapping, got string",
        ),
    ],
)
def test_member_structure_errors(member: Any, path: str, reason: str) -> None:
    error = config_error(serial(noop(), member))
    assert (error.path, error.reason) == (path, reason)
    assert str(error) == f"{path}: {reason}"


def test_unknown_type_of_a_nested_member() -> None:
    error = config_error(serial(noop(), serial(noop(), {"type": "Foo", "config": {}})))
    assert error.path == "policies[1].policies[1].type"
    assert error.reason.startswith("unknown policy type 'Foo'")


# --- config validation --------------------------------------------------------------


def test_unknown_config_key() -> None:
    error = config_error({"type": "NoopPolicy", "config": {"pattern": "x"}})
    assert (error.path, error.reason) == ("config.pattern", "Extra inputs are not permitted")


def test_wrong_type_in_root_config() -> None:
    error = config_error({"type": "NoopPolicy", "config": {"name": 3}})
    assert (error.path, error.reason) == ("config.name", "Input should be a valid string")


def test_wrong_type_of_a_field_in_a_nested_member() -> None:
    error = config_error(
        serial(
            noop(), serial(noop("inner"), noop(), {"type": "NoopPolicy", "config": {"name": []}})
        )
    )
    assert error.path == "policies[1].policies[2].config.name"
    assert error.reason == "Input should be a valid string"
    assert str(error) == "policies[1].policies[2].config.name: Input should be a valid string"


def test_unknown_key_in_a_nested_member_config() -> None:
    error = config_error(serial(serial(noop(), {"type": "NoopPolicy", "config": {"nme": "x"}})))
    assert (error.path, error.reason) == (
        "policies[0].policies[1].config.nme",
        "Extra inputs are not permitted",
    )


def test_composite_field_of_the_wrong_type() -> None:
    error = config_error({"type": "SerialPolicy", "config": {"policies": {"a": 1}}})
    assert (error.path, error.reason) == ("config.policies", "Input should be a valid list")


def test_missing_required_field() -> None:
    error = config_error({"type": "SerialPolicy", "config": {}})
    assert (error.path, error.reason) == ("config.policies", "Field required")


def test_sub_paths_inside_a_field(policy_module: str) -> None:
    patterns = {"type": f"{policy_module}:Patterns", "config": {"patterns": ["a", "b", 3]}}
    error = config_error(serial(noop(), noop(), patterns))
    assert (error.path, error.reason) == (
        "policies[2].config.patterns[2]",
        "Input should be a valid string",
    )
    limits = {
        "type": f"{policy_module}:Patterns",
        "config": {"patterns": [], "limits": {"rpm": "x"}},
    }
    error = config_error(serial(limits))
    assert (error.path, error.reason) == (
        "policies[0].config.limits.rpm",
        "Input should be a valid integer",
    )


def test_several_errors_become_one(policy_module: str) -> None:
    data = {
        "type": f"{policy_module}:Patterns",
        "config": {"patterns": [1, "b", 2], "name": 4, "x": 0},
    }
    error = config_error(serial(data))
    # In the order of the config's fields: ``name`` (from PolicyConfig) comes first.
    assert error.path == "policies[0].config.name"
    assert error.reason == (
        "Input should be a valid string; "
        "policies[0].config.patterns[0]: Input should be a valid string; "
        "policies[0].config.patterns[2]: Input should be a valid string; "
        "policies[0].config.x: Extra inputs are not permitted"
    )


def test_strict_types_are_not_coerced(policy_module: str) -> None:
    data = {"type": f"{policy_module}:Patterns", "config": {"patterns": [], "limits": {"rpm": "5"}}}
    error = config_error(data)
    assert (error.path, error.reason) == ("config.limits.rpm", "Input should be a valid integer")


def test_errors_raised_by_a_policy_init_get_the_members_path(policy_module: str) -> None:
    bad = {"type": f"{policy_module}:BadInit", "config": {}}
    assert config_error(bad).path == "config.name"
    error = config_error(serial(noop(), serial(bad)))
    assert (error.path, error.reason) == (
        "policies[1].policies[0].config.name",
        "rejected by __init__",
    )


# --- loading and round trips --------------------------------------------------------

LIST_BRANCHING = {
    "type": "BranchingPolicy",
    "config": {
        "name": "Route",
        "cond_to_policy_map": [
            {
                "condition": {
                    "type": "equals",
                    "left": {"type": "transaction_path", "path": "request.payload.model"},
                    "right": {"type": "static", "value": "gpt-4o"},
                },
                "policy": serial(noop("a"), noop()),
            }
        ],
        "default_policy": None,
    },
}
MAP_BRANCHING = {
    "type": "BranchingPolicy",
    "config": {
        "cond_to_policy_map": {
            json.dumps(
                {
                    "type": "regex_match",
                    "left": {"type": "transaction_path", "path": "request.payload.model"},
                    "right": {"type": "static", "value": "^gpt-"},
                    "comparator": "regex_match",
                }
            ): noop("gpt"),
            json.dumps({"type": "not", "cond": {"type": "all", "conditions": []}}): {
                "type": "CompoundPolicy",
                "config": {"policies": [noop()]},
            },
        },
        "default_policy": noop("default"),
    },
}
TREES = [
    noop(),
    noop("named"),
    serial(),
    serial(noop(), name="Outer"),
    {"type": "CompoundPolicy", "config": {"name": "Old", "policies": [noop(), serial(noop())]}},
    {"type": "luthien_control.policies.noop:NoopPolicy", "config": {}},
    LIST_BRANCHING,
    MAP_BRANCHING,
    serial(
        noop(), LIST_BRANCHING, {"type": "CompoundPolicy", "config": {"policies": [MAP_BRANCHING]}}
    ),
]


@pytest.mark.parametrize("tree", TREES)
def test_round_trip_is_exact(tree: dict[str, Any]) -> None:
    assert load_policy(tree).serialize() == tree


def test_round_trip_of_a_custom_policy(policy_module: str) -> None:
    tree = serial({"type": f"{policy_module}:Patterns", "config": {"patterns": ["x"]}})
    policy = load_policy(tree)
    assert policy.serialize() == tree
    assert isinstance(policy, SerialPolicy)
    assert policy.policies[0].loaded_as == f"{policy_module}:Patterns"


def test_alias_is_loaded_as_the_same_class() -> None:
    policy = load_policy({"type": "CompoundPolicy", "config": {"policies": []}})
    assert type(policy) is SerialPolicy
    assert policy.loaded_as == "CompoundPolicy"
    assert policy.serialize()["type"] == "CompoundPolicy"


def test_loaded_policy_does_not_share_the_input() -> None:
    tree = serial(noop())
    policy = load_policy(tree)
    tree["config"]["policies"].append(noop())
    assert policy.serialize() == serial(noop())
    serialized = policy.serialize()
    serialized["config"]["policies"].clear()
    assert policy.serialize() == serial(noop())


def test_name_comes_from_config() -> None:
    assert load_policy(noop("Mine")).name == "Mine"
    assert load_policy(noop()).name == "NoopPolicy"


# --- texts and files ----------------------------------------------------------------

YAML_TREE = """\
type: SerialPolicy
config:
  name: FromYaml
  policies:
    - type: NoopPolicy
      config: {}
    - type: BranchingPolicy
      config:
        cond_to_policy_map:
          - condition:
              type: contains
              left: {type: transaction_path, path: request.payload.model}
              right: {type: static, value: gpt}
            policy: {type: NoopPolicy, config: {name: gpt}}
        default_policy: null
"""


def test_load_policy_text_yaml_and_json() -> None:
    from_yaml = load_policy_text(YAML_TREE, "yaml")
    assert from_yaml.name == "FromYaml"
    text = json.dumps(from_yaml.serialize())
    assert load_policy_text(text, "json").serialize() == from_yaml.serialize()


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml", ".policy", ""])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    tree = TREES[-1]
    file = tmp_path / f"policy{suffix}"
    text = json.dumps(tree, indent=2) if suffix in (".json", "") else _yaml_dump(tree)
    file.write_text(text)
    policy = load_policy_file(file)
    assert policy.serialize() == tree
    again = tmp_path / "again.json"
    again.write_text(json.dumps(policy.serialize()))
    assert load_policy_file(str(again)).serialize() == policy.serialize()


def test_yaml_file_in_the_list_form(tmp_path: Path) -> None:
    file = tmp_path / "policy.yaml"
    file.write_text(YAML_TREE)
    policy = load_policy_file(file)
    assert isinstance(policy, SerialPolicy)
    branching = policy.policies[1]
    assert isinstance(branching, BranchingPolicy)
    assert branching.serialize()["config"]["cond_to_policy_map"][0]["policy"] == {
        "type": "NoopPolicy",
        "config": {"name": "gpt"},
    }


def _yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def file_error(tmp_path: Path, name: str, text: str | bytes) -> PolicyConfigError:
    file = tmp_path / name
    if isinstance(text, bytes):
        file.write_bytes(text)
    else:
        file.write_text(text)
    with pytest.raises(PolicyConfigError) as info:
        load_policy_file(file)
    return info.value


def test_json_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = '{\n  "type": "NoopPolicy",\n  "config": {,}\n}\n'
    error = file_error(tmp_path, "p.json", text)
    assert error.path == ""
    assert re.fullmatch(
        r"invalid JSON in '.*p\.json' at line 3, column 14: Expecting property name enclosed "
        r"in double quotes",
        error.reason,
    )


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = "type: NoopPolicy\nconfig:\n  name: [unclosed\n  other: x\n"
    error = file_error(tmp_path, "p.yaml", text)
    assert re.fullmatch(r"invalid YAML in '.*p\.yaml' at line \d, column \d+: .+", error.reason)
    assert " at line 4, " in error.reason

    text = "type: NoopPolicy\nconfig: {}\n  bad indent: 1\n"
    error = file_error(tmp_path, "q.yml", text)
    assert " at line 3, " in error.reason


def test_unknown_extension_falls_back_to_yaml_errors(tmp_path: Path) -> None:
    error = file_error(tmp_path, "p.conf", "type: NoopPolicy\nconfig: [\n")
    assert error.reason.startswith("invalid YAML in ")
    assert " at line 3, " in error.reason


@pytest.mark.parametrize("name", ["p.json", "p.yaml", "p.txt"])
@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    error = file_error(tmp_path, name, text)
    assert re.fullmatch(rf"policy '.*{re.escape(name)}' is empty", error.reason)


def test_yaml_file_with_only_comments_is_empty(tmp_path: Path) -> None:
    error = file_error(tmp_path, "p.yaml", "# nothing here\n")
    assert error.reason.endswith("is empty")


def test_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "absent.json"
    with pytest.raises(PolicyConfigError) as info:
        load_policy_file(file)
    assert info.value.reason == f"cannot read policy file {str(file)!r}: No such file or directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    error = file_error(tmp_path, "p.json", b'{"type": "\xff"}')
    assert error.reason.startswith("cannot read policy file ")
    assert "not UTF-8" in error.reason


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    error = file_error(tmp_path, "p.json", '{"type": "NoopPolicy", "config": {}, "type": "X"}')
    assert error.reason.endswith(": duplicate key 'type'")
    error = file_error(tmp_path, "p.yaml", "type: NoopPolicy\nconfig: {}\ntype: Other\n")
    assert "found duplicate key 'type'" in error.reason
    assert " at line 3, " in error.reason


def test_policy_errors_in_a_file_keep_their_path(tmp_path: Path) -> None:
    error = file_error(tmp_path, "p.yaml", YAML_TREE.replace("name: gpt", "name: 7"))
    assert error.path == "policies[1].cond_to_policy_map[0].policy.config.name"
    assert error.reason == "Input should be a valid string"


def test_reexports() -> None:
    assert PolicyConfig.__name__ == "PolicyConfig"
    assert callable(load_policy_file)
