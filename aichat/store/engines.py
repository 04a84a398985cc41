"""What differs between the two databases, in one small object per engine (as synapse's ``storage/engines/``).

The store's queries are written once with ``?`` parameters; an engine turns them into its own parameter
style and says how JSON and timestamps come back, which tie-breakers order rows, and which errors mean
"run the transaction again" or "the database is not there".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from aichat.jsonfmt import compact


class Engine(Protocol):
    """A database dialect."""

    name: str
    #: ``ORDER BY`` tie-breaker after ``updated_at DESC`` for sessions (creation order, newest first).
    session_tiebreak: str
    #: Column of ``chat_attachments`` (aliased ``a``) that keeps insertion order.
    attachment_order: str

    def sql(self, statement: str) -> str:
        """``statement`` in this engine's parameter style."""

    def load_json(self, value: Any) -> Any:
        """A JSON column as Python (``None`` stays ``None``)."""

    def load_time(self, value: Any) -> str:
        """A timestamp column as our fixed-width RFC 3339 UTC text."""

    def is_retryable(self, error: BaseException) -> bool:
        """Whether re-running the whole transaction may succeed (serialization failure, deadlock, lost link)."""

    def is_unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` means the database cannot be reached (rather than a bad statement)."""

    def is_full(self, error: BaseException) -> bool:
        """Whether ``error`` means the database's disk (or quota) is full."""


def dump_json(value: Any) -> str | None:
    """A JSON column's parameter: compact text, or ``None`` for SQL NULL (both engines accept text)."""
    return None if value is None else compact(value)


class SQLiteEngine:
    """SQLite: ``?`` parameters, JSON as text, timestamps already stored as our text."""

    name = "sqlite"
    session_tiebreak = "rowid DESC"
    attachment_order = "a.rowid"

    def sql(self, statement: str) -> str:
        return statement

    def load_json(self, value: Any) -> Any:
        return None if value is None else json.loads(value)

    def load_time(self, value: Any) -> str:
        return str(value)

    def is_retryable(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)

    def is_unavailable(self, error: BaseException) -> bool:
        return False

    def is_full(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PostgresEngine:
    """PostgreSQL through psycopg 3: ``%s`` parameters, jsonb decoded by the driver, ``timestamptz``."""

    name = "postgres"
    session_tiebreak = "created_at DESC, id DESC"
    attachment_order = "a.seq"

    # SQLSTATEs worth a re-run: serialization_failure, deadlock_detected; class 08 is connection trouble.
    RETRY_SQLSTATES = frozenset({"40001", "40P01"})

    def __init__(self) -> None:
        self._statements: dict[str, str] = {}

    def sql(self, statement: str) -> str:
        converted = self._statements.get(statement)
        if converted is None:
            # Our statements hold no literal '?' or '%'.
            converted = self._statements[statement] = statement.replace("?", "%s")
        return converted

    def load_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    def load_time(self, value: Any) -> str:
        return _utc_text(value) if isinstance(value, datetime) else str(value)

    def is_retryable(self, error: BaseException) -> bool:
        return getattr(error, "sqlstate", None) in self.RETRY_SQLSTATES or self.is_unavailable(error)

    def is_unavailable(self, error: BaseException) -> bool:
        import psycopg

        if isinstance(error, psycopg.OperationalError):
            sqlstate = getattr(error, "sqlstate", None)
            # No SQLSTATE: the client lost (or never had) the connection. 08xxx: connection exceptions;
            # 57P01..57P03: the server is shutting down or starting.
            return sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")
        return isinstance(error, psycopg.InterfaceError)

    def is_full(self, error: BaseException) -> bool:
        # disk_full, out_of_memory's sibling insufficient_resources class 53.
        return getattr(error, "sqlstate", None) == "53100"


class Txn:
    """A cursor that speaks ``?`` parameters whatever the engine: what a store transaction function gets."""

    __slots__ = ("_cursor", "_sql")

    def __init__(self, cursor: Any, engine: Engine) -> None:
        self._cursor = cursor
        self._sql: Callable[[str], str] = engine.sql

    def execute(self, statement: str, params: Any = ()) -> None:
        self._cursor.execute(self._sql(statement), params)

    def executemany(self, statement: str, params: Any) -> None:
        self._cursor.executemany(self._sql(statement), params)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        rows: list[Any] = self._cursor.fetchall()
        return rows

    @property
    def rowcount(self) -> int:
        count: int = self._cursor.rowcount
        return count
