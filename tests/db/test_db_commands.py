"""The database commands, end to end through ``luthien_control.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luthien_control.cli import main
from luthien_control.db.init_db import head_revision

POLICY = {
    "type": "SerialPolicy",
    "config": {
        "name": "E2E",
        "policies": [{"type": "NoopPolicy", "config": {}}, {"type": "NoopPolicy", "config": {}}],
    },
}


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``DATABASE_URL`` names a SQLite file that does not exist yet."""
    path = tmp_path / "state" / "luthien.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:///" + str(path))
    return path


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY, indent=2), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_db(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    revision = head_revision()
    expected = f"database ready: sqlite+aiosqlite:///{database} (revision {revision})\n"
    assert run(capsys, "init-db") == (0, expected, "")
    assert run(capsys, "init-db") == (0, expected, "")
    assert database.is_file()


def test_keys_add_prints_a_new_key_once(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keys", "add", "--name", "alice")
    assert code == 0
    key = out.removesuffix("\n")
    assert out == key + "\n"
    assert key.startswith("lc-")
    assert len(key) > 40
    assert err == "added key 'alice': store it now, it cannot be shown again\n"

    code, out, err = run(capsys, "keys", "list")
    assert code == 0
    assert key not in out
    assert key[8:] not in out
    header, row = out.splitlines()
    assert header.split() == ["NAME", "PREFIX", "CREATED", "STATUS"]
    name, prefix, created, status = row.split()
    assert (name, prefix, status) == ("alice", key[:8], "active")
    assert created.endswith("Z")
    assert header.index("PREFIX") == row.index(prefix)
    assert header.index("STATUS") == row.index(status)


def test_keys_add_with_a_given_key(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "add", "--name", "ci", "--key", "lc-given-0123456789")[:2] == (
        0,
        "lc-given-0123456789\n",
    )
    assert "lc-given-0123456789" not in run(capsys, "keys", "list")[1]


def test_keys_list_when_empty(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "list") == (0, "no keys\n", "")


def test_keys_revoke(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "add", "--name", "alice")
    run(capsys, "keys", "add", "--name", "bob")
    assert run(capsys, "keys", "revoke", "alice") == (0, "revoked key 'alice'\n", "")
    rows = [line.split() for line in run(capsys, "keys", "list")[1].splitlines()[1:]]
    assert [(row[0], row[-1]) for row in rows] == [("alice", "revoked"), ("bob", "active")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("keys", "add", "--name", "alice"), "a key named 'alice' already exists"),
        (("keys", "add", "--name", "bob", "--key", "lc-known"), "already stored under another"),
        (("keys", "add", "--name", ""), "a key name must not be empty"),
        (("keys", "add", "--name", "x", "--key", ""), "a key must not be empty"),
        (("keys", "revoke", "nobody"), "no key named 'nobody'"),
        (("policy", "show", "nothing"), "no policy named 'nothing'"),
        (("policy", "load", "missing.json", "--name", "root"), "cannot read policy file"),
    ],
)
def test_mistakes_are_one_line_errors_with_exit_2(
    database: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    assert run(capsys, "keys", "add", "--name", "alice", "--key", "lc-known")[0] == 0
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("luthien-control: error: ")
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_revoking_twice_is_an_error(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "add", "--name", "alice")
    assert run(capsys, "keys", "revoke", "alice")[0] == 0
    assert run(capsys, "keys", "revoke", "alice") == (
        2,
        "",
        "luthien-control: error: the key 'alice' is already revoked\n",
    )


def test_an_unreachable_database_is_a_one_line_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    closed_port: int,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://luthien:s3cret@127.0.0.1:{closed_port}/db")
    code, out, err = run(capsys, "keys", "list")
    assert (code, out) == (2, "")
    assert err.startswith(
        "luthien-control: error: cannot reach the database at "
        f"postgresql+asyncpg://luthien:***@127.0.0.1:{closed_port}/db: "
    )
    assert err.count("\n") == 1
    assert "s3cret" not in err


def test_an_unsupported_database_url_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "mysql://root:s3cret@localhost/luthien")
    assert run(capsys, "init-db") == (
        2,
        "",
        "luthien-control: error: unsupported database URL 'mysql://root:***@localhost/luthien': "
        "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DATABASE\n",
    )


def test_policy_load_list_and_show(
    database: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load = ("policy", "load", str(policy_file), "--name", "root")
    assert run(capsys, *load) == (0, "stored policy 'root' (version 1)\n", "")
    assert run(capsys, *load) == (0, "stored policy 'root' (version 2)\n", "")
    assert run(capsys, "policy", "load", str(policy_file), "--name", "canary")[0] == 0

    code, out, err = run(capsys, "policy", "list")
    assert (code, err) == (0, "")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["NAME", "TYPE", "VERSION", "UPDATED"]
    assert [row[:3] for row in lines[1:]] == [
        ["canary", "SerialPolicy", "1"],
        ["root", "SerialPolicy", "2"],
    ]

    code, out, err = run(capsys, "policy", "show", "root")
    assert (code, err) == (0, "")
    assert out == json.dumps(POLICY, indent=2) + "\n"


def test_policy_list_when_empty(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "policy", "list") == (0, "no policies\n", "")


def test_an_invalid_policy_is_not_stored(
    database: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"type": "SerialPolicy", "config": {"policies": [{"type": "Nope", "config": {}}]}}
        ),
        encoding="utf-8",
    )
    code, out, err = run(capsys, "policy", "load", str(bad), "--name", "root")
    assert (code, out) == (2, "")
    assert err.startswith("luthien-control: error: policies[0].type: unknown policy type 'Nope'")
    assert err.count("\n") == 1
    assert run(capsys, "policy", "list") == (0, "no policies\n", "")
