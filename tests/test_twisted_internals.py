"""Tests of the seam over Twisted's private attributes: each use still works on the installed Twisted."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.process import ProcessWriter
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aichat.twisted_internals import clear_stop_signal, direct_stdin
from tests.mcp.fakes import FakeProcessTransport


class StandIn:
    """A reactor stand-in carrying only the attribute twistd reads."""

    _exitSignal: int | None = None


class ClearStopSignalTests(SynchronousTestCase):
    """twistd re-raises the stop signal unless it is cleared; only SIGTERM and SIGINT are cleared."""

    def test_the_reactor_records_the_stop_signal_where_the_seam_reads_it(self) -> None:
        """Twisted's own SIGTERM handler writes ``_exitSignal``, and twistd reads it after shutdown."""
        self.assertIn("_exitSignal", vars(ReactorBase))
        from twisted.application import app

        with open(app.__file__, encoding="utf-8") as source:
            self.assertIn("reactor._exitSignal", source.read())

    def test_sigterm_and_sigint_are_cleared(self) -> None:
        """A stop by SIGTERM or SIGINT is forgotten, so the process exits 0."""
        for number in (signal.SIGTERM, signal.SIGINT):
            stand_in = StandIn()
            stand_in._exitSignal = number
            self.assertTrue(clear_stop_signal(stand_in))
            self.assertIsNone(stand_in._exitSignal)

    def test_other_signals_are_kept(self) -> None:
        """Another signal (SIGHUP), or none, is left as it is."""
        stand_in = StandIn()
        stand_in._exitSignal = signal.SIGHUP
        self.assertFalse(clear_stop_signal(stand_in))
        self.assertEqual(stand_in._exitSignal, signal.SIGHUP)
        self.assertFalse(clear_stop_signal(StandIn()))

    def test_a_reactor_without_the_attribute_is_left_alone(self) -> None:
        """A reactor that has no ``_exitSignal`` (a test's MemoryReactor) is not given one."""
        memory = MemoryReactor()
        self.assertFalse(clear_stop_signal(memory))
        self.assertFalse(hasattr(memory, "_exitSignal"))


class DirectStdinTests(SynchronousTestCase):
    """The synchronous stdin write, over a real pipe and Twisted's real pipe writer."""

    def writer(self) -> tuple[ProcessWriter, int]:
        """A ProcessWriter over a new pipe, and the pipe's read end (non-blocking)."""
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        writer = ProcessWriter(MemoryReactor(), None, 0, write_end)
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        return writer, read_end

    def test_an_idle_pipe_is_written_at_once(self) -> None:
        """Nothing queued: the bytes are in the pipe before the call returns, and nothing is left over."""
        writer, read_end = self.writer()
        direct = direct_stdin(FakeProcessTransportWithPipes(writer))
        assert direct is not None
        self.assertEqual(direct.write(b'{"id": 1}\n'), b"")
        self.assertEqual(os.read(read_end, 100), b'{"id": 1}\n')

    def test_queued_bytes_keep_their_place(self) -> None:
        """With bytes queued in the writer the new ones are handed back, so they go after the queue."""
        writer, read_end = self.writer()
        writer.write(b"queued\n")
        direct = direct_stdin(FakeProcessTransportWithPipes(writer))
        assert direct is not None
        self.assertEqual(direct.write(b"next\n"), b"next\n")
        self.assertRaises(BlockingIOError, os.read, read_end, 100)

    def test_a_full_pipe_hands_back_the_rest(self) -> None:
        """What the pipe does not take is returned, to be written through the transport's buffer."""
        writer, _ = self.writer()
        direct = direct_stdin(FakeProcessTransportWithPipes(writer))
        assert direct is not None
        big = b"x" * (4 * 1024 * 1024)
        rest = direct.write(big)
        self.assertGreater(len(rest), 0)
        self.assertLess(len(rest), len(big))

    def test_other_transports_have_no_fast_path(self) -> None:
        """A fake transport, or a writer without Twisted's buffer attributes, gets None: buffered writes."""
        self.assertIsNone(direct_stdin(FakeProcessTransport()))
        self.assertIsNone(direct_stdin(FakeProcessTransportWithPipes(object())))


class FakeProcessTransportWithPipes(FakeProcessTransport):
    """A fake process transport whose stdin is the given pipe writer."""

    def __init__(self, writer: Any) -> None:
        super().__init__()
        self.pipes = {0: writer}


class Ended(ProcessProtocol):
    """Fires ``ended`` when the process is gone."""

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class RealProcessTests(TestCase):
    """The installed Twisted's process transport still has the pipe writer the fast path reads."""

    timeout = 10

    async def test_a_spawned_process_has_a_fast_path(self) -> None:
        """spawnProcess's transport exposes its stdin writer; bytes written directly reach the child."""
        protocol = Ended()
        script = "import sys; sys.exit(0 if sys.stdin.readline() == 'ping\\n' else 3)"
        transport: Any = reactor.spawnProcess(
            protocol, sys.executable, [sys.executable, "-c", script], env=None
        )
        direct = direct_stdin(transport)
        self.assertIsNotNone(direct)
        assert direct is not None
        self.assertEqual(direct.write(b"ping\n"), b"")
        transport.closeStdin()
        await protocol.ended
        self.assertEqual(transport.status, 0)
