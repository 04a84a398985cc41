"""The stdio connection's state machine on a Clock and a fake process: each event counts once, in order."""

from __future__ import annotations

from automat import NoTransition
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import PeerGone
from aichat.mcp.stdio import StdioConnection
from tests.mcp.fakes import FakeProcessReactor
from tests.mcp.test_stdio_protocol import Started

KILLED = Failure(ProcessTerminated(signal=9))


class LifecycleTests(SynchronousTestCase):
    """Crash, protocol violation and stop, in the orders they can happen."""

    def test_close_before_start(self) -> None:
        """A connection never started is closed at once and spawns nothing."""
        reactor = FakeProcessReactor()
        conn = StdioConnection(reactor, reactor, ServerConfig("srv", command="sh"))
        self.successResultOf(conn.close())
        self.assertEqual(reactor.spawned, [])
        self.assertIn("not running", str(self.failureResultOf(conn.peer.request("ping"), PeerGone).value))

    def test_crash_is_reported_once(self) -> None:
        """A crash reports the loss once and fails pending calls; later events report nothing more."""
        started = Started()
        pending = started.conn.peer.request("tools/list")
        started.protocol.processExited(KILLED)
        self.assertEqual(started.lost, ["server process killed by signal 9"])
        self.assertIn("killed by signal 9", str(self.failureResultOf(pending, PeerGone).value))
        self.assertIsNone(started.conn.stdout_sink)
        closing = started.conn.close()
        self.assertNoResult(closing)
        started.protocol.processEnded(KILLED)
        self.successResultOf(closing)
        self.assertEqual(started.lost, ["server process killed by signal 9"])
        self.assertEqual(started.reactor.getDelayedCalls(), [])

    def test_exit_while_stopping_is_not_a_crash(self) -> None:
        """After close() the child's exit is expected: no loss reported, pending calls fail as stopping."""
        started = Started()
        pending = started.conn.peer.request("tools/list")
        closing = started.conn.close()
        self.assertIn("is stopping", str(self.failureResultOf(pending, PeerGone).value))
        started.protocol.processExited(Failure(ProcessDone(0)))
        started.protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(closing)
        self.assertEqual(started.lost, [])

    def test_violation_then_close_then_exit(self) -> None:
        """broken -> stopping: the ladder is not started twice, the exit is not reported as a crash."""
        started = Started(max_line_bytes=10)
        started.protocol.outReceived(b"x" * 20)
        self.assertEqual(started.lost, ["stdout line exceeds 10 bytes"])
        timers = list(started.reactor.getDelayedCalls())
        self.assertEqual(len(timers), 2)
        closing = started.conn.close()
        self.assertEqual(started.reactor.getDelayedCalls(), timers)
        started.protocol.processExited(Failure(ProcessDone(0)))
        started.protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(closing)
        self.assertEqual(started.lost, ["stdout line exceeds 10 bytes"])

    def test_output_after_a_violation_is_ignored(self) -> None:
        """Once broken, stdout is no longer read: a late answer resolves nothing."""
        started = Started(max_line_bytes=10)
        started.protocol.outReceived(b"x" * 20)
        started.protocol.outReceived(b"y" * 20)
        self.assertEqual(started.lost, ["stdout line exceeds 10 bytes"])

    def test_pipes_left_open_after_exit_are_closed(self) -> None:
        """A stray grandchild holding stdout open does not keep the close waiting past term_grace."""
        started = Started()
        closing = started.conn.close()
        started.protocol.processExited(Failure(ProcessDone(0)))
        self.assertFalse(started.stdin.disconnecting)
        started.reactor.advance(5.0)
        self.assertTrue(started.stdin.disconnecting)
        self.assertNoResult(closing)
        started.protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(closing)
        self.assertEqual(started.reactor.getDelayedCalls(), [])

    def test_stdout_is_read_while_running_and_stopping_only(self) -> None:
        """Answers are read while running and while stopping; once the leader exited, stdout is dropped."""
        started = Started()
        self.assertIsNotNone(started.conn.stdout_sink)
        started.conn.close()
        self.assertIsNotNone(started.conn.stdout_sink)
        started.protocol.processExited(Failure(ProcessDone(0)))
        self.assertIsNone(started.conn.stdout_sink)

    def test_illegal_transitions(self) -> None:
        """Events that cannot happen in a state are refused loudly, not silently folded into flags."""
        started = Started()
        self.assertRaises(NoTransition, started.conn.start)
        started.protocol.processExited(KILLED)
        self.assertRaises(NoTransition, started.protocol.processExited, KILLED)
        started.protocol.processEnded(KILLED)
        self.assertRaises(NoTransition, started.protocol.processEnded, KILLED)
        self.successResultOf(started.conn.close())
