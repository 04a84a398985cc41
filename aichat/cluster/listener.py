"""One ``LISTEN`` connection per instance, whose socket the reactor watches: notifications cost no thread hop.

Connecting blocks, so it runs on a thread; once the connection listens, the reactor watches its socket
and reads each notification as it arrives without blocking (psycopg's ``notifies(timeout=0)`` polls once),
so the turn ids reach the coordinator in the reactor's next iteration, not after a thread has won the
interpreter lock back. A lost connection is reported once, retried every :data:`RECONNECT_SECONDS`, and
``on_connected`` is called each time it listens again, so the caller can catch up on what it missed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aichat.store.dsn import mask_password
from aichat.store.postgres import libpq_timeout, password_of, reason

log = Logger(namespace="aichat.cluster")

#: Pause before reconnecting after the connection was lost or could not be made.
RECONNECT_SECONDS = 1.0


@implementer(IReadDescriptor)
class _Socket:
    """The listening connection's socket as the reactor sees it, through a descriptor of its own: libpq
    closes its descriptor when the connection fails, and the reactor must still be able to let go of it."""

    def __init__(self, connection: psycopg.Connection[Any], readable: Callable[[], None]) -> None:
        self._fileno = os.dup(connection.fileno())
        self._readable = readable

    def close(self) -> None:
        os.close(self._fileno)

    def fileno(self) -> int:
        return self._fileno

    def doRead(self) -> None:
        self._readable()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor stopped watching (it is shutting down); the listener closes the connection itself."""

    def logPrefix(self) -> str:
        return "aichat-listen"


class NotificationListener:
    """Listens on ``channels`` of the database at ``dsn``; ``on_notify(channel, payload)`` runs on the reactor."""

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_connected: Callable[[], None],
        connect_timeout: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._channels = tuple(channels)
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._connect_timeout = connect_timeout
        self._connection: psycopg.Connection[Any] | None = None
        self._socket: _Socket | None = None
        self._connecting: Deferred[None] | None = None
        self._retry: IDelayedCall | None = None
        self._stopped = True
        #: The connection was lost (or never made) and that was said; said again once it is back.
        self._lost = False

    @property
    def listening(self) -> bool:
        """Whether the reactor is watching a listening connection now."""
        return self._socket is not None

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def stop(self) -> Deferred[None]:
        """Stop watching, cancel a pending retry, and close the connection; fires once it is closed (a
        connection being made meanwhile is closed when it is ready)."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        connecting, self._connecting = self._connecting, None
        closing = self._forget()
        if connecting is not None:
            return connecting
        return closing

    def _open(self) -> psycopg.Connection[Any]:
        """On a thread: connect and listen."""
        connection = psycopg.connect(self._dsn, autocommit=True, connect_timeout=libpq_timeout(self._connect_timeout))
        try:
            for channel in self._channels:
                connection.execute(f"LISTEN {channel}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect(self) -> None:
        self._retry = None
        connecting = Deferred.fromCoroutine(self._listen())
        if not connecting.called:
            self._connecting = connecting

    async def _listen(self) -> None:
        try:
            connection = await deferToThread(self._open)
        except CancelledError:
            raise
        except Exception as e:
            self._connecting = None
            if not isinstance(e, psycopg.Error):
                log.failure("The notification connection failed")
            self._lost_with(e)
            return
        self._connecting = None
        if self._stopped:
            await deferToThread(connection.close)
            return
        self._connection = connection
        self._socket = _Socket(connection, self._readable)
        self._reactor.addReader(self._socket)
        if self._lost:
            log.info("Listening for other instances' events again")
        self._lost = False
        self._on_connected()

    def _readable(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            notifications = list(connection.notifies(timeout=0))
            if connection.closed or connection.broken:
                raise psycopg.OperationalError("the server closed the connection")
        except psycopg.Error as e:
            self._forget()
            self._lost_with(e)
            return
        for notify in notifications:
            self._on_notify(notify.channel, notify.payload)

    def _lost_with(self, error: BaseException) -> None:
        if not self._lost:
            log.warn(
                "Lost the notification connection to {database}: {error}; catching up by polling until it is back",
                database=mask_password(self._dsn),
                error=reason(error, password_of(self._dsn)),
            )
        self._lost = True
        if not self._stopped:
            self._retry = self._reactor.callLater(RECONNECT_SECONDS, self._connect)

    def _forget(self) -> Deferred[None]:
        """Stop watching the connection and close it (on a thread: closing says goodbye on the socket)."""
        socket, self._socket = self._socket, None
        connection, self._connection = self._connection, None
        if socket is not None:
            self._reactor.removeReader(socket)
            socket.close()
        if connection is None:
            return succeed(None)
        return deferToThread(connection.close)
