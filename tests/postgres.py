"""A real PostgreSQL server for the tests, started from the machine's binaries.

CI installs Debian's ``postgresql`` package (``make test`` does it); the server runs as
the ``postgres`` user when the tests run as root, on a free loopback port with its
socket in a temporary directory, and is stopped afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 30.0


def find_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


@dataclass
class PostgresServer:
    bindir: Path
    directory: Path
    port: int
    process_user: str | None  # run as this user (root cannot run PostgreSQL)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "luthien") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.process_user is not None:
            command = ["runuser", "-u", self.process_user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        self.directory.chmod(0o755)
        self.data.mkdir()
        if self.process_user is not None:
            shutil.chown(self.directory, self.process_user)
            shutil.chown(self.data, self.process_user)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            str(int(READY_TIMEOUT)),
            "start",
        )

    def stop(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "stop",
            check=False,
        )

    def create_database(self, name: str) -> str:
        self._run(
            str(self.bindir / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            name,
        )
        return self.url(name)

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_postgres(port: int) -> PostgresServer:
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="luthien-pg-")), port, user)
    server.init()
    server.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        probe = subprocess.run(
            [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
        )
        if probe.returncode == 0:
            return server
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start:\n{server.log()}")
        time.sleep(0.1)


def remove(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)
