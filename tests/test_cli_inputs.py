"""Hostile input for the command line: every command, on every input, answers with one
line on stderr and a non-zero exit, never a traceback (issue 11).

Most cases run in-process through ``luthien_control.cli.main``; a handful run the real
entry point as a subprocess. A seeded mutation loop over valid policy files checks that
a mutated file is either valid or refused in one line, never a bug (exit 1):
``LUTHIEN_FUZZ_ITERATIONS`` raises its count (a longer soak), ``LUTHIEN_FUZZ_SEED``
changes its seed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from luthien_control.cli import MAX_MESSAGE_CHARS, main, one_line
from luthien_control.db.engine import create_engine
from luthien_control.db.init_db import upgrade
from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies.loader import (
    MAX_DOCUMENT_DEPTH,
    MAX_DOCUMENT_VALUES,
    MAX_POLICY_DEPTH,
    MAX_POLICY_FILE_BYTES,
    check_document,
    parse_text,
)
from tests.conftest import run_cli

ERROR = "luthien-control: error: "
FUZZ_ITERATIONS = int(os.environ.get("LUTHIEN_FUZZ_ITERATIONS", "60"))
FUZZ_SEED = int(os.environ.get("LUTHIEN_FUZZ_SEED", "11"))

POLICY: dict[str, Any] = {
    "type": "SerialPolicy",
    "config": {
        "name": "Fuzzed",
        "policies": [
            {"type": "ClientApiKeyAuth", "config": {}},
            {"type": "LeakedApiKeyDetection", "config": {"patterns": ["sk-[A-Za-z0-9]{20,}"]}},
            {"type": "ModelNameReplacement", "config": {"model_mapping": {"fast": "gpt-4o"}}},
            {
                "type": "BranchingPolicy",
                "config": {
                    "cond_to_policy_map": [
                        {
                            "condition": {
                                "type": "equals",
                                "left": {
                                    "type": "transaction_path",
                                    "path": "request.payload.model",
                                },
                                "right": {"type": "static", "value": 42},
                            },
                            "policy": {"type": "NoopPolicy", "config": {}},
                        }
                    ],
                    "default_policy": {"type": "NoopPolicy", "config": {}},
                },
            },
            {"type": "SetBackendPolicy", "config": {"backend_url": "http://127.0.0.1:9/v1"}},
            {"type": "SendBackendRequest", "config": {}},
        ],
    },
}


# --- helpers -------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *, status: int = 2, what: str = "") -> str:
    """The answer to a mistake: the status, and exactly one escaped line on stderr."""
    assert code == status, (what, err)
    assert "Traceback" not in err, what
    assert err.startswith(ERROR), (what, err)
    assert err.endswith("\n") and err.count("\n") == 1, (what, err)
    line = err.removesuffix("\n")
    assert line.isprintable(), (what, line)  # no control character reaches the terminal
    assert len(line) <= len(ERROR) + MAX_MESSAGE_CHARS, what
    return line


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def policy_chain(depth: int) -> dict[str, Any]:
    """``depth`` policies, each a SerialPolicy holding the next (a NoopPolicy last)."""
    policy: dict[str, Any] = {"type": "NoopPolicy", "config": {}}
    for _ in range(depth - 1):
        policy = {"type": "SerialPolicy", "config": {"policies": [policy]}}
    return policy


def noop_with(value: str) -> str:
    """A policy file whose one (invalid) config field holds ``value``, as JSON text."""
    return '{"type": "NoopPolicy", "config": {"x": ' + value + "}}"


def yaml_laughs(levels: int) -> str:
    """Aliases that expand to 10**levels values (each level lists the previous ten times)."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, levels + 1):
        refs = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite ``DATABASE_URL``; the working directory is a temporary one."""
    path = tmp_path / "luthien.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:///" + str(path))
    return path


# --- hostile policy files --------------------------------------------------------------

# name, file name, content, a part of the expected error message
HOSTILE_FILES: list[tuple[str, str, bytes, str]] = [
    ("json-list-5000-deep", "p.json", b"[" * 5000 + b"]" * 5000, "nested deeper than 200"),
    ("json-object-5000-deep", "p.json", b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested deeper"),
    ("json-unclosed-5000-deep", "p.json", b"[" * 5000, "nested deeper than 200"),
    ("yaml-flow-5000-deep", "p.yaml", b"[" * 5000 + b"]" * 5000, "nested deeper than 200"),
    (
        "yaml-block-300-deep",
        "p.yaml",
        "".join(" " * i + "a:\n" for i in range(300)).encode() + b" " * 300 + b"b\n",
        "nested deeper than 200",
    ),
    ("yaml-unknown-extension-deep", "p.conf", b"[" * 5000, "nested deeper than 200"),
    (
        "policy-tree-200-deep",
        "p.json",
        json.dumps(policy_chain(200)).encode(),
        "nested deeper than 200",
    ),
    (
        "policy-tree-200-deep-yaml",
        "p.yaml",
        json.dumps(policy_chain(200)).encode(),  # JSON is YAML (flow style)
        "nested deeper than 200",
    ),
    ("json-int-5000-digits", "p.json", noop_with("9" * 5000).encode(), "5000 digits"),
    ("json-negative-int-5000-digits", "p.json", noop_with("-" + "7" * 5000).encode(), "5000"),
    ("yaml-int-5000-digits", "p.yaml", b"type: NoopPolicy\nconfig:\n  x: " + b"9" * 5000, "5000"),
    ("yaml-hex-int-huge", "p.yaml", b"type: NoopPolicy\nconfig:\n  x: 0x" + b"f" * 5000, "range"),
    ("json-int-beyond-64-bits", "p.json", noop_with("18446744073709551616").encode(), "range"),
    ("json-float-overflow", "p.json", noop_with("1e999").encode(), "not a JSON number"),
    ("json-nan", "p.json", noop_with("NaN").encode(), "not a JSON number"),
    ("yaml-infinity", "p.yaml", b"type: NoopPolicy\nconfig: {x: .inf}\n", "not a JSON number"),
    ("yaml-nul", "p.yaml", b"type: NoopPolicy\x00\nconfig: {}\n", "'\\x00' is not allowed"),
    ("json-nul", "p.json", b'{"type": "Noop\x00Policy", "config": {}}', "invalid JSON"),
    ("json-escape-sequence", "p.json", b'{"type": "\x1b[2J\x1b[31mred", "config": {}}', "JSON"),
    (
        "escape-in-type-name",
        "p.json",
        b'{"type": "\\u001b]0;owned\\u0007\\u202e", "config": {}}',
        "unknown policy type",
    ),
    ("escape-in-key", "p.yaml", b'"\\e[2J\\r\\n": 1\ntype: NoopPolicy\nconfig: {}\n', "unknown"),
    ("invalid-utf8", "p.json", b'{"type": "\xff\xfe\xed\xa0\x80"}', "not UTF-8"),
    ("binary-garbage", "p.bin", random.Random(0).randbytes(4096), "not UTF-8"),
    ("utf16-text", "p.json", json.dumps(POLICY).encode("utf-16"), "not UTF-8"),
    ("empty", "p.json", b"", "is empty"),
    ("only-whitespace", "p.yaml", b" \n\t\n", "is empty"),
    ("only-a-bom", "p.json", b"\xef\xbb\xbf", "is empty"),
    ("huge", "p.json", b" " * (MAX_POLICY_FILE_BYTES + 1), "larger than 1048576 bytes"),
    ("yaml-cyclic-alias", "p.yaml", b"&a [*a]\n", "nested deeper than 200"),
    (
        "yaml-aliases-make-it-deep",
        "p.yaml",
        b"a: &a " + b"[" * 150 + b"]" * 150 + b"\nb: " + b"[" * 100 + b"*a" + b"]" * 100 + b"\n",
        "nested deeper than 200",
    ),
    ("yaml-billion-laughs", "p.yaml", yaml_laughs(9).encode(), f"more than {MAX_DOCUMENT_VALUES}"),
    ("yaml-merge-keys", "p.yaml", b"a: &a {k: 1}\nb: {<<: [*a, *a]}\n", "merge keys"),
    ("yaml-impossible-date", "p.yaml", b"type: NoopPolicy\nconfig: {x: 2026-13-45}\n", "month"),
    ("yaml-date", "p.yaml", b"type: NoopPolicy\nconfig: {x: 2026-01-31}\n", "quote it"),
    ("yaml-binary", "p.yaml", b"type: NoopPolicy\nconfig: {x: !!binary aGk=}\n", "JSON value"),
    ("yaml-set", "p.yaml", b"type: NoopPolicy\nconfig: {x: !!set {a, b}}\n", "set is not"),
    ("yaml-python-tag", "p.yaml", b"!!python/object/apply:os.system [id]\n", "invalid YAML"),
    ("yaml-two-documents", "p.yaml", b"type: NoopPolicy\n---\ntype: NoopPolicy\n", "YAML"),
    ("yaml-tab-indent", "p.yaml", b"type: NoopPolicy\nconfig:\n\tx: 1\n", "invalid YAML"),
    ("json-duplicate-key", "p.json", b'{"type": "NoopPolicy", "type": "X", "config": {}}', "dup"),
    ("json-trailing-garbage", "p.json", json.dumps(POLICY).encode() + b"\x00junk", "Extra data"),
    ("a-list", "p.json", b"[1, 2, 3]", "must be a mapping"),
    ("a-string", "p.json", b'"SerialPolicy"', "must be a mapping"),
    ("unknown-module", "p.json", b'{"type": "no_such_module_x:P", "config": {}}', "cannot import"),
]


def write_hostile(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param(name, content, expected, id=case)
        for case, name, content, expected in HOSTILE_FILES
    ],
)
def test_policy_validate_refuses_a_hostile_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, expected: str
) -> None:
    path = write_hostile(tmp_path, name, content)
    code, out, err = run(capsys, "policy", "validate", str(path))
    line = assert_one_line_error(code, err)
    assert out == ""
    assert expected in line


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param(name, content, expected, id=case)
        for case, name, content, expected in HOSTILE_FILES
    ],
)
def test_policy_load_refuses_a_hostile_file_in_one_line(
    database: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes,
    expected: str,
) -> None:
    path = write_hostile(tmp_path, name, content)
    code, out, err = run(capsys, "policy", "load", str(path), "--name", "root")
    line = assert_one_line_error(code, err)
    assert out == ""
    assert expected in line
    assert run(capsys, "policy", "list") == (0, "no policies\n", "")


def test_control_characters_from_a_file_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_hostile(tmp_path, "p.json", b'{"type": "\\u001b[2J\\u009b31m\\n", "config": {}}')
    code, _, err = run(capsys, "policy", "validate", str(path))
    line = assert_one_line_error(code, err)
    assert "unknown policy type '\\x1b[2J\\x9b31m\\n'" in line


def test_a_missing_or_strange_path_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strange = os.fsdecode(b"\xff\x1b[31m.json")  # not UTF-8, with an escape sequence
    for path, expected in [
        (tmp_path / "absent.json", "No such file or directory"),
        (tmp_path, "Is a directory"),
        (tmp_path / strange, "No such file or directory"),
        (tmp_path / ("x" * 5000), "File name too long"),
        (Path(""), "cannot read policy file"),
        (Path("/proc/self/mem"), "Input/output error"),  # unreadable, even for root
    ]:
        code, _, err = run(capsys, "policy", "validate", str(path))
        assert expected in assert_one_line_error(code, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_hostile(tmp_path, "p.json", json.dumps(POLICY).encode())
    path.chmod(0)
    code, _, err = run(capsys, "policy", "validate", str(path))
    assert "Permission denied" in assert_one_line_error(code, err)


def test_names_stored_elsewhere_are_escaped_in_tables(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name already in the database (stored before names were checked for control and
    invisible characters, or written there by hand) may hold anything: ``keys list``
    shows it escaped."""
    from luthien_control.db.engine import transaction
    from luthien_control.db.keys import hash_key
    from luthien_control.db.models import ClientKeyRow

    async def store() -> None:
        engine = create_engine(os.environ["DATABASE_URL"])
        try:
            await upgrade(engine)
            async with transaction(engine) as session:
                session.add(
                    ClientKeyRow(
                        name="\x1b]0;owned\x07\u202e",
                        key_hash=hash_key("lc-escaped-key-0123456789"),
                        key_prefix="lc-escap",
                    )
                )
        finally:
            await engine.dispose()

    asyncio.run(store())
    code, out, err = run(capsys, "keys", "list")
    assert (code, err) == (0, "")
    assert all(line.isprintable() for line in out.splitlines())
    assert "\\x1b]0;owned\\x07\\u202e" in out


# --- the limits themselves -------------------------------------------------------------


def test_policies_may_be_nested_to_the_limit_and_not_deeper(
    database: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deepest = write_hostile(
        tmp_path, "deepest.json", json.dumps(policy_chain(MAX_POLICY_DEPTH)).encode()
    )
    assert run(capsys, "policy", "validate", str(deepest))[0] == 0
    assert run(capsys, "policy", "load", str(deepest), "--name", "deep")[0] == 0
    code, out, _ = run(capsys, "policy", "show", "deep")
    assert code == 0 and json.loads(out) == json.loads(deepest.read_text())

    too_deep = write_hostile(
        tmp_path, "too-deep.json", json.dumps(policy_chain(MAX_POLICY_DEPTH + 1)).encode()
    )
    code, _, err = run(capsys, "policy", "validate", str(too_deep))
    line = assert_one_line_error(code, err)
    path = ".".join(["policies[0]"] * MAX_POLICY_DEPTH)
    assert line.endswith(f"{path}: policies nested deeper than 64 levels (the limit)")


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_documents_may_be_nested_to_the_limit_and_not_deeper(fmt: Literal["json", "yaml"]) -> None:
    deepest = nested(MAX_DOCUMENT_DEPTH)
    assert parse_text(json.dumps(deepest), fmt, "p") == deepest
    check_document(deepest)

    with pytest.raises(PolicyConfigError, match="nested deeper than 200 levels"):
        parse_text(json.dumps(nested(MAX_DOCUMENT_DEPTH + 1)), fmt, "p")
    with pytest.raises(PolicyConfigError) as caught:
        check_document({"config": nested(MAX_DOCUMENT_DEPTH)})
    assert caught.value.path == "config" + "[0]" * (MAX_DOCUMENT_DEPTH - 1)
    assert caught.value.reason == "nested deeper than 200 levels (the limit)"


def test_brackets_inside_json_strings_do_not_count() -> None:
    text = json.dumps({"type": "NoopPolicy", "config": {"name": "[{" * 5000 + '\\"'}})
    assert parse_text(text, "json", "p")["config"]["name"] == "[{" * 5000 + '\\"'


def test_an_error_line_is_escaped_and_keeps_its_end() -> None:
    message = "policies[0]" * 500 + ": \x1b[2Jwhat is wrong\n"
    line = one_line(message)
    assert line.isprintable() and len(line) <= MAX_MESSAGE_CHARS
    assert line.startswith("policies[0]policies[0]")
    assert line.endswith(": \\x1b[2Jwhat is wrong\\n")


# --- hostile arguments -----------------------------------------------------------------

ARGUMENTS: list[tuple[str, list[str], str]] = [
    ("nothing", [], "required: COMMAND"),
    ("unknown-command", ["frobnicate"], "invalid choice"),
    ("escape-as-command", ["\x1b[2J"], "invalid choice: '\\x1b[2J'"),
    ("policy-alone", ["policy"], "required"),
    ("validate-without-file", ["policy", "validate"], "required: file"),
    ("validate-two-files", ["policy", "validate", "a", "b"], "unrecognized arguments"),
    ("load-without-name", ["policy", "load", "p.json"], "--name"),
    ("load-bad-name", ["policy", "load", "p.json", "--name", "a\nb"], "printable"),
    ("show-undecodable-name", ["policy", "show", "\udcff"], "printable"),
    ("show-unknown", ["policy", "show", "nothing"], "no policy named 'nothing'"),
    ("show-long-name", ["policy", "show", "x" * 100_000], "no policy named"),
    ("keys-add-without-name", ["keys", "add"], "--name"),
    ("keys-add-blank-name", ["keys", "add", "--name", " "], "must not be empty"),
    ("keys-add-long-name", ["keys", "add", "--name", "n" * 10_000], "at most"),
    ("keys-add-escape-name", ["keys", "add", "--name", "\x1b]0;x\x07"], "printable"),
    ("keys-add-bidi-name", ["keys", "add", "--name", "a\u202eb"], "printable"),
    ("keys-add-undecodable-key", ["keys", "add", "--name", "k", "--key", "\udcff"], "printable"),
    ("keys-add-spaced-key", ["keys", "add", "--name", "k", "--key", "a b"], "whitespace"),
    ("keys-add-empty-key", ["keys", "add", "--name", "k", "--key", ""], "must not be empty"),
    ("keys-revoke-unknown", ["keys", "revoke", "nobody"], "no key named"),
    ("keys-revoke-tab", ["keys", "revoke", "a\tb"], "printable"),
    ("logs-limit-negative", ["logs", "--limit", "-1"], "from 1 to 1000000, got '-1'"),
    ("logs-limit-zero", ["logs", "--limit", "0"], "from 1 to 1000000"),
    ("logs-limit-huge", ["logs", "--limit", "9" * 30], "from 1 to 1000000"),
    ("logs-limit-5000-digits", ["logs", "--limit", "9" * 5000], "(5000 characters)"),
    ("logs-limit-not-a-number", ["logs", "--limit", "ten"], "got 'ten'"),
    ("logs-limit-float", ["logs", "--limit", "1e3"], "got '1e3'"),
    ("logs-transaction-empty", ["logs", "--transaction", ""], "no transaction ''"),
    ("logs-transaction-sql", ["logs", "--transaction", "' OR 1=1 --"], "no transaction"),
    ("logs-transaction-long", ["logs", "--transaction", "t" * 100_000], "no transaction"),
    ("logs-transaction-undecodable", ["logs", "--transaction", "\udcff\udcfe"], "printable"),
    ("logs-transaction-escape", ["logs", "--transaction", "\x1b[2J"], "'\\x1b[2J'"),
    ("logs-since-overflow", ["logs", "--since", "99999999999d"], "expected a time"),
    ("logs-since-5000-digits", ["logs", "--since", "9" * 5000 + "m"], "expected a time"),
    ("logs-since-words", ["logs", "--since", "yesterday"], "expected a time"),
    ("logs-since-negative", ["logs", "--since", "-5m"], "--since"),
    ("logs-unknown-flag", ["logs", "--tail"], "unrecognized arguments"),
    ("serve-port-too-high", ["serve", "--port", "70000"], "from 0 to 65535"),
    ("serve-port-negative", ["serve", "--port", "-1"], "from 0 to 65535"),
    ("serve-workers-zero", ["serve", "--workers", "0"], "from 1 to 256"),
    ("serve-workers-huge", ["serve", "--workers", "100000"], "from 1 to 256"),
    ("serve-host-newline", ["serve", "--host", "a\nb"], "printable"),
    ("mock-backend-port", ["mock-backend", "--port", "65536"], "from 0 to 65535"),
    ("mock-backend-deep-scenario", ["mock-backend", "--scenario", "[" * 5000], "scenario"),
    ("init-db-extra", ["init-db", "now"], "unrecognized arguments"),
]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [pytest.param(argv, expected, id=case) for case, argv, expected in ARGUMENTS],
)
def test_a_bad_argument_is_one_line(
    database: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run(capsys, *argv)
    line = assert_one_line_error(code, err)
    assert out == ""
    assert expected in line


def test_a_bad_database_url_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for url in ["mysql://x", "sqlite+aiosqlite:////dev/null/x.db", "\x1b[2J", "::"]:
        monkeypatch.setenv("DATABASE_URL", url)
        code, _, err = run(capsys, "keys", "list")
        assert_one_line_error(code, err)


# --- bugs: one line, the traceback only when asked for ---------------------------------


def _explode(*_: Any) -> None:
    raise ZeroDivisionError("a bug\nwith two lines")


@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "debug"])
def test_an_unexpected_error_is_one_line_with_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    debug: list[str],
) -> None:
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    monkeypatch.setattr("luthien_control.policies.loader.load_policy_file", _explode)
    code, _, err = run(capsys, *debug, "policy", "validate", str(tmp_path / "p.json"))
    expected = (
        f"{ERROR}unexpected ZeroDivisionError: a bug\\nwith two lines "
        "(a bug; run with --debug for the traceback)"
    )
    if debug:
        assert code == 1
        assert err.startswith("Traceback")
        assert err.splitlines()[-1] == expected
    else:
        assert assert_one_line_error(code, err, status=1) == expected


def test_log_level_debug_shows_the_traceback_of_a_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setattr("luthien_control.policies.loader.load_policy_file", _explode)
    code, _, err = run(capsys, "policy", "validate", str(tmp_path / "p.json"))
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


# --- the real entry point, as a subprocess ---------------------------------------------

SUBPROCESS_CASES = [
    "json-list-5000-deep",
    "yaml-flow-5000-deep",
    "policy-tree-200-deep",
    "json-int-5000-digits",
    "yaml-nul",
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_the_installed_command_refuses_hostile_files_in_one_line(tmp_path: Path, case: str) -> None:
    _, name, content, expected = next(c for c in HOSTILE_FILES if c[0] == case)
    path = write_hostile(tmp_path, name, content)
    result = run_cli(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", "policy", "validate", str(path)
    )
    assert expected in assert_one_line_error(result.returncode, result.stderr)
    assert result.stdout == ""


def test_the_installed_command_refuses_a_bad_argument_in_one_line(tmp_path: Path) -> None:
    result = run_cli(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", "logs", "--limit", "-5")
    line = assert_one_line_error(result.returncode, result.stderr)
    assert line == (
        f"{ERROR}logs: argument --limit: expected an integer from 1 to 1000000, got '-5' "
        "(see 'luthien-control logs --help')"
    )


# --- mutations of valid policy files ---------------------------------------------------

Mutation = Callable[[random.Random, bytes], tuple[str, bytes]]


def _flip(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    at = rng.randrange(len(data))
    byte = rng.choice([0, 0x1B, 0x7F, 0xFF, 0xC3, 0x22, 0x5B, 0x7B, 0x3A, rng.randrange(256)])
    return f"flip byte {at} to {byte:#x}", data[:at] + bytes([byte]) + data[at + 1 :]


def _truncate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    at = rng.randrange(len(data))
    return f"truncate at {at}", data[:at]


def _duplicate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    start = rng.randrange(len(data))
    end = rng.randrange(start, min(len(data), start + 200) + 1)
    at = rng.randrange(len(data) + 1)
    return f"copy {start}:{end} to {at}", data[:at] + data[start:end] + data[at:]


def _delete(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    start = rng.randrange(len(data))
    end = rng.randrange(start, min(len(data), start + 50) + 1)
    return f"delete {start}:{end}", data[:start] + data[end:]


def _nest(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    depth = rng.choice([MAX_DOCUMENT_DEPTH - 10, MAX_DOCUMENT_DEPTH + 1, 1000, 20_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"k": ', b"}")])
    at = data.find(b"{}") if b"{}" in data else rng.randrange(len(data))
    inner = opener * depth + b"1" + closer * depth
    return f"nest {depth} deep at {at}", data[:at] + inner + data[at + 2 :]


def _big_number(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    digits = rng.choice([19, 20, 4300, 4301, 5000, 50_000])
    at = data.find(b"42")
    if at < 0:  # an earlier mutation took it: insert the number anywhere
        at = rng.randrange(len(data) + 1)
        return f"{digits}-digit number at {at}", data[:at] + b"9" * digits + data[at:]
    return f"{digits}-digit number for 42", data[:at] + b"9" * digits + data[at + 2 :]


def _splice(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    junk = rng.choice(
        [b"\x00", b"\x1b[2J", b"\xed\xa0\x80", b"\xe2\x80\xae", b"\r", b"\t", b"&a *a", b"<<: "]
    )
    at = rng.randrange(len(data) + 1)
    return f"insert {junk!r} at {at}", data[:at] + junk + data[at:]


MUTATIONS: list[Mutation] = [_flip, _truncate, _duplicate, _delete, _nest, _big_number, _splice]


HOSTILE_VALUES: list[Any] = [
    None,
    True,
    -1,
    2**63,
    2**64,
    1.5,
    "",
    "\x1b[2J\x00\u202e",
    "x" * 10_000,
    [],
    {},
    {"type": "NoopPolicy", "config": {}},
    {"type": "LeakedApiKeyDetection", "config": {"patterns": ["(", "[a-"]}},
    {"type": "SerialPolicy", "config": {"policies": "not a list"}},
    {"type": "ToolCallPolicy", "config": {}},
    {"type": "LLMJudgePolicy", "config": {}},
]


def _containers(value: Any) -> list[Any]:
    """Every mapping and list in ``value``, iteratively."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


def _restructure(rng: random.Random, policy: Any) -> str:
    """Change the parsed policy in place: a value replaced, a key dropped or added, a
    member repeated; the file stays syntactically valid."""
    target = rng.choice(_containers(policy))
    keys = list(target) if isinstance(target, dict) else list(range(len(target)))
    choice = rng.randrange(5)
    if choice == 0 and keys:
        key = rng.choice(keys)
        del target[key]
        return f"drop {key!r}"
    if choice == 1 and isinstance(target, list) and target:
        target.extend([rng.choice(target)] * rng.choice([1, 100]))  # shared: json.dumps copies
        return "repeat a member"
    if choice == 2:
        depth = rng.choice([MAX_POLICY_DEPTH - 5, MAX_POLICY_DEPTH + 1])
        replacement: Any = policy_chain(depth)
        label = f"a chain of {depth} policies"
    elif choice == 3:
        depth = rng.choice([MAX_DOCUMENT_DEPTH - 20, MAX_DOCUMENT_DEPTH + 1, 500])
        replacement, label = nested(depth), f"{depth} nested lists"
    else:
        replacement = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        label = repr(replacement)[:40]
    if isinstance(target, dict):
        key = rng.choice([*keys, "extra"])
        target[key] = replacement
    else:
        key = rng.randrange(len(target) + 1)
        target[key:key] = [replacement]
    return f"{key!r} = {label}"


def _mutated(iteration: int) -> tuple[str, str, bytes]:
    """The ``iteration``-th mutated policy file: its description, name and bytes. Half
    are changed as data (then written as JSON, which YAML reads too), some of them also
    as bytes; the others get one to three byte-level mutations."""
    rng = random.Random(FUZZ_SEED * 1_000_003 + iteration)
    name = rng.choice(["p.json", "p.yaml", "p.txt"])
    steps = []
    if rng.random() < 0.5:
        policy = copy.deepcopy(POLICY)
        for _ in range(rng.randint(1, 3)):
            steps.append(_restructure(rng, policy))
        data = json.dumps(policy, indent=rng.choice([None, 2])).encode()
        byte_steps = 1 if rng.random() < 0.3 else 0
    else:
        data = (
            yaml.safe_dump(POLICY, sort_keys=False).encode()
            if name == "p.yaml"
            else json.dumps(POLICY, indent=rng.choice([None, 2])).encode()
        )
        byte_steps = rng.randint(1, 3)
    for _ in range(byte_steps):
        if data:
            step, data = rng.choice(MUTATIONS)(rng, data)
            steps.append(step)
    return f"seed {FUZZ_SEED}, iteration {iteration}: {name}, " + "; ".join(steps), name, data


@pytest.mark.parametrize("iteration", range(FUZZ_ITERATIONS))
def test_a_mutated_policy_file_is_valid_or_refused_in_one_line(
    database: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], iteration: int
) -> None:
    what, name, data = _mutated(iteration)
    path = write_hostile(tmp_path, name, data)
    code, out, err = run(capsys, "policy", "validate", str(path))
    if code == 0:  # the mutation left a valid policy: it can be stored and shown too
        assert err == "", what
        assert run(capsys, "policy", "load", str(path), "--name", "fuzzed")[:2] == (
            0,
            "stored policy 'fuzzed' (version 1)\n",
        ), what
        code, out, err = run(capsys, "policy", "show", "fuzzed")
        assert (code, err) == (0, ""), what
    else:
        assert_one_line_error(code, err, what=what)  # 2: a mistake, never 1 (a bug)
        assert out == "", what
