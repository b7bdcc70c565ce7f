"""A private PostgreSQL server for the tests: Debian's binaries, a temporary folder, a free port on 127.0.0.1; skipped (or failed in CI) when missing."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.ports import free_port

REQUIRE_ENV = "RETRIEVAL_REQUIRE_POSTGRES"   # "1" (CI): a missing server fails the tests instead of skipping them
INSTALL_HINT = "install Debian's postgresql (apt-get install postgresql) and psycopg (pip install 'psycopg[binary]')"
USER, PASSWORD = "retrieval", "s3cret-Pw"      # password authentication over TCP, so URLs carry a real password


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl (or RETRIEVAL_POSTGRES_BIN)."""
    candidates = [os.environ["RETRIEVAL_POSTGRES_BIN"]] if os.environ.get("RETRIEVAL_POSTGRES_BIN") else \
        sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def missing_reason() -> str | None:
    if postgres_bin() is None:
        return f"no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: {INSTALL_HINT}"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return f"the psycopg package is missing: {INSTALL_HINT}"
    return None


class PostgresServer:
    """A running server; url(database) is an SQLAlchemy URL with the password in it."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP: its postmaster and every backend) for the block: connections stay open and
        nothing answers, as with a hung host or a half-open balancer; SIGCONT after."""
        import signal

        postmaster = int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        pids = [postmaster] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                               and _parent(p) == postmaster]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    @contextlib.contextmanager
    def new_database(self) -> Iterator[str]:
        """A fresh empty database for one test -> its URL; dropped afterwards."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def running_postgres(*, durable: bool = False) -> Iterator[PostgresServer]:
    """Start a throw-away server (initdb, pg_ctl) on a free port with its socket in its own folder; stopped and
    removed afterwards. As root, the server runs as `nobody` (initdb refuses root).

    durable=False (tests) skips fsync: a killed client, not a killed server, is what the tests crash.
    Benchmarks ask for durable=True, PostgreSQL's own defaults (every commit flushed)."""
    reason = missing_reason()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    bin_dir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="retrieval-pg-"))   # not under pytest's tmp_path: `nobody` must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "nobody", "--"]
        os.chmod(root, 0o755)
        shutil.chown(root, "nobody")
    (root / "pwfile").write_text(PASSWORD + "\n")
    if as_user:
        shutil.chown(root / "pwfile", "nobody")
    data, sockets, port = root / "data", root / "sockets", free_port()
    run = lambda *args: subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        done = run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(root / "pwfile"),
                   "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C", "--no-sync")
        assert done.returncode == 0, f"initdb failed: {done.stderr}"
        run("mkdir", str(sockets))
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c shared_buffers=32MB -c max_connections=60"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        done = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options,
                   "-w", "-t", "60", "start")
        assert done.returncode == 0, f"pg_ctl start failed: {done.stderr}\n{_tail(root / 'server.log')}"
        try:
            yield PostgresServer(root, port)
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return ""
