"""The store's queries, written once for both engines, and the history cache they keep current.

:class:`SQLStore` implements :class:`~aichat.store.base.Store` on top of two primitives each engine's
store provides: ``_run_write`` (run a transaction function so that writes take effect in call order, then apply
its effect on the cache) and ``_run_read`` (run a read-only transaction function), which ``_write`` and
``_read`` time for the metrics. Transaction functions take a
:class:`~aichat.store.engines.Txn` and may be run again whole, so they touch nothing outside the database.
Recently used sessions and their histories are kept in a :class:`~aichat.store.history_cache.HistoryCache`
updated by this store's own commits; it assumes this process is the only writer of the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from aichat.metrics import Metrics
from aichat.store.base import (
    Approval,
    Attachment,
    History,
    Message,
    Session,
    StoreError,
    StoreFull,
    ToolExecution,
    new_id,
    utc_now,
)
from aichat.store.engines import Engine, Txn, dump_json
from aichat.store.history_cache import HistoryCache, Read
from aichat.store.tail import context_chars, tail_start
from aichat.store.text import storable, storable_approval, storable_message

log = Logger(namespace="aichat.store")

#: Default budget of the history cache.
CACHE_BYTES = 64 * 1024 * 1024

SESSION_COLUMNS = "id, user_id, title, created_at, updated_at"
MESSAGE_COLUMNS = (
    "id, session_id, role, content, created_at, tool_calls, tool_call_id, tool_executions, approval_request"
)
INSERT_SESSION = f"INSERT INTO chat_sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
INSERT_MESSAGE = f"INSERT INTO chat_messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_ATTACHMENT = (
    "INSERT INTO chat_attachments (id, message_id, filename, mime_type, size, content, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
EXECUTION_COLUMNS = (
    "id, user_id, request_id, tool_call_id, tool_name, arguments, result, error, start_time, end_time, "
    "duration_ms, created_at"
)
INSERT_EXECUTION = f"INSERT INTO tool_executions ({EXECUTION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
APPROVAL_COLUMNS = "id, session_id, user_id, tool_calls, status, created_at, expires_at, resolved_at"
INSERT_APPROVAL = f"INSERT INTO tool_approvals ({APPROVAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


#: OpenTelemetry's ``db.system.name`` of each engine.
DB_SYSTEMS = {"sqlite": "sqlite", "postgres": "postgresql"}


class MissingSession(StoreError):
    """A message was written to a session that does not exist."""


def session_params(session: Session) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_SESSION`."""
    return (session.id, session.user_id, session.title, session.created_at, session.updated_at)


def message_params(message: Message) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_MESSAGE`."""
    return (
        message.id,
        message.session_id,
        message.role,
        message.content,
        message.created_at,
        dump_json(message.tool_calls or None),
        message.tool_call_id,
        dump_json(message.tool_executions or None),
        dump_json(message.approval_request),
    )


def attachment_params(message: Message, attachment: Attachment) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_ATTACHMENT`."""
    return (
        attachment.id,
        message.id,
        attachment.filename,
        attachment.mime_type,
        attachment.size,
        attachment.content,
        message.created_at,
    )


def approval_params(approval: Approval) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_APPROVAL`."""
    return (
        approval.id,
        approval.session_id,
        approval.user_id,
        dump_json(approval.tool_calls),
        approval.status,
        approval.created_at,
        approval.expires_at,
        approval.resolved_at,
    )


def execution_params(execution: ToolExecution) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_EXECUTION` (text that cannot be stored made storable)."""
    error = None if execution.error is None else storable(execution.error)
    return (
        execution.id,
        execution.user_id,
        execution.request_id,
        storable(execution.tool_call_id),
        storable(execution.tool_name),
        storable(execution.arguments),
        storable(execution.result),
        error,
        execution.start_time,
        execution.end_time,
        execution.duration_ms,
        execution.created_at,
    )


def execution_from_row(engine: Engine, row: Any) -> ToolExecution:
    """A :class:`ToolExecution` from ``SELECT EXECUTION_COLUMNS``."""
    load_time = engine.load_time
    return ToolExecution(
        id=row[0],
        user_id=row[1],
        request_id=row[2],
        tool_call_id=row[3],
        tool_name=row[4],
        arguments=row[5],
        result=row[6],
        error=row[7],
        start_time=load_time(row[8]),
        end_time=load_time(row[9]),
        duration_ms=int(row[10]),
        created_at=load_time(row[11]),
    )


def session_from_row(engine: Engine, row: Any) -> Session:
    """A :class:`Session` from ``SELECT SESSION_COLUMNS``."""
    return Session(row[0], row[1], row[2], engine.load_time(row[3]), engine.load_time(row[4]))


def approval_from_row(engine: Engine, row: Any) -> Approval:
    """An :class:`Approval` from ``SELECT APPROVAL_COLUMNS``."""
    return Approval(
        row[0],
        row[1],
        row[2],
        engine.load_json(row[3]),
        row[4],
        engine.load_time(row[5]),
        engine.load_time(row[6]),
        None if row[7] is None else engine.load_time(row[7]),
    )


def select_messages(
    engine: Engine, txn: Txn, session_id: str, limit: int | None = None, offset: int = 0
) -> list[Message]:
    """The session's messages in order (a page of them when ``limit`` is given), with their attachments."""
    page = "" if limit is None else " LIMIT ? OFFSET ?"
    params: tuple[Any, ...] = (session_id,) if limit is None else (session_id, limit, offset)
    txn.execute(f"SELECT seq, {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = ? ORDER BY seq{page}", params)
    rows = txn.fetchall()
    attachments = select_attachments(engine, txn, session_id, rows[0][0], rows[-1][0]) if rows else {}
    return [message_from_row(engine, row, attachments.get(row[1], ())) for row in rows]


def select_attachments(
    engine: Engine, txn: Txn, session_id: str, first_seq: int, last_seq: int
) -> dict[str, list[Attachment]]:
    """The attachments of the session's messages from ``first_seq`` to ``last_seq``, by message id.

    One fixed statement joined on the ``seq`` range, so the statement text does not grow with the number
    of messages.
    """
    txn.execute(
        "SELECT a.message_id, a.id, a.filename, a.mime_type, a.size, a.content FROM chat_attachments a "
        "JOIN chat_messages m ON m.id = a.message_id WHERE m.session_id = ? AND m.seq BETWEEN ? AND ? "
        f"ORDER BY m.seq, {engine.attachment_order}",
        (session_id, first_seq, last_seq),
    )
    attachments: dict[str, list[Attachment]] = {}
    for message_id, *fields in txn.fetchall():
        attachments.setdefault(message_id, []).append(Attachment(*fields))
    return attachments


def message_from_row(engine: Engine, row: Any, attachments: Sequence[Attachment] = ()) -> Message:
    """A :class:`Message` from ``SELECT seq, MESSAGE_COLUMNS``."""
    return Message(
        id=row[1],
        session_id=row[2],
        role=row[3],
        content=row[4],
        created_at=engine.load_time(row[5]),
        tool_calls=engine.load_json(row[6]),
        tool_call_id=row[7],
        tool_executions=engine.load_json(row[8]),
        approval_request=engine.load_json(row[9]),
        attachments=tuple(attachments),
    )


#: Newer than any message: the first page of a tail starts below it.
_NEWEST = 2**62
#: Rows of the first page of a tail; a further page is sized from the characters per row read so far (a
#: quarter more than the budget seems to need, or twice the last one while no user message starts a tail that
#: measures enough), at least :data:`_PAGE_FIRST` and at most :data:`_PAGE_MAX`.
_PAGE_FIRST = 128
_PAGE_MAX = 8192


def select_tail(engine: Engine, txn: Txn, session_id: str, budget_chars: int) -> History:
    """The session's budgeted tail (:func:`~aichat.store.tail.tail_start`), read newest first in pages, with
    its attachments.

    Every page is the same statement (its bound and size are parameters), and the attachments are read
    once for the tail's ``seq`` range.
    """
    rows: list[Any] = []
    messages: list[Message] = []
    below, size = _NEWEST, _PAGE_FIRST
    complete = False
    start: int | None = None
    while True:
        txn.execute(
            f"SELECT seq, {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = ? AND seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (session_id, below, size),
        )
        page = txn.fetchall()
        page.reverse()
        rows[:0] = page
        messages[:0] = [message_from_row(engine, row) for row in page]
        if len(page) < size:
            complete = True
            break
        start = tail_start(messages, budget_chars)
        if start is not None:
            break
        measured = sum(context_chars(messages))
        per_row = max(1.0, measured / len(messages))
        wanted = int(max(0, budget_chars - measured) / per_row * 1.25) + _PAGE_FIRST
        if measured > budget_chars:  # enough characters, but no user message yet: look further back, faster
            wanted = max(wanted, size * 2)
        below, size = page[0][0], min(wanted, _PAGE_MAX)
    if complete:
        start = tail_start(messages, budget_chars)
        complete = not start
    if start:
        rows, messages = rows[start:], messages[start:]
    if not rows:
        return History([], complete)
    attachments = select_attachments(engine, txn, session_id, rows[0][0], rows[-1][0])
    if attachments:
        messages = [replace(m, attachments=tuple(attachments[m.id])) if m.id in attachments else m for m in messages]
    return History(messages, complete)


def insert_message(txn: Txn, message: Message, now: str) -> None:
    """Append ``message`` with its attachments and bump its session's ``updated_at``."""
    txn.execute(INSERT_MESSAGE, message_params(message))
    for attachment in message.attachments:
        txn.execute(INSERT_ATTACHMENT, attachment_params(message, attachment))
    txn.execute("UPDATE chat_sessions SET updated_at = ? WHERE id = ?", (now, message.session_id))
    if not txn.rowcount:
        raise MissingSession(f"session {message.session_id} does not exist")


class SQLStore:
    """:class:`~aichat.store.base.Store` over an engine's ``_run_write`` and ``_run_read``."""

    engine: Engine

    def __init__(self, engine: Engine, cache_bytes: int) -> None:
        self.engine = engine
        #: Where operation durations are counted (set by the daemon).
        self.metrics: Metrics | None = None
        self.cache = HistoryCache(cache_bytes)
        self._full = False

    def _classified(self, error: BaseException, detail: str) -> StoreError:
        """The store error ``error`` stands for; a full disk is logged once per episode."""
        if isinstance(error, StoreFull) or self.engine.is_full(error):
            if not self._full:
                self._full = True
                log.error("Database disk full: writes fail until space is freed ({detail}); reads go on",
                          detail=detail)
            return error if isinstance(error, StoreFull) else StoreFull(detail)
        return error if isinstance(error, StoreError) else StoreError(detail)

    def _wrote(self) -> None:
        """A write committed: a disk-full episode, if any, is over."""
        if self._full:
            self._full = False
            log.info("Database writes succeed again")

    # -- the engine's primitives ----------------------------------------------------------------------

    async def open(self) -> None:
        """Create or adopt the database and apply pending migrations."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections and threads."""
        raise NotImplementedError

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        raise NotImplementedError

    async def _write(
        self,
        work: Callable[..., Any],
        *args: Any,
        session_id: str | None = None,
        effect: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run ``work(txn, *args)`` atomically; return once committed (timed; see :meth:`_run_write`)."""
        started = time.monotonic()
        error_type = ""
        try:
            return await self._run_write(work, *args, session_id=session_id, effect=effect)
        except BaseException as e:
            error_type = type(e).__name__
            raise
        finally:
            self._observe(work, started, error_type)

    async def _read(self, work: Callable[..., Any], *args: Any) -> Any:
        """Run ``work(txn, *args)`` in a read transaction and return its result (timed)."""
        started = time.monotonic()
        error_type = ""
        try:
            return await self._run_read(work, *args)
        except BaseException as e:
            error_type = type(e).__name__
            raise
        finally:
            self._observe(work, started, error_type)

    def _observe(self, work: Callable[..., Any], started: float, error_type: str) -> None:
        """Count one operation's duration, named by the store method whose transaction ``work`` is."""
        if self.metrics is not None:
            operation = work.__qualname__.split(".<locals>", 1)[0].rsplit(".", 1)[-1]
            system = DB_SYSTEMS.get(self.engine.name, self.engine.name)
            self.metrics.db_duration.labels(system, operation, error_type).observe(time.monotonic() - started)

    async def _run_write(
        self,
        work: Callable[..., Any],
        *args: Any,
        session_id: str | None = None,
        effect: Callable[[Any], None] | None = None,
    ) -> Any:
        """The engine's write: see the engines' stores."""
        raise NotImplementedError

    async def _run_read(self, work: Callable[..., Any], *args: Any) -> Any:
        """The engine's read transaction."""
        raise NotImplementedError

    def _settle_cache(self, session_id: str | None, effect: Callable[[Any], None] | None, ok: bool, value: Any) -> None:
        """Apply a finished write to the history cache: its effect if it committed, else forget the session."""
        if session_id is None:
            return
        if ok and effect is not None:
            effect(value)
        elif not ok:
            self.cache.drop(session_id)
        self.cache.end_write(session_id)

    # -- sessions -------------------------------------------------------------------------------------

    async def create_session(self, user_id: str, title: str, session_id: str | None = None) -> Session:
        now = utc_now()
        session = Session(session_id or new_id(), user_id, storable(title), now, now)

        def insert(txn: Txn) -> None:
            txn.execute(INSERT_SESSION, session_params(session))

        await self._write(insert, session_id=session.id, effect=lambda _: self.cache.created(session))
        return session

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> list[Session]:
        engine = self.engine
        statement = (
            f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE user_id = ? "
            f"ORDER BY updated_at DESC, {engine.session_tiebreak} LIMIT ? OFFSET ?"
        )

        def select(txn: Txn) -> list[Session]:
            txn.execute(statement, (user_id, limit, offset))
            return [session_from_row(engine, row) for row in txn.fetchall()]

        found: list[Session] = await self._read(select)
        return found

    async def get_session(self, user_id: str, session_id: str) -> Session | None:
        cached = self.cache.session(session_id)
        if cached is not None:
            return cached if cached.user_id == user_id else None
        engine = self.engine

        def select(txn: Txn) -> Session | None:
            txn.execute(
                f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = ? AND user_id = ?", (session_id, user_id)
            )
            row = txn.fetchone()
            return None if row is None else session_from_row(engine, row)

        found: Session | None = await self._read(select)
        return found

    async def rename_session(self, user_id: str, session_id: str, title: str) -> bool:
        now = utc_now()
        title = storable(title)

        def update(txn: Txn) -> bool:
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
        def delete(txn: Txn) -> bool:
            txn.execute("DELETE FROM chat_sessions WHERE id = ? AND user_id = ?", (session_id, user_id))
            return bool(txn.rowcount)

        def effect(deleted: bool) -> None:
            if deleted:
                self.cache.drop(session_id)

        return bool(await self._write(delete, session_id=session_id, effect=effect))

    # -- messages -------------------------------------------------------------------------------------

    async def add_message(self, message: Message) -> None:
        now = utc_now()
        message = storable_message(message)
        await self._write(
            insert_message,
            message,
            now,
            session_id=message.session_id,
            effect=lambda _: self.cache.appended(message, now),
        )

    async def session_history(
        self, user_id: str, session_id: str, budget_chars: int
    ) -> tuple[Session | None, History]:
        session, history = await self._session_tail(session_id, budget_chars)
        if session is None or session.user_id != user_id:
            return None, History()
        return session, history

    async def recent_history(self, session_id: str, budget_chars: int) -> History:
        return (await self._session_tail(session_id, budget_chars))[1]

    async def _session_tail(self, session_id: str, budget_chars: int) -> tuple[Session | None, History]:
        """Any user's session and its budgeted tail, from the cache or else from the database (then cached)."""
        cached = self.cache.history(session_id, budget_chars)
        if cached is not None:
            return cached
        engine = self.engine

        def select(txn: Txn) -> tuple[Session | None, History]:
            txn.execute(f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = ?", (session_id,))
            row = txn.fetchone()
            if row is None:
                return None, History()
            return session_from_row(engine, row), select_tail(engine, txn, session_id, budget_chars)

        read: Read = self.cache.begin_read(session_id)
        try:
            session, history = await self._read(select)
        except BaseException:
            self.cache.abandon(read)
            raise
        if session is None:
            self.cache.abandon(read)
        else:
            self.cache.fill(read, session, history, budget_chars)
        return session, history

    async def list_messages(self, user_id: str, session_id: str, limit: int, offset: int) -> list[Message] | None:
        engine = self.engine

        def select(txn: Txn) -> list[Message] | None:
            txn.execute("SELECT 1 FROM chat_sessions WHERE id = ? AND user_id = ?", (session_id, user_id))
            if txn.fetchone() is None:
                return None
            return select_messages(engine, txn, session_id, limit, offset)

        found: list[Message] | None = await self._read(select)
        return found

    async def history(self, session_id: str) -> list[Message]:
        engine = self.engine

        def select(txn: Txn) -> list[Message]:
            return select_messages(engine, txn, session_id)

        found: list[Message] = await self._read(select)
        return found

    async def clear_messages(self, user_id: str, session_id: str) -> bool:
        now = utc_now()

        def clear(txn: Txn) -> bool:
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

    # -- executions of requests without a session ----------------------------------------------------

    async def add_tool_executions(self, executions: Sequence[ToolExecution]) -> None:
        rows = [execution_params(e) for e in executions]
        if not rows:
            return

        def insert(txn: Txn) -> None:
            for row in rows:
                txn.execute(INSERT_EXECUTION, row)

        await self._write(insert)

    async def list_tool_executions(
        self, user_id: str | None, request_id: str | None, limit: int, offset: int
    ) -> list[ToolExecution]:
        engine = self.engine
        # NULL filters match every row: one statement for every combination.
        statement = (
            f"SELECT {EXECUTION_COLUMNS} FROM tool_executions WHERE (CAST(? AS TEXT) IS NULL OR user_id = ?) "
            "AND (CAST(? AS TEXT) IS NULL OR request_id = ?) "
            "ORDER BY created_at DESC, start_time DESC, id LIMIT ? OFFSET ?"
        )

        def select(txn: Txn) -> list[ToolExecution]:
            txn.execute(statement, (user_id, user_id, request_id, request_id, limit, offset))
            return [execution_from_row(engine, row) for row in txn.fetchall()]

        found: list[ToolExecution] = await self._read(select)
        return found

    # -- approvals ------------------------------------------------------------------------------------

    async def create_approval(self, approval: Approval) -> None:
        approval = storable_approval(approval)

        def insert(txn: Txn) -> None:
            txn.execute(INSERT_APPROVAL, approval_params(approval))

        # Named by its session so that it is ordered after the session's creation.
        await self._write(insert, session_id=approval.session_id)

    async def get_approval(self, user_id: str, approval_id: str) -> Approval | None:
        engine = self.engine

        def select(txn: Txn) -> Approval | None:
            txn.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM tool_approvals WHERE id = ? AND user_id = ?", (approval_id, user_id)
            )
            row = txn.fetchone()
            return None if row is None else approval_from_row(engine, row)

        found: Approval | None = await self._read(select)
        return found

    async def count_pending_approvals(self) -> int:
        """How many approvals wait for a decision (expired ones not yet marked are counted too)."""

        def count_pending_approvals(txn: Txn) -> int:
            txn.execute("SELECT COUNT(*) FROM tool_approvals WHERE status = 'pending'")
            row = txn.fetchone()
            return int(row[0]) if row is not None else 0

        return int(await self._read(count_pending_approvals))

    async def resolve_approval(self, approval_id: str, status: str) -> bool:
        now = utc_now()

        def update(txn: Txn) -> bool:
            txn.execute(
                "UPDATE tool_approvals SET status = ?, resolved_at = ? WHERE id = ? AND status = 'pending'",
                (status, now, approval_id),
            )
            return bool(txn.rowcount)

        return bool(await self._write(update))
