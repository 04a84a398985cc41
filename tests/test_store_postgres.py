"""What only the PostgreSQL store does, on a real server: adopting the Go service's database in place,
refusing states it must not touch, migrating under a lock, and running transactions on real threads
(per-session order, re-runs after a deadlock)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, cast

import psycopg
import pytest
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from aichat.store import Message, StoreError, new_id
from aichat.store.engines import Txn
from aichat.store.postgres import PostgresStore
from aichat.store.schema import migrations
from tests.pgcluster import Cluster
from tests.support import build_api, inline_pg_store, make_settings
from tests.test_api import Client
from tests.test_store import run

# The Go service's golang-migrate migrations, as its repository has them (reference-behaviour.md, section 6).
GO_000001_UP = """
CREATE TABLE IF NOT EXISTS chat_sessions (
    id VARCHAR(36) PRIMARY KEY,
    user_id VARCHAR(255) NOT NULL,
    title VARCHAR(255) NOT NULL DEFAULT '',
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_chat_sessions_user_id ON chat_sessions(user_id);
CREATE INDEX IF NOT EXISTS idx_chat_sessions_updated_at ON chat_sessions(updated_at DESC);
CREATE TABLE IF NOT EXISTS chat_messages (
    id VARCHAR(36) PRIMARY KEY,
    session_id VARCHAR(36) NOT NULL REFERENCES chat_sessions(id) ON DELETE CASCADE,
    role VARCHAR(50) NOT NULL,
    content TEXT NOT NULL,
    tool_calls JSONB,
    tool_executions JSONB,
    approval_request JSONB,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_chat_messages_session_id ON chat_messages(session_id);
CREATE INDEX IF NOT EXISTS idx_chat_messages_created_at ON chat_messages(created_at);
CREATE TABLE IF NOT EXISTS chat_attachments (
    id VARCHAR(36) PRIMARY KEY,
    message_id VARCHAR(36) NOT NULL REFERENCES chat_messages(id) ON DELETE CASCADE,
    filename VARCHAR(255) NOT NULL,
    mime_type VARCHAR(100) NOT NULL,
    size BIGINT NOT NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_chat_attachments_message_id ON chat_attachments(message_id);
"""
GO_000002_UP = """
ALTER TABLE chat_sessions ALTER COLUMN id TYPE VARCHAR(64);
ALTER TABLE chat_messages ALTER COLUMN id TYPE VARCHAR(64);
ALTER TABLE chat_messages ALTER COLUMN session_id TYPE VARCHAR(64);
ALTER TABLE chat_attachments ALTER COLUMN id TYPE VARCHAR(64);
ALTER TABLE chat_attachments ALTER COLUMN message_id TYPE VARCHAR(64);
"""
GOLANG_MIGRATE = "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);"

SESSION = "5b0e6a9e-3f7c-4a53-9d61-0c1f9f3b8a21"
CALL = {"id": "call_abc", "type": "function", "function": {"name": "pmm__list_services", "arguments": '{"a":1}'}}
EXECUTION = {
    "id": "call_abc",
    "tool_name": "pmm__list_services",
    "arguments": '{"a":1}',
    "result": "3 services",
    "start_time": "2025-06-01T10:00:01.5Z",
    "end_time": "2025-06-01T10:00:01.75Z",
    "duration_ms": 250,
}

# Go's encoding/json output: compact, fields in struct order.
GO_EXECUTIONS = json.dumps([EXECUTION], separators=(",", ":"))

# Rows as the Go service writes them: application timestamps in UTC, jsonb documents, base64 content.
GO_ROWS = f"""
INSERT INTO chat_sessions (id, user_id, title, created_at, updated_at) VALUES
    ('{SESSION}', '42', 'Disk usage on db1', '2025-06-01 10:00:00+00', '2025-06-01 10:00:05.123456+00'),
    ('other-user-session-0000000000000000', '43', 'Not yours', '2025-06-01 09:00:00+00', '2025-06-01 09:00:00+00');
INSERT INTO chat_messages (id, session_id, role, content, tool_calls, tool_executions, approval_request, created_at)
VALUES
    ('user_0c9a7a7e-9d8c-4d0e-8f1e-7b7d3f0e2a11', '{SESSION}', 'user', 'why is db1 full?', NULL, NULL, NULL,
     '2025-06-01 10:00:00.5+00'),
    ('assistant_2f1e0a6b-1c44-4b8e-a6a5-3d2e9c7f8b10', '{SESSION}', 'assistant', '',
     '[{{"id":"call_abc","type":"function","function":{{"name":"pmm__list_services","arguments":"{{\\"a\\":1}}"}}}}]',
     NULL, NULL, '2025-06-01 10:00:01+00'),
    ('tool_approval_7e2c', '{SESSION}', 'tool_approval', 'Approve?', NULL, NULL,
     '{{"request_id":"req_1","tool_calls":[{{"id":"call_abc","type":"function","function":{{"name":"pmm__list_services","arguments":"{{\\"a\\":1}}"}}}}],"processed":true}}',
     '2025-06-01 10:00:01.2+00'),
    ('tool_9b7a', '{SESSION}', 'tool', '3 services', NULL,
     '{GO_EXECUTIONS}',
     NULL, '2025-06-01 10:00:02+00'),
    ('assistant_5d', '{SESSION}', 'assistant', 'db1 has 3 services.', 'null', NULL, NULL, '2025-06-01 10:00:05+00');
INSERT INTO chat_attachments (id, message_id, filename, mime_type, size, content, created_at) VALUES
    ('att_1', 'user_0c9a7a7e-9d8c-4d0e-8f1e-7b7d3f0e2a11', 'df.txt', 'text/plain', 11, 'ZGIxIDk5JSBmdWxs',
     '2025-06-01 10:00:00.5+00');
"""


def go_database(cluster: Cluster, version: int = 2, dirty: bool = False, rows: bool = True) -> str:
    """A database as the Go service leaves it: its migrations up to ``version`` and its rows."""
    url = cluster.create_database("go")
    cluster.execute(url, GO_000001_UP + (GO_000002_UP if version >= 2 else "") + GOLANG_MIGRATE)
    cluster.execute(url, f"INSERT INTO schema_migrations VALUES ({version}, {str(dirty).lower()})")
    if rows:
        cluster.execute(url, GO_ROWS)
    return url


def test_go_database_is_served_in_place_to_the_same_user(pg_cluster: Cluster, tmp_path: Any) -> None:
    """Sessions, messages (with tool calls, executions and approval requests) and attachments that the Go
    service stored come back through the API, in order, to their user only; its tables are kept."""
    url = go_database(pg_cluster)
    store = inline_pg_store(url)
    _, resource = build_api(make_settings(tmp_path), store, Clock())
    client = Client(resource)
    status, listing, _ = client.call("GET", "/v1/chat/sessions", headers={"X-User-ID": "42"})
    assert status == 200
    assert [(s["id"], s["title"], s["updated_at"]) for s in listing["sessions"]] == [
        (SESSION, "Disk usage on db1", "2025-06-01T10:00:05.123456Z")
    ]
    status, page, _ = client.call("GET", f"/v1/chat/sessions/{SESSION}/messages", headers={"X-User-ID": "42"})
    assert status == 200
    messages = page["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool_approval", "tool", "assistant"]
    assert messages[0]["timestamp"] == "2025-06-01T10:00:00.500000Z"
    assert messages[0]["attachments"] == [
        {"id": "att_1", "filename": "df.txt", "mime_type": "text/plain", "size": 11, "content": "ZGIxIDk5JSBmdWxs"}
    ]
    assert messages[1]["tool_calls"] == [CALL]
    assert messages[2]["approval_request"] == {"request_id": "req_1", "tool_calls": [CALL], "processed": True}
    assert messages[3]["tool_executions"] == [EXECUTION]
    assert messages[4] == {
        "id": "assistant_5d",
        "role": "assistant",
        "content": "db1 has 3 services.",
        "timestamp": messages[4]["timestamp"],
    }
    status, _, _ = client.call("GET", f"/v1/chat/sessions/{SESSION}", headers={"X-User-ID": "43"})
    assert status == 404
    # New messages go after the Go service's, and the Go service's record still says version 2, clean.
    run(store.add_message(Message(new_id("user"), SESSION, "user", "and now?")))
    history = run(inline_pg_store(url, cache_bytes=0).history(SESSION))
    assert [m.content for m in history][-2:] == ["db1 has 3 services.", "and now?"]
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT version, dirty FROM schema_migrations").fetchall() == [(2, False)]
        tables = {r[0] for r in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"chat_sessions", "chat_messages", "chat_attachments", "schema_migrations", "tool_approvals",
            "aichat_schema_migrations"} <= tables


def test_go_version_1_is_widened_and_recorded_as_2(pg_cluster: Cluster) -> None:
    """A database at the Go service's version 1 gets version 2's wider ids, and golang-migrate's record says 2."""
    url = go_database(pg_cluster, version=1, rows=False)
    store = inline_pg_store(url)
    session = run(store.create_session("1", "t"))
    run(store.add_message(Message(new_id("assistant"), session.id, "assistant", "x" * 10)))
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT version, dirty FROM schema_migrations").fetchall() == [(2, False)]


@pytest.mark.parametrize(
    ("version", "dirty", "expected"),
    [
        (2, True, r"golang-migrate state is dirty at version 2 .*force 2"),
        (1, True, r"golang-migrate state is dirty at version 1"),
        (3, False, r"golang-migrate version 3, which this aichat-backend cannot adopt .*goto 2"),
    ],
)
def test_dirty_or_unknown_go_state_is_refused(pg_cluster: Cluster, version: int, dirty: bool, expected: str) -> None:
    """A dirty golang-migrate state or an unknown version refuses to start and says what to do; nothing is
    changed."""
    url = go_database(pg_cluster, version=min(version, 2), rows=False)
    pg_cluster.execute(url, f"UPDATE schema_migrations SET version = {version}, dirty = {str(dirty).lower()}")
    with pytest.raises(StoreError, match=expected):
        inline_pg_store(url)
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT to_regclass('aichat_schema_migrations')").fetchone() == (None,)


def test_new_database_gets_the_go_schema_and_our_migrations_once(pg_url: str) -> None:
    """An empty database gets the Go service's tables (recorded as golang-migrate version 2) and ours,
    each migration recorded once; opening again applies nothing."""
    run(inline_pg_store(pg_url).close())
    run(inline_pg_store(pg_url).close())
    with psycopg.connect(pg_url) as connection:
        assert connection.execute("SELECT version, dirty FROM schema_migrations").fetchall() == [(2, False)]
        recorded = [r[0] for r in connection.execute("SELECT version FROM aichat_schema_migrations ORDER BY 1")]
    assert recorded == [m[0] for m in migrations("postgres")] == [1, 2, 3]


def test_instances_starting_together_migrate_once(pg_url: str) -> None:
    """Four stores opening the same new database at once (on real threads) all succeed: the advisory lock
    serializes the migration."""
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            run(inline_pg_store(pg_url).close())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with psycopg.connect(pg_url) as connection:
        assert connection.execute("SELECT count(*) FROM aichat_schema_migrations").fetchone() == (3,)


def test_connection_failures_carry_the_database_reason_without_the_password(pg_cluster: Cluster) -> None:
    """Wrong password, unknown database, nothing listening: each a StoreError with libpq's reason, no password."""
    cases = [
        (pg_cluster.url(password="wrong-pw-123"), "password authentication failed"),
        (pg_cluster.url("no_such_db", password="test-secret-pw"), 'database "no_such_db" does not exist'),
        (f"postgresql://u:pw-xyz@127.0.0.1:{pg_cluster.port + 1}/x", "Connection refused"),
    ]
    for url, expected in cases:
        with pytest.raises(StoreError) as caught:
            inline_pg_store(url, connect_timeout=2)
        message = str(caught.value)
        assert expected in message
        assert "pw" not in message.replace("password authentication", "")


class ThreadedTests(TestCase):
    """The store on its real thread pool."""

    async def _store(self, url: str, **options: Any) -> PostgresStore:
        from twisted.internet import reactor

        store = PostgresStore(cast(IReactorThreads, reactor), url, **options)
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        return store

    async def test_writes_to_one_session_keep_call_order_across_threads(self) -> None:
        """100 un-awaited writes to a new session over a pool of 8 connections land in call order, and a
        write to a missing session fails alone."""
        store = await self._store(pytest_pg_url(), pool_size=8)
        session_id = new_id()
        first: Deferred[Any] = Deferred.fromCoroutine(store.create_session("1", "t", session_id))
        writes: list[Deferred[Any]] = [
            Deferred.fromCoroutine(store.add_message(Message(new_id("user"), session_id, "user", str(i))))
            for i in range(100)
        ]
        bad: Deferred[Any] = Deferred.fromCoroutine(store.add_message(Message(new_id("user"), "missing", "user", "x")))
        results: list[tuple[bool, Any]] = await DeferredList([first, *writes, bad], consumeErrors=True)
        assert all(ok for ok, _ in results[:-1])
        assert not results[-1][0]
        store.cache.clear()
        assert [m.content for m in await store.history(session_id)] == [str(i) for i in range(100)]

    async def test_deadlocked_transaction_is_run_again_whole(self) -> None:
        """Two transactions locking two rows in opposite orders deadlock; the one PostgreSQL aborts (40P01)
        is run again from the start and both commit."""
        store = await self._store(pytest_pg_url(), pool_size=2)
        a = await store.create_session("1", "a")
        b = await store.create_session("1", "b")
        runs = {"ab": 0, "ba": 0}
        both_locked = threading.Barrier(2, timeout=10)

        def crosswise(txn: Txn, first: str, second: str, name: str) -> None:
            runs[name] += 1
            txn.execute("UPDATE chat_sessions SET title = title || ? WHERE id = ?", (name, first))
            if runs[name] == 1:
                both_locked.wait()
            txn.execute("UPDATE chat_sessions SET title = title || ? WHERE id = ?", (name, second))

        started = time.monotonic()
        await DeferredList(
            [
                Deferred.fromCoroutine(store._write(crosswise, a.id, b.id, "ab")),
                Deferred.fromCoroutine(store._write(crosswise, b.id, a.id, "ba")),
            ],
            fireOnOneErrback=True,
        )
        assert sorted(runs.values()) == [1, 2]
        assert time.monotonic() - started < 10
        for session in await store.list_sessions("1", 10, 0):
            assert sorted([session.title[1:3], session.title[3:5]]) == ["ab", "ba"], session.title


    async def test_dropped_connections_are_replaced_and_the_transaction_re_run(self) -> None:
        """After the server ends every connection of the pool (as a restart or a failover does), the next
        write and read succeed: the failed attempt is re-run on a fresh connection."""
        url = pytest_pg_url()
        store = await self._store(url, pool_size=3)
        session = await store.create_session("1", "t")
        with psycopg.connect(url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert ended is not None and ended[0] == 3
        await store.add_message(Message(new_id("user"), session.id, "user", "after"))
        store.cache.clear()
        assert [m.content for m in await store.history(session.id)] == ["after"]


_session_cluster: list[Cluster] = []


def pytest_pg_url() -> str:
    """A new database on the session cluster, for the trial-style tests (which cannot take fixtures)."""
    return _session_cluster[0].create_database()


@pytest.fixture(autouse=True)
def _share_cluster(pg_cluster: Cluster) -> None:
    if not _session_cluster:
        _session_cluster.append(pg_cluster)


def test_password_from_pgpassword_or_pgpass(
    pg_cluster: Cluster, pg_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL without a password connects with the password from PGPASSWORD, or from a ~/.pgpass-style file."""
    from tests.pgcluster import PASSWORD

    dbname = pg_url.rsplit("/", 1)[1]
    url = pg_cluster.url(dbname, password=None)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    run(inline_pg_store(url).close())
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(StoreError, match="password"):
        inline_pg_store(url, connect_timeout=2)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_cluster.port}:{dbname}:postgres:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    run(inline_pg_store(url).close())
