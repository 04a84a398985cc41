"""Shared test helpers: settings in a temporary folder, an inline SQLite pool, free ports, the daemon."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from aichat.api import API, build_resource
from aichat.config import Settings, load_settings
from aichat.store.sql import SQLStore
from aichat.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent


class InlinePool:
    """The part of ``adbapi.ConnectionPool`` the store uses, run synchronously on one connection.

    It lets HTTP tests through ``StubTreq`` finish without threads while exercising the real SQL.
    """

    def __init__(self, _module: str, path: str, **kwargs: Any) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None)
        opener: Callable[[sqlite3.Connection], None] | None = kwargs.get("cp_openfun")
        if opener is not None:
            opener(self._connection)

    def start(self) -> None:
        """Nothing to start: the connection is open."""

    def runInteraction(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        cursor = self._connection.cursor()
        try:
            return succeed(work(cursor, *args))
        except Exception as e:  # the Deferred carries the failure, like adbapi's
            failed: Deferred[Any] = Deferred()
            failed.errback(e)
            return failed
        finally:
            cursor.close()

    def runQuery(self, sql: str, params: Any = ()) -> Deferred[Any]:
        def query(cursor: sqlite3.Cursor) -> list[Any]:
            cursor.execute(sql, params)
            return cursor.fetchall()

        return self.runInteraction(query)

    def close(self) -> None:
        self._connection.close()


def write_config(folder: Path, text: str = "", name: str = "config.yaml") -> Path:
    """Write a config file into ``folder`` and return its path."""
    path = folder / name
    path.write_text(text)
    return path


def make_settings(folder: Path, yaml_text: str = "", environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``yaml_text``; the database goes into ``folder`` unless the text names one."""
    if "database:" not in yaml_text:
        yaml_text += f"\ndatabase:\n  path: {folder / 'test.db'}\n"
    return load_settings(str(write_config(folder, yaml_text)), environ=environ or {})


def _open_inline(store: SQLStore) -> None:
    """Open a store whose calls complete synchronously; raise what opening raised."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(store.open()).addBoth(outcome.append)
    assert outcome, "the inline store opens synchronously"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()


def inline_store(path: str, **options: Any) -> SQLiteStore:
    """A SQLite store whose queries run synchronously (for ``StubTreq`` tests); ``options`` go to it."""
    store = SQLiteStore(Clock(), path, pool_factory=InlinePool, **options)  # type: ignore[arg-type]
    _open_inline(store)
    return store


def inline_pg_store(url: str, **options: Any) -> SQLStore:
    """A PostgreSQL store whose transactions run synchronously in the calling thread (for ``StubTreq`` tests)."""
    from aichat.store.postgres import PostgresStore

    store = PostgresStore(Clock(), url, run_in_thread=maybeDeferred, pool_size=2, **options)  # type: ignore[arg-type]
    _open_inline(store)
    return store


def build_api(
    settings: Settings, store: SQLStore, clock: Clock | None = None, *, chat: Any = None, mcp: Any = None
) -> tuple[API, Any]:
    """An :class:`API` over ``store`` (with the chat service and MCP host given) and its CORS-wrapped resource."""
    api = API(settings=settings, store=store, clock=clock or Clock(), version="test", chat=chat, mcp=mcp)
    return api, build_resource(api)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_http(url: str, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> bytes:
    """GET ``url`` until it answers 200; fail if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"daemon exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body: bytes = response.read()
                return body
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout}s: {last}")


def daemon_env(**extra: str) -> dict[str, str]:
    """A clean environment for a daemon subprocess (no AICHAT_* or API keys from the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AICHAT_") and not k.endswith("_API_KEY")}
    env.update(extra)
    return env
