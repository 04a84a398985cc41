"""``aichat-backend db copy --from SRC --to DST``: move every session, message, attachment and approval,
and the tool executions of requests without a session, between databases (SQLite and PostgreSQL, either way).

Both databases are first brought to the current schema, as the daemon would do at start. Sessions are
copied whole, one transaction per batch of sessions, with the target keeping the source's order, ids and
timestamps; rows whose id the target already has are skipped, so an interrupted copy can be run again
(with ``--force``, since the target is then no longer empty). At the end the row counts are compared.
This is a command-line tool: it uses the drivers directly, without the reactor.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from aichat.store.base import Message, StoreError
from aichat.store.dsn import DSNError, mask_password, parse_dsn
from aichat.store.engines import Engine, PostgresEngine, SQLiteEngine, Txn
from aichat.store.sql import (
    APPROVAL_COLUMNS,
    EXECUTION_COLUMNS,
    INSERT_APPROVAL,
    INSERT_ATTACHMENT,
    INSERT_EXECUTION,
    INSERT_MESSAGE,
    INSERT_SESSION,
    SESSION_COLUMNS,
    approval_from_row,
    approval_params,
    attachment_params,
    execution_from_row,
    execution_params,
    message_params,
    select_messages,
    session_from_row,
    session_params,
)

TABLES = ("chat_sessions", "chat_messages", "chat_attachments", "tool_approvals", "tool_executions")
SKIP_EXISTING = " ON CONFLICT DO NOTHING"
#: Messages per target transaction (whole sessions only, so a session is never half copied).
BATCH_MESSAGES = 2000


class CopyError(Exception):
    """The copy cannot start or did not verify; the message says why (never a password)."""


@dataclass
class Database:
    """An open database for the copy: its engine and a DB-API connection in manual-commit mode."""

    shown: str
    engine: Engine
    connection: Any
    close: Callable[[], None]

    def txn(self) -> Txn:
        return Txn(self.connection.cursor(), self.engine)

    def commit(self) -> None:
        self.connection.commit()

    def counts(self) -> dict[str, int]:
        txn = self.txn()
        found = {}
        for table in TABLES:
            txn.execute(f"SELECT count(*) FROM {table}")
            found[table] = int(txn.fetchone()[0])
        self.commit()
        return found


def _open_sqlite(path: str) -> Database:
    from aichat.store.sqlite import SQLiteStore

    try:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA busy_timeout = 5000")
        SQLiteStore._migrate(connection.cursor())
    except (sqlite3.Error, StoreError) as e:
        raise CopyError(f"cannot open {path}: {e}") from None
    # Python's sqlite3 in autocommit mode: open an explicit transaction for each batch.
    connection.isolation_level = "DEFERRED"
    return Database(path, SQLiteEngine(), connection, connection.close)


def _open_postgres(dsn: str, connect_timeout: float) -> Database:
    import psycopg

    from aichat.store.postgres import connect, migrate, password_of, reason

    try:
        connection = connect(dsn, connect_timeout)
    except StoreError as e:
        raise CopyError(str(e)) from None
    try:
        with connection.transaction():
            migrate(connection)
    except (StoreError, psycopg.Error) as e:
        connection.close()
        text = str(e) if isinstance(e, StoreError) else reason(e, password_of(dsn))
        raise CopyError(f"cannot migrate {mask_password(dsn)}: {text}") from None
    return Database(mask_password(dsn), PostgresEngine(), connection, connection.close)


def open_database(dsn: str, connect_timeout: float = 5.0) -> Database:
    """Open (creating or migrating as the daemon would) the database ``dsn`` names."""
    try:
        url = parse_dsn(dsn)
    except DSNError as e:
        raise CopyError(f"{mask_password(dsn)}: {e}") from None
    if url.engine == "sqlite":
        return _open_sqlite(url.path)
    return _open_postgres(url.conninfo, connect_timeout)


@dataclass
class Progress:
    """Copied counts, printed at most once a second while copying and once at the end."""

    out: TextIO
    total_sessions: int
    total_messages: int
    sessions: int = 0
    messages: int = 0
    attachments: int = 0
    approvals: int = 0
    _last: float = field(default_factory=time.monotonic)

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= 1.0:
            self._last = now
            print(
                f"  {self.sessions}/{self.total_sessions} sessions, {self.messages}/{self.total_messages} messages",
                file=self.out,
                flush=True,
            )


def _session_ids(source: Database) -> Iterator[str]:
    txn = source.txn()
    txn.execute(f"SELECT id FROM chat_sessions ORDER BY created_at, {source.engine.session_tiebreak}")
    ids = [row[0] for row in txn.fetchall()]
    source.commit()
    yield from ids


def _copy_session(source: Database, target: Txn, session_id: str, progress: Progress) -> None:
    engine = source.engine
    txn = source.txn()
    txn.execute(f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = ?", (session_id,))
    session = session_from_row(engine, txn.fetchone())
    messages: list[Message] = select_messages(engine, txn, session_id)
    txn.execute(
        f"SELECT {APPROVAL_COLUMNS} FROM tool_approvals WHERE session_id = ? ORDER BY created_at", (session_id,)
    )
    approvals = [approval_from_row(engine, row) for row in txn.fetchall()]
    source.commit()
    target.execute(INSERT_SESSION + SKIP_EXISTING, session_params(session))
    for message in messages:
        target.execute(INSERT_MESSAGE + SKIP_EXISTING, message_params(message))
        for attachment in message.attachments:
            target.execute(INSERT_ATTACHMENT + SKIP_EXISTING, attachment_params(message, attachment))
            progress.attachments += 1
    for approval in approvals:
        target.execute(INSERT_APPROVAL + SKIP_EXISTING, approval_params(approval))
    progress.sessions += 1
    progress.messages += len(messages)
    progress.approvals += len(approvals)


def _copy_executions(source: Database, target: Database) -> None:
    """The tool executions of requests without a session, a batch per target transaction."""
    txn = source.txn()
    txn.execute(f"SELECT {EXECUTION_COLUMNS} FROM tool_executions ORDER BY created_at, id")
    rows = [execution_from_row(source.engine, row) for row in txn.fetchall()]
    source.commit()
    into = target.txn()
    for start in range(0, len(rows), BATCH_MESSAGES):
        for execution in rows[start:start + BATCH_MESSAGES]:
            into.execute(INSERT_EXECUTION + SKIP_EXISTING, execution_params(execution))
        target.commit()


def copy(source_dsn: str, target_dsn: str, *, force: bool = False, out: TextIO = sys.stderr) -> dict[str, int]:
    """Copy everything from ``source_dsn`` to ``target_dsn``; return the verified counts per table."""
    if source_dsn == target_dsn:
        raise CopyError("--from and --to name the same database")
    with _opened(source_dsn) as source, _opened(target_dsn) as target:
        source_counts = source.counts()
        before = target.counts()
        if before["chat_sessions"] and not force:
            raise CopyError(
                f"{target.shown} already holds {before['chat_sessions']} session(s): use --force to copy into it "
                "anyway (rows it already has, by id, are kept and skipped)"
            )
        print(f"copying {source.shown} -> {target.shown}", file=out, flush=True)
        progress = Progress(out, source_counts["chat_sessions"], source_counts["chat_messages"])
        batch = 0
        txn = target.txn()
        try:
            for session_id in _session_ids(source):
                _copy_session(source, txn, session_id, progress)
                if progress.messages - batch >= BATCH_MESSAGES:
                    target.commit()
                    batch = progress.messages
                    progress.tick()
            target.commit()
            _copy_executions(source, target)
        except Exception as e:
            target.connection.rollback()
            raise CopyError(f"copy failed (nothing of the current batch was kept; run again with --force): {e}") from e
        progress.tick(force=True)
        after = target.counts()
        _verify(source_counts, before, after)
        return after


def _verify(source: dict[str, int], before: dict[str, int], after: dict[str, int]) -> None:
    """An empty target must now hold exactly the source's rows; one that had rows, at least as many."""
    started_empty = not any(before.values())
    wrong = []
    for table in TABLES:
        if after[table] < source[table] or (started_empty and after[table] != source[table]):
            wrong.append(f"{table}: source {source[table]}, target {after[table]}")
    if wrong:
        raise CopyError("counts do not match after the copy: " + "; ".join(wrong))


@contextmanager
def _opened(dsn: str) -> Iterator[Database]:
    database = open_database(dsn)
    try:
        yield database
    finally:
        database.close()


USAGE = """Usage: aichat-backend db copy --from SRC --to DST [--force]

Copy every session, message, attachment and tool approval (and the tool executions of chat completions)
from SRC to DST. Each is a database URL:
postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME[?OPTIONS] (the password may come from $PGPASSWORD or
~/.pgpass), postgresql://..., or sqlite:PATH. Both are brought to the current schema first. The target
must be empty unless --force is given; rows the target already has (by id) are skipped, so an
interrupted copy can be run again with --force. Counts are verified at the end. Stop the daemon first.
"""


def main(argv: Sequence[str]) -> int:
    """``aichat-backend db ARGS``: exit 0 on success, 1 on failure, 2 on a usage error."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help", "-help", "help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] != "copy":
        print(f"aichat-backend db: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    options: dict[str, str] = {}
    force = False
    rest = args[1:]
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.lstrip("-").partition("=")
        if name == "force" and not eq:
            force = True
        elif name in ("from", "to"):
            if not eq:
                if not rest:
                    print(f"aichat-backend db copy: --{name} needs a database URL", file=sys.stderr)
                    return 2
                value = rest.pop(0)
            options[name] = value
        elif name in ("h", "help"):
            print(USAGE)
            return 0
        else:
            print(f"aichat-backend db copy: unknown option {arg!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    if "from" not in options or "to" not in options:
        print(f"aichat-backend db copy: --from and --to are required\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        counts = copy(options["from"], options["to"], force=force)
    except CopyError as e:
        print(f"aichat-backend db copy: {e}", file=sys.stderr)
        return 1
    print(
        f"copied and verified: {counts['chat_sessions']} sessions, {counts['chat_messages']} messages, "
        f"{counts['chat_attachments']} attachments, {counts['tool_approvals']} approvals, "
        f"{counts['tool_executions']} tool executions in "
        f"{mask_password(options['to'])}"
    )
    return 0
