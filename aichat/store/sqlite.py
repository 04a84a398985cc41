"""The SQLite store: ``twisted.enterprise.adbapi``, WAL, foreign keys on; one writer, a few readers.

The queries are :class:`~aichat.store.sql.SQLStore`'s; this module holds what only SQLite needs. Every
write is committed with ``synchronous=FULL`` before the call returns, so a message the API has
acknowledged is on disk; concurrent writes share one transaction and one fsync (group commit).
Migrations in ``aichat/store/migrations/NNNN_*.sql`` are applied in order at :meth:`SQLiteStore.open` and
recorded in ``schema_migrations``; a database migrated by a newer version is refused.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.store.base import StoreError, utc_now
from aichat.store.engines import SQLiteEngine, Txn
from aichat.store.lock import FileLock
from aichat.store.schema import migrations, statements
from aichat.store.sql import CACHE_BYTES, SQLStore

Cursor = Any  # adbapi's Transaction wrapper around a sqlite3 cursor

__all__ = ["CACHE_BYTES", "SQLiteStore", "migrations"]


def _connect_hook(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 5000")


@dataclass
class _QueuedWrite:
    """A write waiting for its group commit: ``work(txn, *args)``; on commit ``effect(result)`` updates the
    history cache for ``session_id`` (on failure the session is dropped from it)."""

    work: Callable[..., Any]
    args: tuple[Any, ...]
    waiter: Deferred[Any]
    session_id: str | None
    effect: Callable[[Any], None] | None


class SQLiteStore(SQLStore):
    """:class:`~aichat.store.base.Store` on a SQLite file."""

    log = Logger()

    READERS = 3

    def __init__(
        self, reactor: IReactorThreads, path: str, *, pool_factory: Any = None, cache_bytes: int = CACHE_BYTES
    ) -> None:
        super().__init__(SQLiteEngine(), cache_bytes)
        self._reactor = reactor
        self.path = path
        self._pool: adbapi.ConnectionPool | None = None
        self._readers: adbapi.ConnectionPool | None = None
        self._pool_factory = pool_factory or adbapi.ConnectionPool
        self._queue: list[_QueuedWrite] = []
        self._flushing = False
        self._lock = FileLock(path + ".lock")

    @property
    def pool(self) -> adbapi.ConnectionPool:
        """The single writer connection."""
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    @property
    def readers(self) -> adbapi.ConnectionPool:
        """Reader connections: in WAL mode they run beside the writer and see every committed write."""
        if self._readers is None:
            raise StoreError("the store is not open")
        return self._readers

    def _open_pool(self, size: int) -> adbapi.ConnectionPool:
        pool = self._pool_factory(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=size,
            cp_openfun=_connect_hook,
            cp_reactor=self._reactor,
        )
        pool.start()
        return pool

    async def open(self) -> None:
        """Create the folder and database if missing, check they are writable, migrate."""
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise PermissionError(13, "permission denied")
            self._lock.acquire(self.path)
        except OSError as e:
            raise StoreError(f"cannot use database {self.path}: {e.strerror or e}") from None
        self._pool = self._open_pool(1)
        try:
            applied = await self.pool.runInteraction(self._migrate)
        except (sqlite3.Error, StoreError) as e:
            await self.close()
            raise StoreError(f"cannot open database {self.path}: {e}") from None
        self._readers = self._open_pool(self.READERS)
        for version in applied:
            self.log.info("Applied database migration {version}", version=version, path=self.path)

    @staticmethod
    def _migrate(txn: Cursor) -> list[str]:
        txn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TEXT NOT NULL)"
        )
        txn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in txn.fetchall()}
        known = migrations()
        newest = max((version for version, _, _ in known), default=0)
        if done and max(done) > newest:
            raise StoreError(
                f"the database schema is at version {max(done)}, newer than this aichat-backend knows "
                f"({newest}): run the newer aichat-backend, or restore a backup taken before the upgrade"
            )
        applied = []
        for version, name, sql in known:
            if version in done:
                continue
            txn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements(sql):
                    txn.execute(statement)
                txn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, utc_now()),
                )
                txn.execute("COMMIT")
            except BaseException:
                txn.execute("ROLLBACK")
                raise
            applied.append(name)
        return applied

    async def close(self) -> None:
        for pool in (self._readers, self._pool):
            if pool is not None:
                pool.close()
        self._pool = self._readers = None
        self._lock.release()
        self.cache.clear()

    async def ping(self) -> bool:
        try:
            rows = await self.readers.runQuery("SELECT 1")
        except (sqlite3.Error, StoreError):
            return False
        return bool(rows == [(1,)])

    async def _run_write(
        self,
        work: Callable[..., Any],
        *args: Any,
        session_id: str | None = None,
        effect: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run ``work(txn, *args)`` atomically and return once it is committed to disk.

        Writes that arrive while a commit is under way are grouped into the next transaction (each inside
        its own savepoint, so one failing write does not undo the others): one fsync serves them all.
        A write that changes the session ``session_id`` or its messages names it, with the ``effect`` its
        result has on the history cache; effects are applied in commit order, even if the caller has
        stopped waiting.
        """
        done: Deferred[Any] = Deferred()
        if session_id is not None:
            self.cache.begin_write(session_id)
        self._queue.append(_QueuedWrite(work, args, done, session_id, effect))
        if not self._flushing:
            self._flush()
        return await done

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        self._flushing = True

        def transaction(cursor: Cursor) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            txn = Txn(cursor, self.engine)
            txn.execute("BEGIN IMMEDIATE")
            try:
                for write in batch:
                    txn.execute("SAVEPOINT write")
                    try:
                        outcomes.append((True, write.work(txn, *write.args)))
                    except Exception as e:  # whatever one write raises is that write's failure alone
                        if self.engine.is_full(e):
                            raise  # SQLite may have rolled the whole transaction back already
                        txn.execute("ROLLBACK TO write")
                        outcomes.append((False, e if isinstance(e, sqlite3.Error | StoreError) else Failure()))
                    txn.execute("RELEASE write")
                txn.execute("COMMIT")
            except BaseException:
                if cursor.connection.in_transaction:
                    txn.execute("ROLLBACK")
                raise
            return outcomes

        def committed(outcomes: list[tuple[bool, Any]]) -> None:
            self._wrote()
            for write, (ok, value) in zip(batch, outcomes, strict=True):
                self._settle_cache(write.session_id, write.effect, ok, value)
            for write, (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    write.waiter.callback(value)
                elif isinstance(value, Failure):
                    self.log.failure("A database write failed", value)
                    write.waiter.errback(StoreError(f"the write failed: {value.getErrorMessage()}"))
                else:
                    write.waiter.errback(self._classified(value, str(value)))

        def failed(failure: Failure) -> None:
            assert failure.value is not None
            error = self._classified(failure.value, str(failure.value))
            for write in batch:
                self._settle_cache(write.session_id, write.effect, False, None)
            for write in batch:
                write.waiter.errback(error)

        def next_batch(_: object) -> None:
            self._flushing = False
            if self._queue:
                self._flush()

        try:
            running = self.pool.runInteraction(transaction)
        except StoreError as e:
            running = fail(e)
        running.addCallbacks(committed, failed).addBoth(next_batch)

    async def _run_read(self, work: Callable[..., Any], *args: Any) -> Any:
        def transaction(cursor: Cursor) -> Any:
            return work(Txn(cursor, self.engine), *args)

        try:
            return await self.readers.runInteraction(transaction)
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
