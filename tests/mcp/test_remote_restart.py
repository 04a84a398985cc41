"""The real server-everything over Streamable HTTP and legacy HTTP+SSE, killed and restarted under a host.

Each test drives its own ``node dist/index.js streamableHttp|sse`` on a real port through an MCPHost on
the real reactor: calls before the restart work; while the server is gone the status leaves ``ready`` by
itself (no call needed) and a call fails at once with a clear error; once it is back the host has a new
session on its own, and calls work again. A server that is back before the host noticed it was gone (the
case of issue 16) is handled too: the call then either goes through or fails clearly, never hangs.
The same story is then told by the real daemon: its status endpoint and chat turns whose (mock) model
calls the tool.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from aichat.mcp import MCPHost, ServerConfig, ToolCallError
from tests.mcp.support import MODULES, require_npm_servers, wait_for
from tests.mcp.test_remote import accepting, free_port
from tests.support import BIN
from tests.support import free_port as free_tcp_port
from tests.test_chat_e2e import Chat
from tests.test_daemon import start, write_daemon_config

EVERYTHING = MODULES / "server-everything" / "dist" / "index.js"
URL_PATHS = {"streamableHttp": "/mcp", "sse": "/sse"}
TRANSPORTS = {"streamableHttp": "http", "sse": "sse"}


class EverythingServer:
    """server-everything in one HTTP mode on a fixed port, which can be killed and started again."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{URL_PATHS[self.mode]}"

    def spawn(self) -> None:
        """Start the process (not waiting for it to listen)."""
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PORT": str(self.port)}
        self.process = subprocess.Popen(
            ["node", str(EVERYTHING), self.mode],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> None:
        """Start it and wait (on the reactor) until it accepts connections."""
        self.spawn()
        await wait_for(lambda: accepting(self.port), 20, f"server-everything {self.mode} to listen")

    def kill(self) -> None:
        """SIGKILL, as a crash or a pod eviction does: no goodbye to any client."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


class CuttableProxy(ProxyFactory):
    """A TCP forwarder to a local port whose connections the test can cut, as a network failure does."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.connections: list[ProxyServer] = []
        self.opened = 0

    @property
    def live(self) -> int:
        """Connections open through the proxy now."""
        return sum(1 for c in self.connections if c.transport is not None and c.connected)

    def buildProtocol(self, addr: Any) -> ProxyServer | None:
        self.opened += 1
        connection = super().buildProtocol(addr)
        if connection is not None:
            self.connections.append(connection)
        return connection

    def cut(self) -> None:
        """Drop every connection at once (both sides see a broken connection)."""
        connections, self.connections = self.connections, []
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]


class RestartTests(TestCase):
    """Both HTTP modes of server-everything, killed and restarted under a running MCPHost."""

    timeout = 120

    def setUp(self) -> None:
        """The npm servers must be installed; every server started here is killed afterwards."""
        require_npm_servers()
        self.servers: list[EverythingServer] = []

    async def start_server(self, mode: str) -> EverythingServer:
        """A running server-everything in ``mode``."""
        server = EverythingServer(mode)
        self.servers.append(server)
        self.addCleanup(server.kill)
        await server.start()
        return server

    async def host_for(self, server: EverythingServer, url: str | None = None) -> MCPHost:
        """A started, ready host with the server (at ``url``, if given) as ``web`` (its own connection pool).

        The pool keeps no idle connections: a POST's response stream may end after its answer was taken and
        the host stopped, and a connection cached then would outlive the test with its expiry timer.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        transport = TRANSPORTS[server.mode]
        config = ServerConfig("web", transport=transport, url=url or server.url, timeout=10, init_timeout=10)  # type: ignore[arg-type]
        host = MCPHost(reactor, [config], initial_backoff=0.2, http_client=HTTPClient(Agent(reactor, pool=pool)))
        host.startService()
        self.addCleanup(host.stopService)
        await host.wait_ready(20)
        return host

    def status(self, host: MCPHost) -> dict[str, Any]:
        """What /api/v1/mcp/servers/status shows for the server."""
        return host.status()[0]

    async def echo(self, host: MCPHost, text: str) -> str:
        """Call everything's echo tool and return its text."""
        result = await host.call_tool("web__echo", {"message": text})
        return result.text

    async def timed_call(self, host: MCPHost, text: str) -> tuple[float, str | Exception]:
        """Call echo; return how long it took and its text or its ToolCallError."""
        began = time.monotonic()
        try:
            outcome: str | Exception = await self.echo(host, text)
        except ToolCallError as e:
            outcome = e
        return time.monotonic() - began, outcome

    async def check_kill_then_restart(self, mode: str) -> None:
        server = await self.start_server(mode)
        host = await self.host_for(server)
        self.assertEqual(self.status(host)["state"], "ready")
        self.assertEqual(await self.echo(host, "before"), "Echo: before")

        server.kill()
        await wait_for(lambda: self.status(host)["state"] != "ready", 5, "the status to leave ready without a call")
        status = self.status(host)
        self.assertIn(status["state"], ("backing_off", "starting"))
        self.assertTrue(status["last_error"], status)
        self.assertEqual(status["tool_count"], 0)

        took, outcome = await self.timed_call(host, "during")
        self.assertIsInstance(outcome, ToolCallError, "the server is down: a clear error")
        self.assertIn("'web'", str(outcome))
        self.assertLess(took, 5, "a call while the server is down fails promptly, it does not hang")

        await server.start()
        await wait_for(lambda: self.status(host)["state"] == "ready", 30, "a new session without operator action")
        self.assertEqual(await self.echo(host, "after"), "Echo: after")
        status = self.status(host)
        self.assertGreaterEqual(status["restarts"], 1)
        self.assertIsNone(status["last_error"])
        self.assertGreater(status["tool_count"], 0)

    async def check_quick_restart(self, mode: str) -> None:
        server = await self.start_server(mode)
        host = await self.host_for(server)
        self.assertEqual(await self.echo(host, "before"), "Echo: before")
        server.kill()
        await server.start()
        took, outcome = await self.timed_call(host, "during")
        if isinstance(outcome, str):
            self.assertEqual(outcome, "Echo: during")
        else:
            self.assertIn("'web'", str(outcome))
        self.assertLess(took, 10, "a call racing the restart is answered or fails, it does not hang")
        await wait_for(lambda: self.status(host)["state"] == "ready", 30, "a new session without operator action")
        for attempt in range(3):
            self.assertEqual(await self.echo(host, f"after {attempt}"), f"Echo: after {attempt}")
        self.assertGreaterEqual(self.status(host)["restarts"], 1)

    async def test_streamable_http_killed_and_restarted(self) -> None:
        """Streamable HTTP: the GET stream's end shows the loss; a new session once the server is back."""
        await self.check_kill_then_restart("streamableHttp")

    async def test_streamable_http_quick_restart(self) -> None:
        """Streamable HTTP: a server back before we noticed answers the old session with 400; we recover."""
        await self.check_quick_restart("streamableHttp")

    async def test_streamable_http_network_cut_keeps_the_session(self) -> None:
        """Connections cut between us and a live server: the GET stream is reopened, the session kept."""
        server = await self.start_server("streamableHttp")
        proxy = CuttableProxy(server.port)
        listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(listening.stopListening)
        proxy_port = listening.getHost().port  # type: ignore[attr-defined]
        host = await self.host_for(server, f"http://127.0.0.1:{proxy_port}/mcp")
        self.assertEqual(await self.echo(host, "before"), "Echo: before")
        await wait_for(lambda: proxy.live > 0, 5, "the GET stream to be open")
        opened = proxy.opened
        proxy.cut()
        await wait_for(lambda: proxy.opened > opened and proxy.live > 0, 10, "the GET stream to be reopened")
        self.assertEqual(await self.echo(host, "after"), "Echo: after")
        status = self.status(host)
        self.assertEqual((status["state"], status["restarts"]), ("ready", 0), status)

    async def test_legacy_sse_killed_and_restarted(self) -> None:
        """Legacy HTTP+SSE: the event stream's end shows the loss; reconnected once the server is back."""
        await self.check_kill_then_restart("sse")

    async def test_legacy_sse_quick_restart(self) -> None:
        """Legacy HTTP+SSE: a server back at once; the host reconnects and calls work."""
        await self.check_quick_restart("sse")


# -- the real daemon ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``condition`` every 20 ms (blocking: the daemon is another process); fail after ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.02)


def start_blocking(server: EverythingServer) -> None:
    """Start ``server`` from a plain (non-reactor) test and wait until it listens."""
    server.spawn()
    wait_until(lambda: accepting(server.port), 20, f"server-everything {server.mode} to listen")


@pytest.fixture
def everything_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[EverythingServer, Chat]]:
    """server-everything in the mode of the test's parameter, and a daemon configured with it as ``web``."""
    require_npm_servers()
    server = EverythingServer(request.param)
    start_blocking(server)
    port = free_tcp_port()
    config = write_daemon_config(tmp_path, port, "chat:\n  approval:\n    policy: never\n  title_generation: false\n")
    servers = {"mcpServers": {"web": {"url": server.url, "transport": TRANSPORTS[server.mode], "timeout": 10}}}
    (tmp_path / "mcp-servers.json").write_text(json.dumps(servers))
    daemon = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    chat = Chat(tmp_path, config, port, daemon)
    try:
        yield server, chat
    finally:
        chat.close()
        server.kill()


def web_status(chat: Chat) -> dict[str, Any]:
    """The ``web`` entry of GET /api/v1/mcp/servers/status."""
    code, body = chat.request("GET", "/api/v1/mcp/servers/status", None)
    assert code == 200, body
    [entry] = [s for s in body["servers"] if s["name"] == "web"]
    return dict(entry)


def echo_turn(chat: Chat, text: str) -> tuple[float, dict[str, Any]]:
    """A chat turn whose model is told to call web__echo; how long it took and the assistant's message."""
    began = time.monotonic()
    body = chat.ok(chat.send(f'call web__echo {{"message": "{text}"}}'))
    return time.monotonic() - began, dict(body["message"])


def web_tools(chat: Chat) -> list[str]:
    """The function names of web's tools in GET /api/v1/mcp/tools."""
    code, body = chat.request("GET", "/api/v1/mcp/tools", None)
    assert code == 200, body
    return [t["function_name"] for t in body["tools"] if t["server"] == "web"]


@pytest.mark.slow
@pytest.mark.parametrize("everything_daemon", ["streamableHttp", "sse"], indirect=True)
def test_daemon_across_a_server_restart(everything_daemon: tuple[EverythingServer, Chat]) -> None:
    """The real daemon: status and chat tool calls before, while and after server-everything is killed."""
    server, chat = everything_daemon
    wait_until(lambda: web_status(chat)["state"] == "ready", 20, "web to be ready")
    _, before = echo_turn(chat, "before")
    [execution] = before["tool_executions"]
    assert execution["result"] == "Echo: before", execution

    server.kill()
    wait_until(lambda: web_status(chat)["state"] != "ready", 5, "the status to leave ready without a call")
    status = web_status(chat)
    assert status["state"] in ("backing_off", "starting"), status
    assert status["last_error"] and status["tool_count"] == 0, status
    assert web_tools(chat) == [], "a server that is down offers the model no tools"
    took, during = echo_turn(chat, "during")
    assert "no such tool" in during["content"] and "tool_executions" not in during, during
    assert took < 10, f"a turn while the server is down ends promptly ({took:.1f} s)"

    start_blocking(server)
    wait_until(lambda: web_status(chat)["state"] == "ready", 30, "a new session without operator action")
    assert "web__echo" in web_tools(chat)
    _, after = echo_turn(chat, "after")
    [execution] = after["tool_executions"]
    assert execution["result"] == "Echo: after", execution
    status = web_status(chat)
    assert status["restarts"] >= 1 and status["last_error"] is None, status
