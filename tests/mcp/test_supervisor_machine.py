"""The supervisor's state machine on a Clock: late callbacks change nothing, impossible events are refused."""

from __future__ import annotations

import contextlib

from automat import NoTransition
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp.config import ServerConfig
from aichat.mcp.supervisor import ServerSupervisor, State
from tests.mcp.fakes import NO_ANSWER, FakeConnection
from tests.mcp.test_supervisor import make


class LateCallbackTests(SynchronousTestCase):
    """Events of a connection or bring-up that a stop or restart overtook."""

    def test_a_loss_after_stop_is_ignored(self) -> None:
        """The stopped server's connection crashing afterwards schedules no retry and counts no restart."""
        clock, connector, supervisor, states = make()
        supervisor.start()
        connection = connector.last
        self.successResultOf(supervisor.stop())
        connection.crash()
        self.assertEqual(supervisor.state, State.STOPPED)
        self.assertEqual(states[-1], State.STOPPED)
        self.assertEqual(supervisor.restarts, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_loss_of_the_old_connection_after_restart_is_ignored(self) -> None:
        """After a restart the first connection's late crash leaves the new one ready and open."""
        _clock, connector, supervisor, _ = make()
        supervisor.start()
        first = connector.last
        self.successResultOf(Deferred.fromCoroutine(supervisor.restart()))
        second = connector.last
        first.crash()
        self.assertEqual(supervisor.state, State.READY)
        self.assertFalse(second.closed)
        self.assertEqual(supervisor.restarts, 0)

    def test_a_connection_that_arrives_after_stop_is_closed(self) -> None:
        """A connector that finishes despite the cancellation hands over a connection that is closed at once."""
        clock = Clock()
        gate: Deferred[None] = Deferred()
        made: list[FakeConnection] = []

        async def stubborn(config: ServerConfig) -> FakeConnection:
            # Deliberately misbehaving: a connector that finishes its work although it was cancelled.
            with contextlib.suppress(CancelledError):
                await gate
            connection = FakeConnection(clock)
            made.append(connection)
            return connection

        states: list[State] = []
        supervisor = ServerSupervisor(clock, ServerConfig("late", command="x"), stubborn,
                                      on_change=lambda s: states.append(s.state))
        supervisor.start()
        self.successResultOf(supervisor.stop())
        [connection] = made
        self.assertTrue(connection.closed)
        self.assertEqual(connection.sent, [])
        self.assertEqual(supervisor.state, State.STOPPED)
        self.assertEqual(states, [State.STARTING, State.STOPPING, State.STOPPED])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_the_init_timer_of_a_stopped_bring_up_is_cancelled(self) -> None:
        """A bring-up abandoned by stop leaves no init_timeout timer to fire later."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(initialize=lambda p: NO_ANSWER)
        supervisor.start()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.successResultOf(supervisor.stop())
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        self.assertEqual(supervisor.state, State.STOPPED)
        self.assertEqual(len(connector.connections), 1)


class StoppingTests(SynchronousTestCase):
    """stop() waits for what it closes; a start asked meanwhile is ignored."""

    def test_stop_waits_for_a_slow_close(self) -> None:
        """While the connection closes the server is stopping; start() then does nothing."""
        _clock, connector, supervisor, states = make()
        closed: Deferred[None] = Deferred()

        def slow_close(connection: FakeConnection) -> None:
            connection.close = lambda: closed  # type: ignore[method-assign]

        connector.prepare = slow_close
        supervisor.start()
        stopping = supervisor.stop()
        self.assertNoResult(stopping)
        self.assertEqual(supervisor.state, State.STOPPING)
        supervisor.start()
        self.assertEqual(supervisor.state, State.STOPPING)
        self.assertEqual(len(connector.connections), 1)
        again = supervisor.stop()
        closed.callback(None)
        self.successResultOf(stopping)
        self.successResultOf(again)
        self.assertEqual(states[-2:], [State.STOPPING, State.STOPPED])

    def test_a_crash_during_the_handshake_fails_the_start(self) -> None:
        """Lost while starting: the bring-up fails with the reason and is retried, counted once."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(initialize=lambda p: NO_ANSWER)
        supervisor.start()
        connector.last.crash("server process exited with status 1")
        self.assertEqual(supervisor.state, State.BACKING_OFF)
        self.assertIn("exited with status 1", str(supervisor.last_error))
        self.assertEqual(supervisor.restarts, 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)


class IllegalTransitionTests(SynchronousTestCase):
    """Inputs that cannot happen in a state raise instead of being folded into a flag check."""

    def test_a_retry_while_ready(self) -> None:
        """The retry timer exists only while backing off; firing it when ready is a bug."""
        _clock, _connector, supervisor, _ = make()
        supervisor.start()
        self.assertRaises(NoTransition, supervisor._retry_due)
        self.assertEqual(supervisor.state, State.READY)

    def test_a_handshake_end_while_backing_off(self) -> None:
        """Only a bring-up under way can end; none runs while backing off."""
        _clock, connector, supervisor, _ = make()
        connector.error = OSError(2, "No such file or directory")
        supervisor.start()
        self.assertRaises(NoTransition, supervisor._handshake_done, [])
        self.assertEqual(supervisor.state, State.BACKING_OFF)
