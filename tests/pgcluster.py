"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary folder on a free port.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<major>/bin``); when they are
missing and we are root, it is installed with apt-get. The server cannot run as root, so as root the
cluster runs as the unprivileged ``postgres`` user (created by the package). Local connections are
trusted; TCP connections on 127.0.0.1 need the superuser's password (scram-sha-256), as a real
deployment would.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.support import free_port

SERVER_USER = "postgres"
PASSWORD = "test-secret-pw"
_names = itertools.count(1)


def find_bindir() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<major>/bin`` that has initdb, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def ensure_installed() -> Path:
    """The server binaries' folder, installing Debian's ``postgresql`` first if it is missing."""
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0:
        raise RuntimeError("PostgreSQL is not installed: run `apt-get install -y postgresql` (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env)
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("apt-get installed postgresql but no initdb was found under /usr/lib/postgresql")
    return bindir


class Cluster:
    """One running cluster; :meth:`stop` shuts it down and removes its folder."""

    def __init__(self, *, settings: tuple[str, ...] = ("fsync=off", "synchronous_commit=off")) -> None:
        self.bindir = ensure_installed()
        self.folder = Path(tempfile.mkdtemp(prefix="aichat-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = free_port()
        self.settings = settings
        self._as_user: list[str] = []
        self._started = False
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            self._as_user = [runuser, "-u", SERVER_USER, "--"]
        password_file = self.folder / "pw"
        password_file.write_text(PASSWORD + "\n")
        if self._as_user:
            os.chown(password_file, pwd.getpwnam(SERVER_USER).pw_uid, -1)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
            f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
        )
        password_file.unlink()
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_user, str(self.bindir / program), *args]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.folder)

    def start(self, *, attempts: int = 3) -> None:
        """Start the server (again) on the same port; a first start picks another free port if that one was
        taken meanwhile. A failure shows the server's log."""
        for attempt in range(attempts):
            options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
            for setting in self.settings:
                options += f" -c {setting}"
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
                return
            except subprocess.CalledProcessError as e:
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                if attempt + 1 == attempts or self._started:
                    raise RuntimeError(f"PostgreSQL did not start: {e.stderr!r}\n{log[-2000:]}") from None
                self.port = free_port()
            finally:
                if not self._started:
                    self._started = self._running()

    def _running(self) -> bool:
        result = subprocess.run([*self._as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.folder)
        return result.returncode == 0

    def stop_server(self) -> None:
        """Stop the server, keeping its data (``start`` brings it back)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        """Stop the server and remove everything it had."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop_server()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, dbname: str = "postgres", *, password: str | None = PASSWORD, user: str = "postgres") -> str:
        """A ``postgresql://`` URL of ``dbname`` over TCP."""
        credentials = user if password is None else f"{user}:{password}"
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def execute(self, url: str, sql: str) -> None:
        """Run ``sql`` (one or more statements) on the database at ``url``."""
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(sql.encode("utf-8"))
