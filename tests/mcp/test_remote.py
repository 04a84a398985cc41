"""Integration tests of the remote transports against a real Python MCP server (PyPI ``mcp``) on a real port."""

from __future__ import annotations

import socket
import subprocess
import sys

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from aichat.mcp import MCPHost, ServerConfig, ToolCallError
from tests.mcp.support import ROOT, wait_for

PYTHON_SERVER = ROOT / "tests" / "mcp" / "servers" / "python_server.py"


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_server(transport: str, port: int, options: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """Start the Python MCP server in the background."""
    return subprocess.Popen(
        [sys.executable, str(PYTHON_SERVER), transport, str(port), *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def accepting(port: int) -> bool:
    """True once something accepts TCP connections on ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RemoteServerTests(TestCase):
    """Streamable HTTP (SSE and JSON answers) and legacy HTTP+SSE against the SDK's own server."""

    timeout = 60

    async def serve(self, transport: str, *options: str, port: int | None = None) -> int:
        """Run the Python server with ``transport`` on a port; stopped after the test."""
        port = port or free_port()
        self.processes.append(spawn_server(transport, port, options))
        await wait_for(lambda: accepting(port), 20, "the Python MCP server to listen")
        return port

    def setUp(self) -> None:
        """Track the servers this test starts, and stop them afterwards."""
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self.stop_servers)

    def stop_servers(self) -> None:
        """Kill every Python server started by the test."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    async def host_for(self, config: ServerConfig) -> MCPHost:
        """A started, ready host with one server, using its own connection pool (closed after the test)."""
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        host = MCPHost(reactor, [config], initial_backoff=0.1, http_client=HTTPClient(Agent(reactor, pool=pool)))
        host.startService()
        self.addCleanup(host.stopService)
        await host.wait_ready(20)
        return host

    async def check_calls(self, host: MCPHost, name: str) -> None:
        """The server's tools answer through the host."""
        status = host.status()[0]
        self.assertEqual(status["state"], "ready", status)
        self.assertEqual(status["server_info"]["name"], "python-test-server")
        self.assertEqual(sorted(t.name for t in host.tools()), ["add", "echo", "slow"])
        result = await host.call_tool(f"{name}__add", {"a": 20, "b": 22})
        self.assertEqual((result.text, result.structured), ("42", {"result": 42}))
        result = await host.call_tool(f"{name}__echo", {"message": "remote"})
        self.assertEqual(result.text, "Echo: remote")

    async def test_streamable_http(self) -> None:
        """Streamable HTTP with event-stream answers; a slow call times out."""
        port = await self.serve("streamable-http")
        url = f"http://127.0.0.1:{port}/mcp"
        host = await self.host_for(ServerConfig("web", transport="http", url=url, timeout=0.5))
        self.assertEqual(host.status()[0]["protocol_version"], "2025-06-18")
        await self.check_calls(host, "web")
        with self.assertRaises(ToolCallError) as raised:
            await host.call_tool("web__slow", {"seconds": 5})
        self.assertIn("timed out after 0.5 s", str(raised.exception))

    async def test_streamable_http_json(self) -> None:
        """Streamable HTTP with plain JSON answers."""
        port = await self.serve("streamable-http", "--json")
        host = await self.host_for(ServerConfig("web", transport="http", url=f"http://127.0.0.1:{port}/mcp"))
        await self.check_calls(host, "web")

    async def test_legacy_sse_and_reconnect(self) -> None:
        """Legacy HTTP+SSE works; when the server dies the host backs off and reconnects to its successor."""
        port = await self.serve("sse")
        host = await self.host_for(ServerConfig("old", url=f"http://127.0.0.1:{port}/sse"))
        self.assertEqual(host.status()[0]["transport"], "sse")
        await self.check_calls(host, "old")
        self.stop_servers()
        await wait_for(lambda: host.status()[0]["state"] in ("backing_off", "starting"), 10, "the loss to be noticed")
        with self.assertRaises(ToolCallError):
            await host.call_tool("old__add", {"a": 1, "b": 1})
        await self.serve("sse", port=port)
        await wait_for(lambda: host.status()[0]["state"] == "ready", 30, "the reconnect")
        await self.check_calls(host, "old")
        self.assertGreaterEqual(host.status()[0]["restarts"], 1)
