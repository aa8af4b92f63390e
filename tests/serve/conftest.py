"""Database fixtures for the serving tests: a throwaway PostgreSQL server, and a fresh database per test.

``db_url`` runs each test that uses it twice: on a new SQLite file and on a new PostgreSQL database.
PostgreSQL tests skip when no server binaries are installed, unless ``OPENGLM_REQUIRE_POSTGRES=1``
(set in CI), where they fail instead.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _postgres_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),  # Debian/Ubuntu keep them off PATH
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server in a temporary directory on 127.0.0.1, trust auth, no durability (tests only)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="openglm-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        # initdb refuses to run as root: run the server as the postgres OS user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """The SQLAlchemy URL of a fresh empty database.

        It is a new schema that the URL makes the only one on the search path: to the code under test,
        an empty database of its own, made in milliseconds. (A real CREATE DATABASE copies some 8 MB of
        files per test, which then take seconds each to copy and to delete.)
        """
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres?options=-csearch_path%3D{name}"


@pytest.fixture(scope="session")
def postgres_server():
    bindir = _postgres_bindir()
    if bindir is None:
        message = "no PostgreSQL server binaries (pg_ctl, initdb) installed"
        if os.environ.get("OPENGLM_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + ", and OPENGLM_REQUIRE_POSTGRES=1")
        pytest.skip(message)
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(server.root, ignore_errors=True)
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """The URL of a fresh database on the session's throwaway PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh empty database of each kind: a new SQLite file; a new schema on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'openglm.db'}"
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Serving tests share the machine with the server they start: one torch thread each."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
