"""A seeded fuzzer over the command line's inputs: mutated policy files for ``policy
validate``, and mutated arguments for ``keys``, ``policy`` and ``logs``.

Every input is valid (exit 0) or refused in one escaped line on stderr with exit status
2, never a bug (exit 1) or a traceback. It runs in process (``luthien_control.cli.main``)
for speed; ``tests/test_cli_inputs.py`` runs the installed command on the hostile cases
that need it. ``make test`` runs a few hundred of each, ``LUTHIEN_SOAK=1`` ten thousand.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from luthien_control.cli import main
from tests.hardening.conftest import SEED, scaled
from tests.test_cli_inputs import MUTATIONS, POLICY, _restructure, assert_one_line_error

POLICY_FILES = scaled(200, 10_000)
ARGUMENT_SETS = scaled(200, 10_000)

WORDS = [
    "",
    " ",
    "-",
    "--",
    "-5",
    "0",
    "1",
    "1000000",
    "1000001",
    "99999999999999999999999",
    "1e3",
    "NaN",
    "10m",
    "2h",
    "1d",
    "-1d",
    "9999999d",
    "2026-13-45",
    "2026-01-31T12:00:00+99:00",
    "yesterday",
    "\x00",
    "\x1b[2J",
    "\u202e",
    "\udcff",
    "é",
    "x" * 5000,
    "../../etc/passwd",
    "/dev/null",
    "/",
    "root",
    "e2e",
    "ok",
    "blocked",
    "gpt-4o",
    "--json",
    "--help-not",
    "%s%n",
]
COMMANDS = [
    ["logs"],
    ["logs", "--limit"],
    ["logs", "--since"],
    ["logs", "--transaction"],
    ["logs", "--outcome"],
    ["logs", "--model"],
    ["logs", "--key"],
    ["logs", "--json", "--limit"],
    ["keys", "add", "--name"],
    ["keys", "add", "--key", "lc-fuzz-key-0123456789", "--name"],
    ["keys", "revoke"],
    ["keys", "list"],
    ["policy", "show"],
    ["policy", "list"],
    ["policy", "validate"],
    ["policy", "load", "--name", "p"],
    ["init-db"],
    [],
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite ``DATABASE_URL`` in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:///" + str(tmp_path / "luthien.db"))
    return tmp_path


def mutated_policy(seed: int, number: int) -> tuple[str, str, bytes]:
    """The ``number``-th mutated policy file of ``seed``: its description, file name and
    bytes (the mutations of ``tests/test_cli_inputs.py``, another seed and count)."""
    rng = random.Random(seed * 7_000_003 + number)
    name = rng.choice(["p.json", "p.yaml", "p.yml", "p"])
    steps = []
    policy = copy.deepcopy(POLICY)
    for _ in range(rng.randint(0, 3)):
        steps.append(_restructure(rng, policy))
    data = dumps(policy, indent=rng.choice([None, 2]))  # YAML reads it too
    if name.startswith("p.y") and rng.random() < 0.5:
        with contextlib.suppress(RecursionError):  # too deep for PyYAML's writer
            data = yaml.safe_dump(policy, sort_keys=False).encode()
    for _ in range(rng.randint(0 if steps else 1, 3)):
        if data:
            step, data = rng.choice(MUTATIONS)(rng, data)
            steps.append(step)
    return f"seed {seed}, policy file {number}: {name}, " + "; ".join(steps), name, data


def dumps(value: Any, indent: int | None) -> bytes:
    """JSON text of a policy however deep its mutations made it (the encoder's recursion
    limit raised for the purpose)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return json.dumps(value, indent=indent).encode()
    finally:
        sys.setrecursionlimit(limit)


def mutated_arguments(seed: int, number: int) -> list[str]:
    """The ``number``-th argument list of ``seed``: a command, then words."""
    rng = random.Random(seed * 9_000_011 + number)
    argv = list(rng.choice(COMMANDS))
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        argv.append(rng.choice(WORDS))
    if rng.random() < 0.2:
        at = rng.randrange(len(argv) + 1)
        argv.insert(at, rng.choice(WORDS))
    return argv


def check(code: int, out: str, err: str, what: str) -> None:
    if code == 0:
        assert "Traceback" not in out + err, what
        return
    assert_one_line_error(code, err, what=what)  # 2: a mistake, never 1 (a bug)


def test_mutated_policy_files(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for number in range(POLICY_FILES):
        what, name, data = mutated_policy(SEED, number)
        path = workdir / name
        path.write_bytes(data)
        code = main(["policy", "validate", str(path)])
        out, err = capsys.readouterr()
        check(code, out, err, what)


def test_mutated_arguments(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init-db"]) == 0
    capsys.readouterr()
    for number in range(ARGUMENT_SETS):
        argv = mutated_arguments(SEED, number)
        what = f"seed {SEED}, arguments {number}: {argv!r}"[:300]
        if argv[:2] == ["policy", "validate"] or argv[:2] == ["policy", "load"]:
            # A file path: the working directory holds a policy file and the database.
            (workdir / "root").write_text(json.dumps(POLICY))
        code = main(argv)
        out, err = capsys.readouterr()
        check(code, out, err, what)
