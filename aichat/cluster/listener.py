"""One ``LISTEN`` connection per instance, on its own thread: notifications are handed to the reactor.

The thread blocks in psycopg's ``notifies()`` (never the reactor), reconnects after a lost connection
(``on_connected`` is called each time it listens again, so the caller can catch up on what it missed),
and stops within :data:`POLL_SECONDS` of :meth:`NotificationListener.stop`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from aichat.store.dsn import mask_password
from aichat.store.postgres import libpq_timeout, password_of, reason

log = Logger(namespace="aichat.cluster")

#: How long the thread waits for a notification before it checks whether it should stop.
POLL_SECONDS = 0.5
#: Pause before reconnecting after the connection was lost.
RECONNECT_SECONDS = 1.0


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
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aichat-listen", daemon=True)
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Ask the thread to stop; fires once it has."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return Deferred.fromCoroutine(_nothing())
        return deferToThread(thread.join, POLL_SECONDS * 4)

    def _run(self) -> None:
        lost = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=libpq_timeout(self._connect_timeout)
                ) as connection:
                    for channel in self._channels:
                        connection.execute(f"LISTEN {channel}")
                    if lost:
                        log.info("Listening for other instances' events again")
                    lost = False
                    self._reactor.callFromThread(self._on_connected)
                    while not self._stopping.is_set():
                        for notify in connection.notifies(timeout=POLL_SECONDS):
                            self._reactor.callFromThread(self._on_notify, notify.channel, notify.payload)
            except psycopg.Error as e:
                if not lost:
                    log.warn(
                        "Lost the notification connection to {database}: {error}; catching up by polling "
                        "until it is back",
                        database=mask_password(self._dsn),
                        error=reason(e, password_of(self._dsn)),
                    )
                lost = True
                self._stopping.wait(RECONNECT_SECONDS)


async def _nothing() -> None:
    return None
