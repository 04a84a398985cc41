"""Unit tests of the supervisor's state machine and the MCP session with a Clock and fake connections."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp.config import ServerConfig
from aichat.mcp.session import ToolResult, format_tool_result
from aichat.mcp.supervisor import ServerSupervisor, State, ToolCallError
from tests.mcp.fakes import NO_ANSWER, FakeConnection, FakeConnector, tool


def make(config: ServerConfig | None = None) -> tuple[Clock, FakeConnector, ServerSupervisor, list[State]]:
    """A supervisor over a fake connector, recording every state it announces."""
    clock = Clock()
    connector = FakeConnector(clock)
    states: list[State] = []
    supervisor = ServerSupervisor(
        clock,
        config or ServerConfig("fake", command="fake", timeout=10, init_timeout=20),
        connector,
        on_change=lambda s: states.append(s.state),
    )
    return clock, connector, supervisor, states


def call(supervisor: ServerSupervisor, name: str = "echo", arguments: dict[str, Any] | None = None) -> Deferred[Any]:
    """``call_tool`` as a Deferred."""
    return Deferred.fromCoroutine(supervisor.call_tool(name, arguments or {}))


def next_delay(clock: Clock) -> float:
    """Seconds until the only pending timer fires."""
    [timer] = clock.getDelayedCalls()
    return timer.getTime() - clock.seconds()


class LifecycleTests(SynchronousTestCase):
    """Start, ready, crash, backoff, stop."""

    def test_start_to_ready(self) -> None:
        """A start runs initialize, notifications/initialized and tools/list, then the server is ready."""
        clock, connector, supervisor, states = make()
        supervisor.start()
        self.assertEqual(supervisor.state, State.READY)
        self.assertEqual(states, [State.STARTING, State.READY])
        methods = [m["method"] for m in connector.last.sent]
        self.assertEqual(methods, ["initialize", "notifications/initialized", "tools/list"])
        self.assertEqual(connector.last.sent[0]["params"]["protocolVersion"], "2025-06-18")
        self.assertEqual([t["name"] for t in supervisor.tools], ["echo"])
        assert supervisor.info is not None
        self.assertEqual(supervisor.info.server_info["name"], "fake")
        self.assertEqual(connector.last.protocol_version, "2025-06-18")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_older_protocol_accepted(self) -> None:
        """A server answering 2024-11-05 is accepted with that version."""
        _clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(
            initialize=lambda p: {"protocolVersion": "2024-11-05", "capabilities": {}, "serverInfo": {}}
        )
        supervisor.start()
        self.assertEqual(supervisor.state, State.READY)
        assert supervisor.info is not None
        self.assertEqual(supervisor.info.protocol_version, "2024-11-05")

    def test_unsupported_protocol_fails(self) -> None:
        """An unknown protocol version is refused: state failed, no retry, a clear last_error."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(
            initialize=lambda p: {"protocolVersion": "1999-01-01", "capabilities": {}, "serverInfo": {}}
        )
        supervisor.start()
        self.assertEqual(supervisor.state, State.FAILED)
        assert supervisor.last_error is not None
        self.assertIn("1999-01-01", supervisor.last_error)
        self.assertTrue(connector.last.closed)
        self.assertEqual(clock.getDelayedCalls(), [])
        connector.prepare = None
        self.successResultOf(Deferred.fromCoroutine(supervisor.refresh_tools()))
        self.assertEqual(supervisor.state, State.READY)

    def test_crash_fails_in_flight_calls_at_once(self) -> None:
        """A crash fails every in-flight call immediately with the reason, then the server comes back."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update({"tools/call": lambda p: NO_ANSWER})
        supervisor.start()
        calls = [call(supervisor) for _ in range(5)]
        connector.last.crash("server process killed by signal 9")
        for d in calls:
            error = self.failureResultOf(d, ToolCallError).value
            self.assertIn("killed by signal 9", str(error))
        self.assertEqual(supervisor.state, State.BACKING_OFF)
        self.assertEqual(supervisor.restarts, 1)
        self.assertIn("killed by signal 9", str(supervisor.last_error))
        self.assertEqual(supervisor.tools, [])
        self.failureResultOf(call(supervisor), ToolCallError)
        clock.advance(1)
        self.assertEqual(supervisor.state, State.READY)
        self.assertEqual(len(connector.connections), 2)

    def test_backoff_doubles_to_sixty(self) -> None:
        """Failed starts are retried after 1, 2, 4 ... seconds, capped at 60."""
        clock, connector, supervisor, _ = make()
        connector.error = OSError(2, "No such file or directory")
        supervisor.start()
        delays = []
        for _ in range(9):
            self.assertEqual(supervisor.state, State.BACKING_OFF)
            delay = next_delay(clock)
            delays.append(delay)
            clock.advance(delay)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(supervisor.last_error, "No such file or directory")

    def test_backoff_resets_after_sustained_uptime(self) -> None:
        """Crashes soon after start keep doubling; after 60 s of uptime the delay is 1 s again."""
        clock, connector, supervisor, _ = make()
        supervisor.start()
        connector.last.crash()
        self.assertEqual(next_delay(clock), 1)
        clock.advance(1)
        clock.advance(10)
        connector.last.crash()
        self.assertEqual(next_delay(clock), 2)
        clock.advance(2)
        clock.advance(60)
        connector.last.crash()
        self.assertEqual(next_delay(clock), 1)

    def test_init_timeout(self) -> None:
        """A server that never answers initialize is given up on after init_timeout and retried."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(initialize=lambda p: NO_ANSWER)
        supervisor.start()
        clock.advance(19.9)
        self.assertEqual(supervisor.state, State.STARTING)
        clock.advance(0.1)
        self.assertEqual(supervisor.state, State.BACKING_OFF)
        self.assertIn("init_timeout 20 s", str(supervisor.last_error))
        self.assertTrue(connector.last.closed)
        self.assertEqual(connector.last.peer.pending_count, 0)
        self.assertEqual(connector.last.notifications("notifications/cancelled"), [])

    def test_stop_while_backing_off(self) -> None:
        """Stopping cancels the pending retry; nothing is left scheduled."""
        clock, connector, supervisor, _ = make()
        connector.error = OSError(2, "No such file or directory")
        supervisor.start()
        self.successResultOf(supervisor.stop())
        self.assertEqual(supervisor.state, State.STOPPED)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_while_ready(self) -> None:
        """Stopping a ready server closes its connection and fails its in-flight calls."""
        clock, connector, supervisor, states = make()
        connector.prepare = lambda c: c.handlers.update({"tools/call": lambda p: NO_ANSWER})
        supervisor.start()
        pending = call(supervisor)
        self.successResultOf(supervisor.stop())
        self.assertTrue(connector.last.closed)
        self.failureResultOf(pending, ToolCallError)
        self.assertEqual(states[-2:], [State.STOPPING, State.STOPPED])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_while_starting(self) -> None:
        """Stopping during the handshake abandons it; the stopped server stays stopped."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(initialize=lambda p: NO_ANSWER)
        supervisor.start()
        self.successResultOf(supervisor.stop())
        self.assertEqual(supervisor.state, State.STOPPED)
        self.assertTrue(connector.last.closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_restart_resets_backoff(self) -> None:
        """restart() stops the running server and starts a new one at once."""
        _clock, connector, supervisor, _ = make()
        supervisor.start()
        first = connector.last
        self.successResultOf(Deferred.fromCoroutine(supervisor.restart()))
        self.assertTrue(first.closed)
        self.assertIsNot(connector.last, first)
        self.assertEqual(supervisor.state, State.READY)


class CallTests(SynchronousTestCase):
    """tools/call through a ready supervisor."""

    def test_call(self) -> None:
        """A call returns the formatted result."""
        _clock, connector, supervisor, _ = make()
        supervisor.start()
        result = self.successResultOf(call(supervisor, "echo", {"message": "hi"}))
        self.assertEqual(result, ToolResult("called echo"))
        self.assertEqual(connector.last.sent[-1]["params"], {"name": "echo", "arguments": {"message": "hi"}})

    def test_timeout_sends_cancelled(self) -> None:
        """A call over the per-server timeout fails clearly and the server is told to cancel it."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update({"tools/call": lambda p: NO_ANSWER})
        supervisor.start()
        d = call(supervisor)
        clock.advance(10)
        self.assertIn("timed out after 10 s", str(self.failureResultOf(d, ToolCallError).value))
        request_id = connector.last.unanswered[-1]["id"]
        self.assertEqual(
            connector.last.notifications("notifications/cancelled"),
            [{"requestId": request_id, "reason": "timed out after 10 s"}],
        )
        self.assertEqual(supervisor.state, State.READY)

    def test_cancel_propagates_and_sends_cancelled(self) -> None:
        """Cancelling the caller raises CancelledError (not ToolCallError) and notifies the server."""
        clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update({"tools/call": lambda p: NO_ANSWER})
        supervisor.start()
        d = call(supervisor)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        [cancelled] = connector.last.notifications("notifications/cancelled")
        self.assertEqual(cancelled["requestId"], connector.last.unanswered[-1]["id"])
        self.assertEqual(connector.last.peer.pending_count, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_protocol_error_is_call_error(self) -> None:
        """A JSON-RPC error answer to tools/call is a ToolCallError naming the server."""
        _clock, connector, supervisor, _ = make()

        def without_call(connection: FakeConnection) -> None:
            del connection.handlers["tools/call"]

        connector.prepare = without_call
        supervisor.start()
        error = self.failureResultOf(call(supervisor), ToolCallError).value
        self.assertIn("'fake'", str(error))

    def test_is_error_is_a_result(self) -> None:
        """isError comes back as a result with is_error, for the model to read."""
        _clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update(
            {"tools/call": lambda p: {"content": [{"type": "text", "text": "bad input"}], "isError": True}}
        )
        supervisor.start()
        self.assertEqual(self.successResultOf(call(supervisor)), ToolResult("bad input", is_error=True))


class DiscoveryTests(SynchronousTestCase):
    """tools/list pagination and list_changed."""

    def test_pagination(self) -> None:
        """Every page is fetched by cursor until there is no nextCursor."""
        _clock, connector, supervisor, _ = make()
        pages = {None: (["a", "b"], "p2"), "p2": (["c"], "p3"), "p3": (["d"], None)}

        def page(params: dict[str, Any]) -> dict[str, Any]:
            names, cursor = pages[params.get("cursor")]
            out: dict[str, Any] = {"tools": [tool(n) for n in names]}
            if cursor:
                out["nextCursor"] = cursor
            return out

        connector.prepare = lambda c: c.handlers.update({"tools/list": page})
        supervisor.start()
        self.assertEqual([t["name"] for t in supervisor.tools], ["a", "b", "c", "d"])

    def test_repeated_cursor_is_an_error(self) -> None:
        """A server that loops on one cursor does not hang the start."""
        _clock, connector, supervisor, _ = make()
        connector.prepare = lambda c: c.handlers.update({"tools/list": lambda p: {"tools": [], "nextCursor": "x"}})
        supervisor.start()
        self.assertEqual(supervisor.state, State.BACKING_OFF)
        self.assertIn("repeated cursor", str(supervisor.last_error))

    def test_list_changed_relists(self) -> None:
        """notifications/tools/list_changed replaces the server's tools and announces the change."""
        _clock, connector, supervisor, states = make()
        supervisor.start()
        connector.last.tools = [tool("echo"), tool("added")]
        before = len(states)
        connector.last.peer.message_received({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        self.assertEqual([t["name"] for t in supervisor.tools], ["echo", "added"])
        self.assertEqual(len(states), before + 1)

    def test_list_changed_during_start(self) -> None:
        """A list_changed that arrives before the server is ready leads to a second listing once ready."""
        _clock, connector, supervisor, _ = make()
        listed: list[int] = []

        def prepare(c: FakeConnection) -> None:
            def listing(params: dict[str, Any]) -> dict[str, Any]:
                listed.append(1)
                if len(listed) == 1:
                    c.tools = [tool("echo"), tool("late")]
                    c.peer.message_received({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
                    return {"tools": [tool("echo")]}
                return {"tools": c.tools}

            c.handlers["tools/list"] = listing

        connector.prepare = prepare
        supervisor.start()
        self.assertEqual([t["name"] for t in supervisor.tools], ["echo", "late"])

    def test_server_requests_answered(self) -> None:
        """ping -> {}, roots/list -> no roots, anything else -> -32601."""
        _clock, connector, supervisor, _ = make()
        supervisor.start()
        connection = connector.last
        for request_id, method in (("a", "ping"), ("b", "roots/list"), ("c", "sampling/createMessage")):
            connection.peer.message_received({"jsonrpc": "2.0", "id": request_id, "method": method})
        replies = {m["id"]: m for m in connection.sent if m.get("id") in ("a", "b", "c")}
        self.assertEqual(replies["a"]["result"], {})
        self.assertEqual(replies["b"]["result"], {"roots": []})
        self.assertEqual(replies["c"]["error"]["code"], -32601)


class FormatTests(SynchronousTestCase):
    """How a tools/call result is turned into text for the model."""

    def test_all_items(self) -> None:
        """All text items are joined; other items are described; structured content is kept."""
        result = format_tool_result({
            "content": [
                {"type": "text", "text": "one"},
                {"type": "image", "mimeType": "image/png", "data": "AAAA"},
                {"type": "text", "text": "two"},
                {"type": "audio", "mimeType": "audio/wav", "data": "AAAAAAAA"},
                {"type": "resource_link", "uri": "file:///x", "name": "x", "mimeType": "text/plain"},
                {"type": "resource", "resource": {"uri": "file:///y", "text": "why"}},
                {"type": "resource", "resource": {"uri": "file:///z", "mimeType": "application/gzip", "blob": "AAAA"}},
            ],
            "structuredContent": {"n": 1},
        })
        self.assertEqual(
            result.text.split("\n"),
            [
                "one",
                "[image: image/png, 3 bytes]",
                "two",
                "[audio: audio/wav, 6 bytes]",
                "[resource link: x <file:///x>, text/plain]",
                "[resource: file:///y]",
                "why",
                "[resource: file:///z, application/gzip, 3 bytes]",
            ],
        )
        self.assertEqual(result.structured, {"n": 1})
        self.assertFalse(result.is_error)

    def test_structured_only(self) -> None:
        """With no content items, the structured content is the text."""
        self.assertEqual(format_tool_result({"content": [], "structuredContent": {"a": 1}}).text, '{"a": 1}')

    def test_empty(self) -> None:
        """An empty result is an empty text, not an error."""
        self.assertEqual(format_tool_result({}), ToolResult(""))
