"""The PostgreSQL store: psycopg 3's synchronous connections in a ``psycopg_pool`` on a Twisted thread pool.

The queries are :class:`~aichat.store.sql.SQLStore`'s. Each transaction is a function run whole on a pool
thread (never the reactor thread) and run again, a bounded number of times, after a serialization
failure, a deadlock or a dropped connection. Writes to one session take effect in call order (each waits
for the previous write to that session); writes to different sessions run side by side on the pool.

When no connection can be had within ``connect_timeout`` the call fails with
:class:`~aichat.store.base.StoreUnavailable` (the API answers 503); the pool keeps reconnecting in the
background, so the store recovers by itself when the database is back.

:meth:`PostgresStore.open` adopts a database made by the Go service (golang-migrate's
``schema_migrations``, versions 1 and 2) or creates the same schema, then applies this service's own
migrations (recorded in ``aichat_schema_migrations``), all in one transaction holding an advisory lock so
that instances starting together do not race.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from aichat.store.base import StoreError, StoreFull, StoreUnavailable
from aichat.store.dsn import mask_password
from aichat.store.engines import PostgresEngine, Txn
from aichat.store.schema import migrations, statements
from aichat.store.sql import CACHE_BYTES, SQLStore

#: ``pg_advisory_xact_lock`` key held while migrating ("aichat" in ASCII).
MIGRATION_LOCK = 0x616963686174
#: golang-migrate versions of the Go service's schema that this code adopts.
GO_VERSIONS = (1, 2)
#: Attempts per transaction (the first run and the re-runs after transient failures).
MAX_ATTEMPTS = 4

RunInThread = Callable[..., Deferred[Any]]


class _PoolLog(logging.Handler):
    """psycopg_pool's ``logging`` records (reconnection attempts, discarded connections) as Twisted log events."""

    log = Logger(namespace="aichat.store.postgres.pool")

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        if record.levelno >= logging.WARNING:
            self.log.warn("{message}", message=message)
        else:
            self.log.debug("{message}", message=message)


def _route_pool_log() -> None:
    pool_logger = logging.getLogger("psycopg.pool")
    if not any(isinstance(handler, _PoolLog) for handler in pool_logger.handlers):
        pool_logger.addHandler(_PoolLog())
        pool_logger.propagate = False


def reason(error: BaseException, secret: str | None = None) -> str:
    """The database's own message for ``error`` on one line, with ``secret`` (a password) removed."""
    text = re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__
    if secret:
        text = text.replace(secret, "***")
    return text


def password_of(dsn: str) -> str | None:
    """The password written in ``dsn``, to keep it out of messages (``None`` if there is none)."""
    try:
        return str(conninfo_to_dict(dsn).get("password") or "") or None
    except psycopg.Error:
        return None


def libpq_timeout(seconds: float) -> int:
    """libpq's ``connect_timeout``: whole seconds, and anything under 2 counts as 2."""
    return max(2, math.ceil(seconds))


def connect(dsn: str, connect_timeout: float) -> psycopg.Connection[Any]:
    """One connection to ``dsn`` (not autocommit); :class:`StoreError` with libpq's reason, never the password."""
    try:
        return psycopg.connect(dsn, connect_timeout=libpq_timeout(connect_timeout))
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to database {mask_password(dsn)}: {reason(e, password_of(dsn))}") from None


class PostgresStore(SQLStore):
    """:class:`~aichat.store.base.Store` on a PostgreSQL database named by a libpq URL."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorThreads,
        dsn: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        cache_bytes: int = CACHE_BYTES,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        super().__init__(PostgresEngine(), cache_bytes)
        self._reactor = reactor
        self.dsn = dsn
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._password = password_of(dsn)
        self._run_in_thread = run_in_thread
        self._threads: ThreadPool | None = None
        self._pool: ConnectionPool[Any] | None = None
        self._tails: dict[str, Deferred[None]] = {}

    @property
    def shown(self) -> str:
        """The URL with its password masked, for messages."""
        return mask_password(self.dsn)

    # -- threads --------------------------------------------------------------------------------------

    def _run(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._run_in_thread is not None:
            return self._run_in_thread(work, *args)
        if self._threads is None:
            return maybeDeferred(_not_open)
        return deferToThreadPool(self._reactor, self._threads, work, *args)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (failing with the database's own reason), migrate under the lock, open the pool."""
        _route_pool_log()
        if self._run_in_thread is None and self._threads is None:
            self._threads = ThreadPool(minthreads=0, maxthreads=self.pool_size, name="aichat-postgres")
            self._threads.start()
        try:
            applied = await self._run(self._connect_and_migrate)
            await self._run(self._open_pool)
        except BaseException:
            await self.close()
            raise
        for name in applied:
            self.log.info("Applied database migration {version}", version=name, database=self.shown)

    def _connect_and_migrate(self) -> list[str]:
        connection = connect(self.dsn, self.connect_timeout)
        try:
            with connection.transaction():
                return migrate(connection)
        except psycopg.Error as e:
            raise StoreError(f"cannot migrate database {self.shown}: {reason(e, self._password)}") from None
        finally:
            connection.close()

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        milliseconds = int(self.statement_timeout * 1000)
        connection.execute(f"SET statement_timeout = {milliseconds}")

    def _open_pool(self) -> None:
        pool: ConnectionPool[Any] = ConnectionPool(
            self.dsn,
            min_size=self.pool_size,
            max_size=self.pool_size,
            # Reads run statement by statement (no BEGIN/COMMIT round trips); writes open a transaction.
            kwargs={"connect_timeout": libpq_timeout(self.connect_timeout), "autocommit": True},
            configure=self._configure,
            timeout=self.connect_timeout,
            reconnect_timeout=24 * 3600.0,
            name="aichat",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=max(self.connect_timeout, 1.0) * 2)
        except PoolTimeout:
            pool.close()
            raise StoreError(f"cannot open a connection pool to database {self.shown}") from None
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        threads, self._threads = self._threads, None
        if pool is not None:
            if threads is not None:
                await deferToThreadPool(self._reactor, threads, pool.close)
            else:
                pool.close()
        if threads is not None:
            threads.stop()
        self.cache.clear()

    async def ping(self) -> bool:
        def select(txn: Txn) -> bool:
            txn.execute("SELECT 1")
            return bool(txn.fetchone() == (1,))

        try:
            return bool(await self._read(select))
        except StoreError:
            return False

    # -- transactions ---------------------------------------------------------------------------------

    def _transaction(self, work: Callable[..., Any], args: tuple[Any, ...], write: bool = True) -> Any:
        """Run ``work(txn, *args)`` on a pooled connection (on a pool thread): in one transaction if ``write``,
        else statement by statement (a read sees each statement's latest commits)."""
        pool = self._pool
        if pool is None:
            _not_open()
        assert pool is not None
        engine = self.engine
        deadline = time.monotonic() + self.connect_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                with pool.connection(timeout=max(deadline - time.monotonic(), 0.05)) as connection:
                    if not write:
                        return work(Txn(connection.cursor(), engine), *args)
                    with connection.transaction():
                        return work(Txn(connection.cursor(), engine), *args)
            except PoolTimeout:
                raise StoreUnavailable(
                    f"database unavailable: no connection within {self.connect_timeout:g} s"
                ) from None
            except psycopg.Error as e:
                if attempt < MAX_ATTEMPTS and engine.is_retryable(e):
                    if engine.is_unavailable(e):
                        pool.check()  # drop the other connections that died with this one
                    time.sleep(0.01 * attempt)
                    continue
                if engine.is_unavailable(e):
                    raise StoreUnavailable(f"database unavailable: {reason(e, self._password)}") from None
                if engine.is_full(e):
                    raise StoreFull(reason(e, self._password)) from None
                raise StoreError(reason(e, self._password)) from None
            except UnicodeEncodeError as e:
                raise StoreError(f"text that cannot be stored: {e.reason}") from None

    async def _run_read(self, work: Callable[..., Any], *args: Any) -> Any:
        return await self._run(self._transaction, work, args, False)

    async def transact(self, work: Callable[..., Any], *args: Any, write: bool = True) -> Any:
        """Run ``work(txn, *args)`` on the pool, in one transaction if ``write`` (for the turn log)."""
        return await self._run(self._transaction, work, args, write)

    async def _run_write(
        self,
        work: Callable[..., Any],
        *args: Any,
        session_id: str | None = None,
        effect: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run ``work(txn, *args)`` once the previous write to ``session_id`` has finished; return once committed.

        The history cache is updated in commit order, even if the caller stops waiting.
        """
        done: Deferred[Any] = Deferred()
        turn: Deferred[None] = Deferred()
        previous: Deferred[None] | None = None
        if session_id is not None:
            self.cache.begin_write(session_id)
            previous = self._tails.get(session_id)
            self._tails[session_id] = turn

        def finished(result: Any) -> None:
            ok = not isinstance(result, Failure)
            if ok:
                self._wrote()
            elif isinstance(result.value, StoreError):
                result = Failure(self._classified(result.value, str(result.value)))
            self._settle_cache(session_id, effect, ok, result if ok else None)
            if session_id is not None and self._tails.get(session_id) is turn:
                del self._tails[session_id]
            turn.callback(None)
            if ok:
                done.callback(result)
            else:
                done.errback(result)

        def start(_: object = None) -> None:
            self._run(self._transaction, work, args).addBoth(finished)

        if previous is None:
            start()
        else:
            previous.addCallback(start)
        return await done


def check_database(dsn: str, connect_timeout: float) -> str | None:
    """Why the daemon could not start on ``dsn`` (no connection, or a schema it would refuse), or ``None``.

    Used by ``-validate``: it connects and reads the schema's state, and changes nothing.
    """
    try:
        connection = connect(dsn, connect_timeout)
    except StoreError as e:
        return str(e)
    try:
        cursor = connection.cursor()
        _golang_migrate_version(cursor)
        cursor.execute("SELECT to_regclass('aichat_schema_migrations') IS NOT NULL")
        row = cursor.fetchone()
        if row and row[0]:
            cursor.execute("SELECT max(version) FROM aichat_schema_migrations")
            found = cursor.fetchone()
            newest = max(version for version, _, _ in migrations("postgres"))
            if found and found[0] is not None and found[0] > newest:
                return f"the database schema is at version {found[0]}, newer than this aichat-backend knows ({newest})"
        return None
    except StoreError as e:
        return str(e)
    except psycopg.Error as e:
        return f"cannot read database {mask_password(dsn)}: {reason(e, password_of(dsn))}"
    finally:
        connection.rollback()
        connection.close()


def _not_open() -> None:
    raise StoreError("the store is not open")


def migrate(connection: psycopg.Connection[Any]) -> list[str]:
    """Adopt or create the Go service's schema and apply our migrations, inside the caller's transaction.

    Returns the names of the migrations applied. Raises :class:`StoreError` for a database this code must
    not touch: a dirty or unknown golang-migrate state, or our own schema newer than this code.
    """
    cursor = connection.cursor()
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    go_version = _golang_migrate_version(cursor)
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS aichat_schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    cursor.execute("SELECT version FROM aichat_schema_migrations")
    done = {row[0] for row in cursor.fetchall()}
    known = migrations("postgres")
    newest = max(version for version, _, _ in known)
    if done and max(done) > newest:
        raise StoreError(
            f"the database schema is at version {max(done)}, newer than this aichat-backend knows ({newest}): "
            "run the newer aichat-backend, or restore a backup taken before the upgrade"
        )
    applied = []
    for version, name, sql in known:
        if version in done:
            continue
        for statement in statements(sql):
            cursor.execute(statement.encode("utf-8"))
        cursor.execute("INSERT INTO aichat_schema_migrations (version, name) VALUES (%s, %s)", (version, name))
        applied.append(name)
    # Keep golang-migrate's record true to the schema (version 2), so the Go service could still run on it.
    if go_version is None:
        cursor.execute("CREATE TABLE schema_migrations (version BIGINT NOT NULL PRIMARY KEY, dirty BOOLEAN NOT NULL)")
        cursor.execute("INSERT INTO schema_migrations (version, dirty) VALUES (2, false)")
    elif go_version < 2:
        cursor.execute("DELETE FROM schema_migrations")
        cursor.execute("INSERT INTO schema_migrations (version, dirty) VALUES (2, false)")
    return applied


def _golang_migrate_version(cursor: psycopg.Cursor[Any]) -> int | None:
    """The Go service's golang-migrate version (``None`` without its table); refuse a state we cannot adopt."""
    cursor.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = cursor.fetchone()
    if not row or not row[0]:
        return None
    cursor.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
    )
    columns = {r[0] for r in cursor.fetchall()}
    if not {"version", "dirty"} <= columns:
        raise StoreError(
            "the database has a schema_migrations table that is not golang-migrate's (columns "
            f"{', '.join(sorted(columns))}): use a database of the Go service's or an empty one"
        )
    cursor.execute("SELECT version, dirty FROM schema_migrations")
    rows = cursor.fetchall()
    if not rows:
        return 0
    version, dirty = rows[0]
    if dirty:
        raise StoreError(
            f"the Go service's golang-migrate state is dirty at version {version} (a migration failed halfway): "
            f"repair the schema by hand to match version {version}, mark it clean "
            f"(`migrate ... force {version}` or UPDATE schema_migrations SET dirty = false), then start again"
        )
    if version not in GO_VERSIONS:
        raise StoreError(
            f"the database is at golang-migrate version {version}, which this aichat-backend cannot adopt "
            f"(it knows versions {' and '.join(map(str, GO_VERSIONS))} of the Go service's schema): migrate it "
            "to version 2 with the Go service's migrations (`migrate ... goto 2`) or restore a backup"
        )
    return int(version)
