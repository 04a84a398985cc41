"""The SQLite store: ``twisted.enterprise.adbapi``, WAL, foreign keys on; one writer, a few readers.

Every write is committed with ``synchronous=FULL`` before the call returns, so a message the API has
acknowledged is on disk; concurrent writes share one transaction and one fsync (group commit).
Migrations in ``aichat/store/migrations/NNNN_*.sql`` are applied in order at :meth:`SQLiteStore.open` and
recorded in ``schema_migrations``. Recently used sessions and their histories are also kept in a
:class:`~aichat.store.history_cache.HistoryCache` that the store's own commits keep current, so a turn reads
its history without a database round trip; this assumes the daemon is the only writer of the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.jsonfmt import compact
from aichat.store.base import Approval, Attachment, Message, Session, StoreError, new_id, utc_now
from aichat.store.history_cache import HistoryCache, Read

Cursor = Any  # adbapi's Transaction wrapper around a sqlite3 cursor

SESSION_COLUMNS = "id, user_id, title, created_at, updated_at"
MESSAGE_COLUMNS = (
    "id, session_id, role, content, created_at, tool_calls, tool_call_id, tool_executions, approval_request"
)


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations as (version, name, SQL), in version order."""
    folder = resources.files("aichat.store").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text("utf-8")))
    return sorted(found)


def _connect_hook(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 5000")


def _dump(value: Any) -> str | None:
    return None if value is None else compact(value)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _session(row: tuple[Any, ...]) -> Session:
    return Session(*row)


#: Default budget of the history cache.
CACHE_BYTES = 64 * 1024 * 1024


@dataclass
class _QueuedWrite:
    """A write waiting for its group commit: ``work(txn, *args)``; on commit ``effect(result)`` updates the
    history cache for ``session_id`` (on failure the session is dropped from it)."""

    work: Callable[..., Any]
    args: tuple[Any, ...]
    waiter: Deferred[Any]
    session_id: str | None
    effect: Callable[[Any], None] | None


class SQLiteStore:
    """:class:`~aichat.store.base.Store` on a SQLite file."""

    log = Logger()

    READERS = 3

    def __init__(
        self, reactor: IReactorThreads, path: str, *, pool_factory: Any = None, cache_bytes: int = CACHE_BYTES
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._pool: adbapi.ConnectionPool | None = None
        self._readers: adbapi.ConnectionPool | None = None
        self._pool_factory = pool_factory or adbapi.ConnectionPool
        self._queue: list[_QueuedWrite] = []
        self._flushing = False
        self.cache = HistoryCache(cache_bytes)

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
        except OSError as e:
            raise StoreError(f"cannot use database {self.path}: {e.strerror or e}") from None
        self._pool = self._open_pool(1)
        try:
            applied = await self.pool.runInteraction(self._migrate)
        except sqlite3.Error as e:
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
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            txn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(sql):
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
        self.cache.clear()

    async def ping(self) -> bool:
        try:
            rows = await self.readers.runQuery("SELECT 1")
        except (sqlite3.Error, StoreError):
            return False
        return bool(rows == [(1,)])

    async def _write(
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

        def transaction(txn: Cursor) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            txn.execute("BEGIN IMMEDIATE")
            try:
                for write in batch:
                    txn.execute("SAVEPOINT write")
                    try:
                        outcomes.append((True, write.work(txn, *write.args)))
                    except sqlite3.Error as e:
                        txn.execute("ROLLBACK TO write")
                        outcomes.append((False, e))
                    txn.execute("RELEASE write")
                txn.execute("COMMIT")
            except BaseException:
                txn.execute("ROLLBACK")
                raise
            return outcomes

        def committed(outcomes: list[tuple[bool, Any]]) -> None:
            for write, (ok, value) in zip(batch, outcomes, strict=True):
                self._settle_cache(write, ok, value)
            for write, (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    write.waiter.callback(value)
                else:
                    write.waiter.errback(StoreError(str(value)))

        def failed(failure: Failure) -> None:
            error = failure.value if isinstance(failure.value, StoreError) else StoreError(str(failure.value))
            for write in batch:
                self._settle_cache(write, False, None)
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

    def _settle_cache(self, write: _QueuedWrite, ok: bool, value: Any) -> None:
        """Apply a finished write to the history cache: its effect if it committed, else forget the session."""
        if write.session_id is None:
            return
        if ok and write.effect is not None:
            write.effect(value)
        elif not ok:
            self.cache.drop(write.session_id)
        self.cache.end_write(write.session_id)

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            rows: list[tuple[Any, ...]] = await self.readers.runQuery(sql, params)
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return rows

    async def create_session(self, user_id: str, title: str, session_id: str | None = None) -> Session:
        now = utc_now()
        session = Session(session_id or new_id(), user_id, title, now, now)

        def insert(txn: Cursor) -> None:
            txn.execute(
                f"INSERT INTO chat_sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (session.id, session.user_id, session.title, session.created_at, session.updated_at),
            )

        await self._write(insert, session_id=session.id, effect=lambda _: self.cache.created(session))
        return session

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> list[Session]:
        rows = await self._read(
            f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE user_id = ? "
            "ORDER BY updated_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (user_id, limit, offset),
        )
        return [_session(row) for row in rows]

    async def get_session(self, user_id: str, session_id: str) -> Session | None:
        cached = self.cache.session(session_id)
        if cached is not None:
            return cached if cached.user_id == user_id else None
        rows = await self._read(
            f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = ? AND user_id = ?", (session_id, user_id)
        )
        return _session(rows[0]) if rows else None

    async def rename_session(self, user_id: str, session_id: str, title: str) -> bool:
        now = utc_now()

        def update(txn: Cursor) -> bool:
            txn.execute(
                "UPDATE chat_sessions SET title = ?, updated_at = ? WHERE id = ? AND user_id = ?",
                (title, now, session_id, user_id),
            )
            return bool(txn.rowcount)

        def effect(renamed: bool) -> None:
            if renamed:
                self.cache.renamed(session_id, title, now)

        return bool(await self._write(update, session_id=session_id, effect=effect))

    async def delete_session(self, user_id: str, session_id: str) -> bool:
        def delete(txn: Cursor) -> bool:
            txn.execute("DELETE FROM chat_sessions WHERE id = ? AND user_id = ?", (session_id, user_id))
            return bool(txn.rowcount)

        def effect(deleted: bool) -> None:
            if deleted:
                self.cache.drop(session_id)

        return bool(await self._write(delete, session_id=session_id, effect=effect))

    async def add_message(self, message: Message) -> None:
        now = utc_now()

        def insert(txn: Cursor) -> None:
            txn.execute(
                f"INSERT INTO chat_messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.session_id,
                    message.role,
                    message.content,
                    message.created_at,
                    _dump(message.tool_calls or None),
                    message.tool_call_id,
                    _dump(message.tool_executions or None),
                    _dump(message.approval_request),
                ),
            )
            for attachment in message.attachments:
                txn.execute(
                    "INSERT INTO chat_attachments (id, message_id, filename, mime_type, size, content, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        attachment.id,
                        message.id,
                        attachment.filename,
                        attachment.mime_type,
                        attachment.size,
                        attachment.content,
                        message.created_at,
                    ),
                )
            txn.execute("UPDATE chat_sessions SET updated_at = ? WHERE id = ?", (now, message.session_id))
            if not txn.rowcount:
                raise sqlite3.IntegrityError(f"session {message.session_id} does not exist")

        await self._write(
            insert, session_id=message.session_id, effect=lambda _: self.cache.appended(message, now)
        )

    async def session_history(self, user_id: str, session_id: str) -> tuple[Session | None, list[Message]]:
        session, history = await self._session_history(session_id)
        if session is None or session.user_id != user_id:
            return None, []
        return session, history

    async def _session_history(self, session_id: str) -> tuple[Session | None, list[Message]]:
        """Any user's session and its history, from the cache or else from the database (then cached)."""
        cached = self.cache.history(session_id)
        if cached is not None:
            return cached

        def select(txn: Cursor) -> tuple[Session | None, list[Message]]:
            txn.execute(f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = ?", (session_id,))
            row = txn.fetchone()
            if row is None:
                return None, []
            return _session(row), _select_messages(txn, "WHERE session_id = ? ORDER BY seq", (session_id,))

        read: Read = self.cache.begin_read(session_id)
        try:
            session, history = await self.readers.runInteraction(select)
        except BaseException as e:
            self.cache.abandon(read)
            if isinstance(e, sqlite3.Error):
                raise StoreError(str(e)) from e
            raise
        if session is None:
            self.cache.abandon(read)
        else:
            self.cache.fill(read, session, history)
        return session, history

    async def list_messages(self, user_id: str, session_id: str, limit: int, offset: int) -> list[Message] | None:
        def select(txn: Cursor) -> list[Message] | None:
            txn.execute("SELECT 1 FROM chat_sessions WHERE id = ? AND user_id = ?", (session_id, user_id))
            if txn.fetchone() is None:
                return None
            page = "WHERE session_id = ? ORDER BY seq LIMIT ? OFFSET ?"
            return _select_messages(txn, page, (session_id, limit, offset))

        try:
            found: list[Message] | None = await self.readers.runInteraction(select)
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return found

    async def history(self, session_id: str) -> list[Message]:
        return (await self._session_history(session_id))[1]

    async def clear_messages(self, user_id: str, session_id: str) -> bool:
        now = utc_now()

        def clear(txn: Cursor) -> bool:
            txn.execute(
                "UPDATE chat_sessions SET updated_at = ? WHERE id = ? AND user_id = ?",
                (now, session_id, user_id),
            )
            if not txn.rowcount:
                return False
            txn.execute("DELETE FROM chat_messages WHERE session_id = ?", (session_id,))
            txn.execute(
                "UPDATE tool_approvals SET status = 'expired', resolved_at = ? "
                "WHERE session_id = ? AND status = 'pending'",
                (now, session_id),
            )
            return True

        def effect(cleared: bool) -> None:
            if cleared:
                self.cache.cleared(session_id, now)

        return bool(await self._write(clear, session_id=session_id, effect=effect))

    async def create_approval(self, approval: Approval) -> None:
        def insert(txn: Cursor) -> None:
            txn.execute(
                "INSERT INTO tool_approvals (id, session_id, user_id, tool_calls, status, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    approval.id,
                    approval.session_id,
                    approval.user_id,
                    _dump(approval.tool_calls),
                    approval.status,
                    approval.created_at,
                    approval.expires_at,
                ),
            )

        await self._write(insert)

    async def get_approval(self, user_id: str, approval_id: str) -> Approval | None:
        rows = await self._read(
            "SELECT id, session_id, user_id, tool_calls, status, created_at, expires_at, resolved_at "
            "FROM tool_approvals WHERE id = ? AND user_id = ?",
            (approval_id, user_id),
        )
        if not rows:
            return None
        row = rows[0]
        return Approval(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7])

    async def resolve_approval(self, approval_id: str, status: str) -> bool:
        def update(txn: Cursor) -> bool:
            txn.execute(
                "UPDATE tool_approvals SET status = ?, resolved_at = ? WHERE id = ? AND status = 'pending'",
                (status, utc_now(), approval_id),
            )
            return bool(txn.rowcount)

        return bool(await self._write(update))


def _select_messages(txn: Cursor, where: str, params: tuple[Any, ...]) -> list[Message]:
    """Messages matching ``where`` with their attachments, inside a transaction."""
    txn.execute(f"SELECT {MESSAGE_COLUMNS} FROM chat_messages {where}", params)
    rows = txn.fetchall()
    ids = [row[0] for row in rows]
    attachments: dict[str, list[Attachment]] = {}
    if ids:
        marks = ",".join("?" * len(ids))
        txn.execute(
            "SELECT message_id, id, filename, mime_type, size, content FROM chat_attachments "
            f"WHERE message_id IN ({marks}) ORDER BY rowid",
            ids,
        )
        for message_id, *fields in txn.fetchall():
            attachments.setdefault(message_id, []).append(Attachment(*fields))
    return [
        Message(
            id=row[0],
            session_id=row[1],
            role=row[2],
            content=row[3],
            created_at=row[4],
            tool_calls=_load(row[5]),
            tool_call_id=row[6],
            tool_executions=_load(row[7]),
            approval_request=_load(row[8]),
            attachments=tuple(attachments.get(row[0], ())),
        )
        for row in rows
    ]


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (ours hold no semicolons inside literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]
