"""Unit tests of the stdio process protocol without a process: stdout framing, stderr logging, limits, env."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ProcessDone
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import PeerGone
from aichat.mcp.stdio import ServerProcessProtocol, StdioConnection, child_environment, group_command
from tests.mcp.fakes import FakeProcessReactor


class Started:
    """A StdioConnection started on a fake process reactor: its protocol, stdin and lost reasons."""

    def __init__(self, max_line_bytes: int = 1000, **config: Any) -> None:
        self.reactor = FakeProcessReactor()
        server = ServerConfig("srv", command="sh", args=("-c", "true"), **config)
        self.conn = StdioConnection(self.reactor, self.reactor, server, max_line_bytes=max_line_bytes,
                                    base_env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-x"})
        self.lost: list[str] = []
        self.conn.on_lost = self.lost.append
        self.conn.start()
        [(self.args, self.kwargs, self.stdin)] = self.reactor.spawned
        self.protocol: ServerProcessProtocol = self.args[0]

    def written(self) -> list[dict[str, Any]]:
        """Messages written to the child's stdin."""
        return [json.loads(line) for line in self.stdin.value().splitlines()]


@implementer(ILogObserver)
class Collector:
    """Keeps every log event."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


class ProtocolTests(SynchronousTestCase):
    """Bytes in, messages and log events out."""

    def capture(self) -> list[LogEvent]:
        """Log events emitted during the test."""
        collector = Collector()
        globalLogPublisher.addObserver(collector)
        self.addCleanup(globalLogPublisher.removeObserver, collector)
        return collector.events

    def test_spawn(self) -> None:
        """The child runs through setsid, without a PTY, with a minimal environment and its cwd."""
        started = Started(cwd="/tmp", env={"MINE": "1"})
        _, executable, argv = started.args
        self.assertTrue(executable.endswith("setsid") or argv[2].startswith("import os"))
        self.assertEqual(argv[-3:], ["sh", "-c", "true"])
        self.assertEqual(started.kwargs["env"], {"PATH": "/usr/bin:/bin", "MINE": "1"})
        self.assertEqual(started.kwargs["path"], "/tmp")
        self.assertFalse(started.kwargs["usePTY"])
        self.assertEqual(started.conn.pid, started.stdin.pid)

    def test_stdout_lines_reach_the_peer(self) -> None:
        """Requests go to stdin as JSON lines; a response split across chunks resolves its request."""
        started = Started()
        pending = started.conn.peer.request("tools/list")
        self.assertEqual(started.written(), [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}])
        response = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}).encode()
        started.protocol.outReceived(b"Starting server...\n" + response[:10])
        started.protocol.outReceived(response[10:] + b"\n")
        self.assertEqual(self.successResultOf(pending), {"tools": []})

    def test_stderr_logged_per_line_with_server_name(self) -> None:
        """stderr is logged one event per line, with the server's name as a field."""
        events = self.capture()
        started = Started()
        started.protocol.errReceived(b"first line\nsec")
        started.protocol.errReceived(b"ond line\r\n")
        stderr = [e for e in events if e.get("stream") == "stderr"]
        self.assertEqual([(e["server"], e["line"]) for e in stderr], [("srv", "first line"), ("srv", "second line")])

    def test_overlong_line_fails_pending_calls(self) -> None:
        """A stdout line over the limit fails pending requests clearly, reports the loss, starts the ladder."""
        self.capture()
        started = Started(max_line_bytes=100)
        pending = started.conn.peer.request("tools/call")
        started.protocol.outReceived(b"x" * 60)
        started.protocol.outReceived(b"x" * 60)
        error = self.failureResultOf(pending, PeerGone).value
        self.assertIn("line exceeds 100 bytes", str(error))
        self.assertEqual(started.lost, ["stdout line exceeds 100 bytes"])
        self.assertTrue(started.stdin.stdin_closed)
        started.protocol.outReceived(b'{"jsonrpc": "2.0", "method": "late"}\n')

    def test_stop_ladder_timers(self) -> None:
        """close() closes stdin at once, then schedules SIGTERM and SIGKILL; the end cancels them."""
        started = Started()
        closing = started.conn.close()
        self.assertTrue(started.stdin.stdin_closed)
        self.assertEqual(len(started.reactor.getDelayedCalls()), 2)
        self.assertNoResult(closing)
        started.protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(closing)
        self.assertEqual(started.reactor.getDelayedCalls(), [])

    def test_child_environment(self) -> None:
        """Only the allow-listed variables pass, plus the server's own env, which wins."""
        base: dict[str, Any] = {"PATH": "/bin", "HOME": "/root", "OPENAI_API_KEY": "sk", "LANG": "C", "AWS_SECRET": "s"}
        self.assertEqual(
            child_environment({"LANG": "en_US.UTF-8", "TOKEN": "mine"}, base),
            {"PATH": "/bin", "HOME": "/root", "LANG": "en_US.UTF-8", "TOKEN": "mine"},
        )

    def test_group_command(self) -> None:
        """The child is started through setsid so it leads its own process group."""
        executable, argv = group_command("node", ("index.js", "stdio"))
        self.assertTrue(executable.endswith("setsid") or "setsid" in " ".join(argv))
        self.assertEqual(argv[-3:], ["node", "index.js", "stdio"])
