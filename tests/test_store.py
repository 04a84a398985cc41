"""The store contract on both engines (SQLite and a real PostgreSQL): per-user isolation, message round-trips,
approvals, the history cache; and SQLite's own migrations and group commit."""

from __future__ import annotations

import sqlite3
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from aichat.chat.context import build_messages
from aichat.store import Approval, Attachment, History, Message, StoreError, ToolExecution, new_id, utc_now
from aichat.store.sql import SQLStore
from aichat.store.sqlite import SQLiteStore, migrations
from aichat.store.tail import tail_start
from tests.support import InlinePool, inline_pg_store, inline_store

T = TypeVar("T")
#: The context budget the tests read tails with (the default ``chat.history_budget_chars``).
BUDGET = 100_000
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Drive a store coroutine that completes synchronously over the inline pool."""
    d = Deferred.fromCoroutine(coroutine)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "inline store calls complete synchronously"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SQLStore:
    """An opened store on a fresh database of each engine (PostgreSQL: a new database on the test cluster)."""
    if request.param == "sqlite":
        return inline_store(str(tmp_path / "db" / "aichat.db"))
    return inline_pg_store(request.getfixturevalue("pg_url"))


def uncached(store: SQLStore) -> SQLStore:
    """Another store on the same database without a history cache: it reads the database's truth."""
    if isinstance(store, SQLiteStore):
        return inline_store(store.path, cache_bytes=0)
    return inline_pg_store(store.dsn, cache_bytes=0)  # type: ignore[attr-defined]


def count_rows(store: SQLStore, table: str) -> int:
    """How many rows ``table`` holds, read through the store's own connection."""

    def select(txn: Any) -> int:
        txn.execute(f"SELECT count(*) FROM {table}")
        return int(txn.fetchone()[0])

    return int(run(store._read(select)))


def test_migrations_applied_once_and_recorded(tmp_path: Path) -> None:
    """Opening creates the folder, applies every migration and records it; reopening applies none."""
    path = tmp_path / "new" / "dir" / "aichat.db"
    first = inline_store(str(path))
    run(first.close())
    second = inline_store(str(path))
    run(second.close())
    connection = sqlite3.connect(path)
    versions = [row[0] for row in connection.execute("SELECT version FROM schema_migrations")]
    assert versions == [m[0] for m in migrations()] == [1, 2]
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"chat_sessions", "chat_messages", "chat_attachments", "tool_approvals"} <= tables


def test_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    """A database path whose folder cannot be created fails with the path in the message."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = SQLiteStore(Clock(), str(blocker / "x.db"), pool_factory=InlinePool)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"cannot use database .*file/x\.db"):
        run(store.open())


def test_sessions_are_isolated_per_user(store: SQLStore) -> None:
    """Another user's session is invisible to get, rename, delete, messages and clear."""
    mine = run(store.create_session("1", "Mine"))
    assert run(store.get_session("1", mine.id)) == mine
    assert run(store.get_session("2", mine.id)) is None
    assert run(store.rename_session("2", mine.id, "x")) is False
    assert run(store.delete_session("2", mine.id)) is False
    assert run(store.list_messages("2", mine.id, 50, 0)) is None
    assert run(store.clear_messages("2", mine.id)) is False
    assert run(store.list_sessions("2", 20, 0)) == []
    assert run(store.get_session("1", mine.id)) == mine


def test_sessions_listed_most_recent_first_with_paging(store: SQLStore) -> None:
    """list_sessions orders by updated_at descending; a new message moves a session to the top."""
    a = run(store.create_session("1", "a"))
    b = run(store.create_session("1", "b"))
    c = run(store.create_session("1", "c"))
    assert [s.title for s in run(store.list_sessions("1", 20, 0))] == ["c", "b", "a"]
    run(store.add_message(Message(new_id("user"), a.id, "user", "hi")))
    assert [s.title for s in run(store.list_sessions("1", 2, 0))] == ["a", "c"]
    assert [s.title for s in run(store.list_sessions("1", 2, 2))] == ["b"]
    assert b.id != c.id


def test_rename_bumps_updated_at(store: SQLStore) -> None:
    """Renaming changes the title and moves updated_at forward."""
    session = run(store.create_session("1", "old"))
    assert run(store.rename_session("1", session.id, "new")) is True
    renamed = run(store.get_session("1", session.id))
    assert renamed is not None
    assert renamed.title == "new"
    assert renamed.updated_at >= session.updated_at


def test_messages_round_trip_with_tools_and_attachments(store: SQLStore) -> None:
    """Tool calls, tool results with their call ids, timings and attachments come back as stored."""
    session = run(store.create_session("1", "t"))
    call = {"id": "call_1", "type": "function", "function": {"name": "everything__echo", "arguments": "{}"}}
    messages = [
        Message(new_id("user"), session.id, "user", "read this",
                attachments=(Attachment(new_id(), "a.txt", "text/plain", 5, "aGVsbG8="),)),
        Message(new_id("assistant"), session.id, "assistant", "", tool_calls=[call]),
        Message(new_id("tool"), session.id, "tool", "hello", tool_call_id="call_1",
                tool_executions=[{"id": "call_1", "tool_name": "echo", "duration_ms": 3}]),
        Message(new_id("assistant"), session.id, "assistant", "done"),
    ]
    for message in messages:
        run(store.add_message(message))
    assert run(store.history(session.id)) == messages
    page = run(store.list_messages("1", session.id, 2, 1))
    assert page == messages[1:3]


def test_session_history_reads_both_for_the_owner_only(store: SQLStore) -> None:
    """session_history returns the session and its messages in one read; nothing for another user."""
    session = run(store.create_session("1", "t"))
    message = Message(new_id("user"), session.id, "user", "hi")
    run(store.add_message(message))
    found, history = run(store.session_history("1", session.id, BUDGET))
    assert found is not None and found.id == session.id
    assert history == History([message], complete=True)
    assert run(store.session_history("2", session.id, BUDGET)) == (None, History())


def test_message_for_missing_session_fails(store: SQLStore) -> None:
    """A message cannot be added to a session that does not exist."""
    with pytest.raises(StoreError):
        run(store.add_message(Message(new_id("user"), "nope", "user", "x")))


def test_delete_session_cascades(store: SQLStore) -> None:
    """Deleting a session deletes its messages, attachments and approvals."""
    session = run(store.create_session("1", "t"))
    run(store.add_message(Message(new_id("user"), session.id, "user", "x",
                                  attachments=(Attachment(new_id(), "f", "", 1, "eA=="),))))
    run(store.create_approval(Approval(new_id("approval"), session.id, "1", [], "pending", utc_now(), utc_now())))
    assert count_rows(store, "chat_attachments") == 1
    assert run(store.delete_session("1", session.id)) is True
    for table in ("chat_messages", "chat_attachments", "tool_approvals"):
        assert count_rows(store, table) == 0


def test_clear_messages_keeps_session_and_expires_approvals(store: SQLStore) -> None:
    """Clearing deletes the history the model sees and cancels pending approvals."""
    session = run(store.create_session("1", "t"))
    run(store.add_message(Message(new_id("user"), session.id, "user", "x")))
    approval = Approval(new_id("approval"), session.id, "1", [{"id": "c"}], "pending", utc_now(), utc_now())
    run(store.create_approval(approval))
    assert run(store.clear_messages("1", session.id)) is True
    assert run(store.history(session.id)) == []
    assert run(store.get_session("1", session.id)) is not None
    stored = run(store.get_approval("1", approval.id))
    assert stored is not None
    assert stored.status == "expired"


def test_pending_approvals_are_counted_and_store_operations_timed(store: SQLStore) -> None:
    """count_pending_approvals counts every user's pending approvals and no resolved one; each operation's
    duration is recorded under its method's name and the engine's OpenTelemetry system name."""
    from aichat.metrics import Metrics

    store.metrics = Metrics()
    assert run(store.count_pending_approvals()) == 0
    ids = []
    for user in ("1", "2", "2"):
        session = run(store.create_session(user, "t"))
        approval = Approval(new_id("approval"), session.id, user, [{"id": "c"}], "pending", utc_now(), utc_now())
        run(store.create_approval(approval))
        ids.append(approval.id)
    assert run(store.count_pending_approvals()) == 3
    run(store.resolve_approval(ids[0], "approved"))
    assert run(store.count_pending_approvals()) == 2
    system = {"sqlite": "sqlite", "postgres": "postgresql"}[store.engine.name]
    registry = store.metrics.registry
    for operation, count in (("count_pending_approvals", 3), ("create_approval", 3), ("resolve_approval", 1)):
        labels = {"db_system_name": system, "db_operation_name": operation, "error_type": ""}
        assert registry.get_sample_value("db_client_operation_duration_seconds_count", labels) == count


def test_approval_resolves_once_and_is_user_bound(store: SQLStore) -> None:
    """An approval belongs to its user and leaves 'pending' exactly once."""
    session = run(store.create_session("1", "t"))
    approval = Approval(new_id("approval"), session.id, "1", [{"id": "c"}], "pending", utc_now(), utc_now())
    run(store.create_approval(approval))
    assert run(store.get_approval("2", approval.id)) is None
    assert run(store.get_approval("1", approval.id)) == approval
    assert run(store.resolve_approval(approval.id, "approved")) is True
    assert run(store.resolve_approval(approval.id, "denied")) is False
    resolved = run(store.get_approval("1", approval.id))
    assert resolved is not None
    assert resolved.status == "approved"
    assert resolved.resolved_at


def test_ping(store: SQLStore) -> None:
    """ping is true on an open store and false after close."""
    assert run(store.ping()) is True
    run(store.close())
    assert run(store.ping()) is False


class GroupCommitTests(TestCase):
    """Concurrent writes through the real thread pool share transactions but stay independent."""

    async def test_concurrent_writes_are_grouped_and_isolated(self) -> None:
        """50 concurrent writes commit in fewer transactions; a failing one does not undo the others."""
        from twisted.internet import reactor

        store = SQLiteStore(cast(IReactorThreads, reactor), self.mktemp() + ".db")
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        transactions = 0
        run_interaction = store.pool.runInteraction

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return run_interaction(*args, **kwargs)

        store.pool.runInteraction = counting  # type: ignore[method-assign]
        session = await store.create_session("1", "t")
        writes = [
            Deferred.fromCoroutine(store.add_message(Message(new_id("user"), session.id, "user", str(i))))
            for i in range(50)
        ]
        bad = Deferred.fromCoroutine(store.add_message(Message(new_id("user"), "missing", "user", "x")))
        writes.append(Deferred.fromCoroutine(store.add_message(Message(new_id("user"), session.id, "user", "50"))))
        results = await DeferredList([*writes, bad], consumeErrors=True)
        assert all(ok for ok, _ in results[:-1])
        failed, failure = results[-1]
        assert not failed
        assert isinstance(failure, Failure) and failure.check(StoreError)
        history = await store.history(session.id)
        assert [m.content for m in history] == [str(i) for i in range(51)]
        assert transactions < 20, f"{transactions} transactions for 52 writes"

    async def test_one_users_odd_write_never_rolls_back_another_users_writes(self) -> None:
        """400 writes of one user grouped with another user's unstorable titles and a write that raises
        something no database error class covers: every valid write commits."""
        from twisted.internet import reactor

        store = SQLiteStore(cast(IReactorThreads, reactor), self.mktemp() + ".db")
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        mine = await store.create_session("1", "mine")

        def explode(txn: Any) -> None:
            "\ud800".encode()  # what sqlite3 raises binding a lone surrogate: no sqlite3.Error

        writes: list[Deferred[Any]] = []
        for i in range(400):
            writes.append(Deferred.fromCoroutine(store.add_message(Message(new_id("user"), mine.id, "user", str(i)))))
            if i % 40 == 0:
                writes.append(Deferred.fromCoroutine(cast(Any, store.create_session("2", "bad \ud800 title"))))
                writes.append(Deferred.fromCoroutine(store._write(explode)))
        results = await DeferredList(writes, consumeErrors=True)
        exploded = [failure for ok, failure in results if not ok]
        assert len(exploded) == 10 and all(isinstance(f, Failure) and f.check(StoreError) for f in exploded)
        self.flushLoggedErrors(UnicodeEncodeError)
        history = await store.history(mine.id)
        assert [m.content for m in history] == [str(i) for i in range(400)]
        titles = {s.title for s in await store.list_sessions("2", 100, 0)}
        assert titles == {"bad \ufffd title"}


def test_text_no_engine_can_hold_is_stored_replaced(store: SQLStore) -> None:
    """NUL and lone surrogates from a model or a tool (a title, a result) are stored as U+FFFD on both
    engines, and the cache holds what the database holds."""
    session = run(store.create_session("1", "nul \x00 and \udc00"))
    assert session.title == "nul \ufffd and \ufffd"
    executions = [{"id": "c1", "tool_name": "t", "result": "a\x00b", "arguments": {"k\x00": "\ud800"}}]
    run(store.add_message(Message(new_id("tool"), session.id, "tool", "out \x00", tool_call_id="c1",
                                  tool_executions=executions)))
    stored = run(store.history(session.id))[0]
    assert stored.content == "out \ufffd"
    assert stored.tool_executions == [{"id": "c1", "tool_name": "t", "result": "a\ufffdb",
                                       "arguments": {"k\ufffd": "\ufffd"}}]
    assert database_view(store, "1", session.id)[1].messages == [stored]


def database_view(store: SQLStore, user: str, session_id: str) -> tuple[Any, History]:
    """What a store without a cache reads for the session: the database's truth."""
    plain = uncached(store)
    try:
        return run(plain.session_history(user, session_id, BUDGET))
    finally:
        run(plain.close())


def test_cached_history_matches_the_database_through_every_write(store: SQLStore) -> None:
    """After each kind of write, the history served from the cache equals what the database holds."""
    session = run(store.create_session("1", "first"))
    assert session.id in store.cache
    steps = [
        lambda: store.add_message(Message(new_id("user"), session.id, "user", "hello")),
        lambda: store.add_message(
            Message(new_id("assistant"), session.id, "assistant", "", tool_calls=[{"id": "c1", "type": "function",
                    "function": {"name": "echo", "arguments": "{}"}}])
        ),
        lambda: store.add_message(Message(new_id("tool"), session.id, "tool", "done", tool_call_id="c1")),
        lambda: store.rename_session("1", session.id, "renamed"),
        lambda: store.clear_messages("1", session.id),
        lambda: store.add_message(Message(new_id("user"), session.id, "user", "again")),
    ]
    for step in steps:
        run(step())
        assert session.id in store.cache
        assert run(store.session_history("1", session.id, BUDGET)) == database_view(store, "1", session.id)
    assert run(store.get_session("1", session.id)) == database_view(store, "1", session.id)[0]
    assert run(store.session_history("2", session.id, BUDGET)) == (None, History())
    assert run(store.get_session("2", session.id)) is None
    run(store.delete_session("1", session.id))
    assert session.id not in store.cache
    assert run(store.session_history("1", session.id, BUDGET)) == (None, History())


def test_read_overtaken_by_a_commit_is_not_cached(store: SQLStore) -> None:
    """A history read that returns after a write to the same session committed must not be cached: it may
    predate the write. The next read goes to the database and sees the write."""
    session = run(store.create_session("1", "t"))
    run(store.add_message(Message(new_id("user"), session.id, "user", "one")))
    store.cache.clear()
    held: list[tuple[Deferred[Any], Any]] = []
    real = store._read

    def late(work: Any, *args: Any) -> Deferred[Any]:
        """Read the database now, but deliver what was read only when the test says so."""
        delayed: Deferred[Any] = Deferred()
        Deferred.fromCoroutine(real(work, *args)).addCallback(lambda result: held.append((delayed, result)))
        return delayed

    store._read = late  # type: ignore[method-assign,assignment]
    reading = Deferred.fromCoroutine(store.session_history("1", session.id, BUDGET))
    store._read = real  # type: ignore[method-assign]
    run(store.add_message(Message(new_id("user"), session.id, "user", "two")))
    [(pending, stale)] = held
    pending.callback(stale)
    _, history = cast(tuple[Any, History], reading.result)
    assert [m.content for m in history.messages] == ["one"]
    assert session.id not in store.cache
    assert [m.content for m in run(store.recent_history(session.id, BUDGET)).messages] == ["one", "two"]
    assert session.id in store.cache


def test_failed_write_drops_the_session_from_the_cache(store: SQLStore) -> None:
    """A write that fails leaves the cache without the session, so the next read asks the database."""
    session = run(store.create_session("1", "t"))
    attachment = Attachment("dup", "a.txt", "text/plain", 1, "YQ==")
    run(store.add_message(Message(new_id("user"), session.id, "user", "one", attachments=(attachment,))))
    with pytest.raises(StoreError):
        run(store.add_message(Message(new_id("user"), session.id, "user", "two", attachments=(attachment,))))
    assert session.id not in store.cache
    assert [m.content for m in run(store.recent_history(session.id, BUDGET)).messages] == ["one"]


def test_many_attachments_across_a_page(store: SQLStore) -> None:
    """Attachments of every message of a long history and of a page come back with their own messages."""
    session = run(store.create_session("1", "t"))
    messages = [
        Message(new_id("user"), session.id, "user", str(i),
                attachments=tuple(Attachment(new_id(), f"{i}-{j}.txt", "text/plain", 1, "YQ==") for j in range(i % 3)))
        for i in range(40)
    ]
    for message in messages:
        run(store.add_message(message))
    assert run(uncached(store).history(session.id)) == messages
    assert run(store.list_messages("1", session.id, 7, 11)) == messages[11:18]


def test_schema_newer_than_the_code_is_refused(store: SQLStore) -> None:
    """A database migrated by a newer version refuses to open, saying so."""
    table = "schema_migrations" if isinstance(store, SQLiteStore) else "aichat_schema_migrations"

    def record(txn: Any) -> None:
        txn.execute(
            f"INSERT INTO {table} (version, name, applied_at) VALUES (?, ?, ?)", (99, "9999_future.sql", utc_now())
        )

    run(store._write(record))
    run(store.close())
    with pytest.raises(StoreError, match="schema is at version 99, newer than this aichat-backend"):
        uncached(store)


def test_recent_history_is_the_budgeted_tail_on_both_engines(store: SQLStore) -> None:
    """A long session (tool rounds, files, approvals) is read as the tail :func:`tail_start` names, over
    several pages, with attachments, from the cache and from the database alike; the context built from it
    is the one built from every message, and ``complete`` says whether it reaches the first message."""
    session = run(store.create_session("1", "t"))
    for n in range(150):
        files = (Attachment(new_id(), f"{n}.txt", "text/plain", 4, "YWJjZA=="),) if n % 7 == 0 else ()
        run(store.add_message(Message(new_id("user"), session.id, "user", f"question {n}", attachments=files)))
        if n % 5 == 0:
            calls = [{"id": f"c{n}", "type": "function", "function": {"name": "echo", "arguments": "{}"}}]
            run(store.add_message(Message(new_id("assistant"), session.id, "assistant", "", tool_calls=calls)))
            run(store.add_message(Message(new_id("tool"), session.id, "tool", "r" * 40, tool_call_id=f"c{n}")))
        if n % 11 == 0:
            run(store.add_message(Message(new_id("approval"), session.id, "tool_approval", "approve?")))
        run(store.add_message(Message(new_id("assistant"), session.id, "assistant", f"answer {n}")))
    every = run(store.history(session.id))
    assert len(every) > 2 * 128  # more than one page of the tail's reads
    plain = uncached(store)
    try:
        for budget in (0, 60, 900, 5000, 10**9):
            start = tail_start(every, budget)
            expected = History(every[start:] if start else every, complete=not start)
            store.cache.clear()
            assert run(plain.recent_history(session.id, budget)) == expected
            assert run(store.recent_history(session.id, budget)) == expected  # a miss, then cached
            assert run(store.recent_history(session.id, budget)) == expected  # a hit
            context = build_messages("sys", expected.messages, budget, NOW)
            assert context == build_messages("sys", every, budget, NOW)
            if budget < 5000:
                assert not expected.complete and len(expected.messages) < len(every) // 4
    finally:
        run(plain.close())


def test_a_cached_tail_stays_bounded_as_the_session_grows(store: SQLStore) -> None:
    """Appends to a cached session trim it to the tail its budget needs: the cache holds as much after 400
    turns as after 200, and what it serves equals the database's tail."""
    session = run(store.create_session("1", "t"))
    sizes = []
    for n in range(400):
        run(store.add_message(Message(new_id("user"), session.id, "user", f"q{n:04}")))
        run(store.add_message(Message(new_id("assistant"), session.id, "assistant", f"a{n:04}")))
        run(store.recent_history(session.id, 500))
        if n in (199, 399):
            sizes.append(store.cache.size)
    assert sizes[0] == sizes[1] and sizes[0] < 200 * 2 * 400
    plain = uncached(store)
    try:
        assert run(store.recent_history(session.id, 500)) == run(plain.recent_history(session.id, 500))
    finally:
        run(plain.close())


def test_tool_executions_of_requests_without_a_session(store: SQLStore) -> None:
    """Executions stored by user and request come back newest first, filtered by user and/or request, with
    text that could not be stored made storable; another user's filter sees none of them."""
    def execution(user: str, request: str, n: int, error: str | None = None) -> ToolExecution:
        record = {"id": f"call_{n}", "tool_name": "everything__echo", "arguments": '{"m": "\ud800"}',
                  "result": "" if error else f"r{n}", "start_time": f"2026-01-01T00:00:0{n}.000000Z",
                  "end_time": f"2026-01-01T00:00:0{n}.500000Z", "duration_ms": 500}
        if error:
            record["error"] = error
        return ToolExecution.of(user, request, record)

    first = [execution("1", "chatcmpl_a", 1), execution("1", "chatcmpl_a", 2, "Error executing tool: boom")]
    run(store.add_tool_executions(first))
    run(store.add_tool_executions([execution("2", "chatcmpl_b", 3)]))
    mine = run(store.list_tool_executions("1", None, 10, 0))
    assert [(e.tool_call_id, e.error) for e in mine] == [("call_2", "Error executing tool: boom"), ("call_1", None)]
    assert mine[1].arguments == '{"m": "\ufffd"}' and mine[1].start_time == "2026-01-01T00:00:01.000000Z"
    assert mine[0].to_json()["error"] == "Error executing tool: boom" and mine[0].duration_ms == 500
    assert [e.request_id for e in run(store.list_tool_executions(None, None, 10, 0))] == [
        "chatcmpl_b", "chatcmpl_a", "chatcmpl_a"
    ]
    assert run(store.list_tool_executions("2", "chatcmpl_a", 10, 0)) == []
    assert [e.user_id for e in run(store.list_tool_executions(None, "chatcmpl_b", 10, 0))] == ["2"]
    assert len(run(store.list_tool_executions("1", "chatcmpl_a", 1, 1))) == 1


def test_a_tail_without_a_user_message_is_the_whole_session(store: SQLStore) -> None:
    """Over the budget but with no user message to start a tail at, every message is read (the context
    builder may need any of them), over pages that keep growing."""
    session = run(store.create_session("1", "t"))
    for n in range(600):
        run(store.add_message(Message(new_id("assistant"), session.id, "assistant", f"note {n:04}")))
    plain = uncached(store)
    try:
        tail = run(plain.recent_history(session.id, 100))
    finally:
        run(plain.close())
    assert tail.complete and [m.content for m in tail.messages] == [f"note {n:04}" for n in range(600)]
