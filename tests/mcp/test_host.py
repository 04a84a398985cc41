"""Unit tests of MCPHost over fake connections: routing, status, refresh, restart, reload, wait_ready."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp import MCPHost, ServerConfig, ToolCallError, ToolNotFound, ToolResult, UnknownServer
from tests.mcp.fakes import NO_ANSWER, FakeConnection, FakeConnector, FakeProcessReactor, tool


def make(*configs: ServerConfig) -> tuple[FakeProcessReactor, FakeConnector, MCPHost]:
    """A host over a fake connector whose servers list tools named after the server."""
    reactor = FakeProcessReactor()
    connector = FakeConnector(reactor)

    def prepare(connection: FakeConnection) -> None:
        name = connector.configs[-1].name
        connection.tools = [tool(f"{name}_tool"), tool("shared")]

    connector.prepare = prepare
    host = MCPHost(reactor, list(configs), connector=connector)
    return reactor, connector, host


class HostTests(SynchronousTestCase):
    """The host's public API."""

    def test_tools_and_calls(self) -> None:
        """Tools of every ready server, prefixed by server, routed back to the right server."""
        _, connector, host = make(ServerConfig("a", command="x"), ServerConfig("b", command="y", timeout=7))
        host.startService()
        self.assertEqual(
            [t.function_name for t in host.tools()], ["a__a_tool", "a__shared", "b__b_tool", "b__shared"]
        )
        result = self.successResultOf(Deferred.fromCoroutine(host.call_tool("b__shared", {"k": 1})))
        self.assertEqual(result, ToolResult("called shared"))
        self.assertEqual(connector.connections[1].sent[-1]["params"], {"name": "shared", "arguments": {"k": 1}})
        self.assertEqual(host.timeout_for("b__shared"), 7)
        self.failureResultOf(Deferred.fromCoroutine(host.call_tool("c__x", {})), ToolNotFound)
        bad = Deferred.fromCoroutine(host.call_tool("a__shared", ["not", "an", "object"]))  # type: ignore[arg-type]
        self.assertIn("must be a JSON object", str(self.failureResultOf(bad, ToolCallError).value))

    def test_disabled_server_not_started(self) -> None:
        """enabled: false is honoured: no connection, state stopped, visible in status."""
        _, connector, host = make(ServerConfig("a", command="x", enabled=False))
        host.startService()
        self.assertEqual(connector.connections, [])
        [status] = host.status()
        self.assertEqual((status["state"], status["enabled"]), ("stopped", False))
        self.successResultOf(host.wait_ready(1))

    def test_status(self) -> None:
        """status() has every field the API reports."""
        reactor, _, host = make(ServerConfig("a", command="x"))
        host.startService()
        reactor.advance(2.5)
        [status] = host.status()
        self.assertEqual(
            status,
            {
                "name": "a", "description": "", "transport": "stdio", "enabled": True, "state": "ready",
                "protocol_version": "2025-06-18", "server_info": {"name": "fake", "version": "1"},
                "tool_count": 2, "pid": 4242, "restarts": 0, "last_error": None, "uptime_seconds": 2.5,
            },
        )

    def test_crashed_server_tools_disappear(self) -> None:
        """A crashed server's tools leave the table and come back with it."""
        reactor, connector, host = make(ServerConfig("a", command="x"), ServerConfig("b", command="y"))
        host.startService()
        connector.connections[0].crash()
        self.assertEqual([t.server for t in host.tools()], ["b", "b"])
        self.assertEqual(host.status()[0]["state"], "backing_off")
        reactor.advance(1)
        self.assertEqual(len(host.tools()), 4)

    def test_wait_ready(self) -> None:
        """wait_ready fires once nothing is starting, or fails after its timeout."""
        reactor, connector, host = make(ServerConfig("a", command="x"))
        connector.prepare = lambda c: c.handlers.update(initialize=lambda p: NO_ANSWER)
        host.startService()
        waiting = host.wait_ready(5)
        self.assertNoResult(waiting)
        reactor.advance(5)
        self.failureResultOf(waiting, TimeoutError)
        waiting = host.wait_ready(100)
        reactor.advance(60)
        self.successResultOf(waiting)
        self.assertEqual(host.status()[0]["state"], "backing_off")

    def test_refresh_and_restart(self) -> None:
        """refresh re-lists ready servers; restart replaces the connection; unknown names are refused."""
        _, connector, host = make(ServerConfig("a", command="x"))
        host.startService()
        connector.last.tools = [tool("new")]
        self.successResultOf(Deferred.fromCoroutine(host.refresh()))
        self.assertEqual([t.function_name for t in host.tools()], ["a__new"])
        first = connector.last
        self.successResultOf(Deferred.fromCoroutine(host.restart("a")))
        self.assertTrue(first.closed)
        self.assertEqual(len(connector.connections), 2)
        self.failureResultOf(Deferred.fromCoroutine(host.restart("zzz")), UnknownServer)

    def test_reload(self) -> None:
        """Added servers start, removed ones stop, changed ones restart, unchanged ones are untouched."""
        _, connector, host = make(
            ServerConfig("keep", command="x"), ServerConfig("change", command="x"), ServerConfig("drop", command="x")
        )
        host.startService()
        keep, change, drop = connector.connections
        host.reload([ServerConfig("keep", command="x"), ServerConfig("change", command="x", timeout=5),
                     ServerConfig("add", command="x")])
        self.assertFalse(keep.closed)
        self.assertTrue(change.closed)
        self.assertTrue(drop.closed)
        self.assertEqual([c.name for c in connector.configs[3:]], ["change", "add"])
        self.assertEqual([s["name"] for s in host.status()], ["keep", "change", "add"])
        self.assertTrue(all(s["state"] == "ready" for s in host.status()))
        self.assertEqual(host.timeout_for("change__shared"), 5)

    def test_not_ready_call(self) -> None:
        """A tool of a server that is down fails with ToolCallError saying why; an unknown server's is not found."""
        _, connector, host = make(ServerConfig("a", command="x"))
        host.startService()
        connector.last.crash("server process exited with status 1")
        self.assertEqual(host.tools(), [])
        self.assertEqual(host.timeout_for("a__a_tool"), 30)
        with self.assertRaises(ToolNotFound):
            host.timeout_for("b__a_tool")
        error = self.failureResultOf(Deferred.fromCoroutine(host.call_tool("a__a_tool", {})), ToolCallError)
        self.assertIn("'a' is not ready (backing_off): server process exited with status 1", str(error.value))
        self.failureResultOf(Deferred.fromCoroutine(host.call_tool("b__a_tool", {})), ToolNotFound)

    def test_stop_service(self) -> None:
        """stopService closes every connection and leaves nothing scheduled."""
        reactor, connector, host = make(ServerConfig("a", command="x"), ServerConfig("b", command="x"))
        host.startService()
        self.successResultOf(host.stopService())
        self.assertTrue(all(c.closed for c in connector.connections))
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual({s["state"] for s in host.status()}, {"stopped"})
