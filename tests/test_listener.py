"""The LISTEN connection on the real reactor against the test cluster: notifications arrive on the reactor
thread as they are sent, a connection the server drops is made again (and the caller told, to catch up),
and stopping leaves no socket watched and no timer behind."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from aichat.cluster import listener as listener_module
from aichat.cluster.listener import NotificationListener

CHANNEL = "aichat_listener_test"


class ListenerTests(TestCase):
    """One listener per test on the shared test cluster."""

    timeout = 30

    @pytest.fixture(autouse=True)
    def database(self, pg_url: str) -> None:
        self.url = pg_url

    def setUp(self) -> None:
        self.received: list[tuple[str, str, bool]] = []
        self.connected = 0
        self.patch(listener_module, "RECONNECT_SECONDS", 0.1)

    def listener(self, url: str | None = None) -> NotificationListener:
        def on_notify(channel: str, payload: str) -> None:
            self.received.append((channel, payload, threading.current_thread() is threading.main_thread()))

        def on_connected() -> None:
            self.connected += 1

        listening = NotificationListener(reactor, url or self.url, [CHANNEL], on_notify, on_connected, 2.0)
        listening.start()
        self.addCleanup(listening.stop)
        return listening

    async def until(self, condition: Any, what: str, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.01, lambda: None)

    def send(self, *payloads: str) -> Any:
        def notify() -> None:
            with psycopg.connect(self.url, autocommit=True) as connection:
                for payload in payloads:
                    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

        return deferToThread(notify)

    async def test_notifications_arrive_on_the_reactor_in_order(self) -> None:
        """Each notification is handed over on the reactor thread, in the order sent, soon after."""
        listening = self.listener()
        await self.until(lambda: listening.listening, "the listener to listen")
        self.assertEqual(self.connected, 1)
        await self.send("turn-1 turn-2", "turn-3")
        await self.until(lambda: len(self.received) == 2, "two notifications")
        self.assertEqual(self.received, [(CHANNEL, "turn-1 turn-2", True), (CHANNEL, "turn-3", True)])

    async def test_a_dropped_connection_is_made_again(self) -> None:
        """The server ends the listening session: the listener connects again, says so, and hears again."""
        listening = self.listener()
        await self.until(lambda: listening.listening, "the listener to listen")

        def terminate() -> None:
            with psycopg.connect(self.url, autocommit=True) as connection:
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE %s AND pid <> "
                    "pg_backend_pid()",
                    (f"LISTEN {CHANNEL}%",),
                )

        await deferToThread(terminate)
        await self.until(lambda: self.connected == 2, "a second connection")
        await self.send("after")
        await self.until(lambda: self.received, "a notification after reconnecting")
        self.assertEqual(self.received, [(CHANNEL, "after", True)])

    async def test_stop_leaves_nothing_watched_or_pending(self) -> None:
        """Stopped while listening, or while retrying an unreachable server: no reader, no timer."""
        listening = self.listener()
        await self.until(lambda: listening.listening, "the listener to listen")
        readers = set(reactor.getReaders())
        await listening.stop()
        self.assertFalse(listening.listening)
        self.assertEqual(len(readers - set(reactor.getReaders())), 1)

        unreachable = self.listener("postgresql://nobody@127.0.0.1:1/none")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(unreachable.listening)
        await unreachable.stop()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(unreachable.listening)
        self.assertEqual(self.connected, 1)
