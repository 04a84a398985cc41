"""Choose and build the store the settings name: SQLite at ``database.path`` or PostgreSQL at ``database.dsn``."""

from __future__ import annotations

from typing import Any

from aichat.config import DatabaseSettings
from aichat.store.sql import SQLStore


def build_store(database: DatabaseSettings, reactor: Any) -> SQLStore:
    """A store for ``database`` (not yet opened); psycopg is imported only for PostgreSQL."""
    cache_bytes = database.history_cache_mb * 1024 * 1024
    if database.engine == "postgres":
        from aichat.store.postgres import PostgresStore

        # Other instances write to the same database: a history kept here could miss their messages.
        return PostgresStore(
            reactor,
            database.dsn,
            pool_size=database.pool_size,
            connect_timeout=database.connect_timeout_seconds,
            statement_timeout=database.statement_timeout_seconds,
            cache_bytes=0,
        )
    from aichat.store.sqlite import SQLiteStore

    return SQLiteStore(reactor, database.path, cache_bytes=cache_bytes)
