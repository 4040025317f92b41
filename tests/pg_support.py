"""One real PostgreSQL server for a test session, from the Debian binaries (as pytest-postgresql does).

``PostgresServer.start()`` runs initdb in a fresh temporary directory and starts the server listening on
a unix socket in that directory only (no TCP: several test sessions on one machine cannot collide), with
fsync off (tests only: a crash of the machine loses nothing we keep). As root it runs the server as
the ``postgres`` OS user, since initdb and postgres refuse root. A watchdog process holds the read end
of a pipe whose write end only this process has: when the session ends -- or is killed -- the pipe
closes, and the watchdog stops the server (``pg_ctl stop -m immediate``) and removes the directory.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INSTALL_HINT = "PostgreSQL server binaries not found: apt-get install postgresql (or set CI= to skip)"
_USER = "postgres"  # the superuser role initdb creates, whoever runs it


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if Path(p).with_name("pg_ctl").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", _USER, "--"]


# Run by the watchdog: wait for the pipe to close, then stop the server and remove its directory.
_WATCHDOG = """
import os, shutil, subprocess, sys
fd, pg_ctl, data, top = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
prefix = sys.argv[5:]
while os.read(fd, 1):
    pass
subprocess.run([*prefix, pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "30"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(top, ignore_errors=True)
"""


class PostgresServer:
    # Tests only: durability off (benchmarks/ingest.py clears it, to measure what an ack costs).
    speed_options = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.top = Path(tempfile.mkdtemp(prefix="outrider-pg-"))
        self.data = self.top / "data"
        self.socket_dir = self.top  # the socket file is <top>/.s.PGSQL.5432, short enough for sun_path
        self._names = itertools.count(1)
        self._watchdog: subprocess.Popen | None = None
        self._pipe_w: int | None = None

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        return f"postgresql://{_USER}@/{dbname}?host={self.socket_dir}"

    def start(self) -> PostgresServer:
        prefix = _as_server_user()
        if prefix:
            entry = pwd.getpwnam(_USER)
            os.chown(self.top, entry.pw_uid, entry.pw_gid)
        self._start_watchdog(prefix)
        initdb = [*prefix, str(self.bindir / "initdb"), "-D", str(self.data), "-U", _USER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        _run(initdb, "initdb")
        options = (f"-k {self.socket_dir} -c listen_addresses='' {self.speed_options}"
                   " -c max_connections=200 -c shared_buffers=32MB")
        _run([*prefix, str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-w", "-t", "60",
              "-l", str(self.top / "server.log"), "-o", options], "pg_ctl start")
        return self

    def _start_watchdog(self, prefix: list[str]) -> None:
        read_fd, self._pipe_w = os.pipe()
        os.set_inheritable(read_fd, True)
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(read_fd), str(self.bindir / "pg_ctl"), str(self.data),
             str(self.top), *prefix],
            pass_fds=(read_fd,), start_new_session=True,  # a ^C to the session does not reach it
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read_fd)

    def create_database(self) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = f"t_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("@/", 1)[1].split("?", 1)[0]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server and remove its directory; returns when both are done."""
        if self._pipe_w is not None:
            os.close(self._pipe_w)
            self._pipe_w = None
        if self._watchdog is not None:
            self._watchdog.wait(timeout=60)
            self._watchdog = None

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def server_or_reason() -> tuple[Path | None, str]:
    """The binaries' directory, or why PostgreSQL tests cannot run here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed: pip install -e '.[test]'"
    bindir = find_bindir()
    if bindir is None:
        return None, INSTALL_HINT
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _has_user(_USER)):
        return None, "running as root needs the postgres OS user and runuser: apt-get install postgresql"
    return bindir, ""


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
