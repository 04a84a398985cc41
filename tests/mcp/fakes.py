"""Fake MCP connections for supervisor and host tests: a scripted server behind a real JSON-RPC peer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import JSONRPCPeer, PeerGone

Handler = Callable[[dict[str, Any]], Any]
NO_ANSWER = object()


def tool(name: str) -> dict[str, Any]:
    """A minimal tool description."""
    return {"name": name, "description": f"{name} tool", "inputSchema": {"type": "object"}}


class FakeProcessTransport(StringTransport):
    """What spawnProcess returns: stdin bytes collected, a pid no process can have (above pid_max)."""

    pid = 2**22 + 4242

    def __init__(self) -> None:
        super().__init__()
        self.stdin_closed = False

    def closeStdin(self) -> None:
        """Remember that stdin was closed."""
        self.stdin_closed = True


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """A memory reactor that records spawnProcess calls and returns fake process transports."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[tuple[Any, ...], dict[str, Any], FakeProcessTransport]] = []

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        """Record the call; the protocol gets a fake transport."""
        transport = FakeProcessTransport()
        self.spawned.append((args, kwargs, transport))
        args[0].makeConnection(transport)
        return transport


class FakeConnection:
    """A connection whose server answers from ``handlers`` (method -> params -> result, or NO_ANSWER)."""

    def __init__(self, clock: IReactorTime, tools: list[dict[str, Any]] | None = None, version: str = "2025-06-18"):
        self.peer = JSONRPCPeer(clock, self._send, name="fake")
        self.pid: int | None = 4242
        self.on_lost: Callable[[str], None] | None = None
        self.reachable = False
        self.protocol_version: str | None = None
        self.closed = False
        self.crashed = False
        self.sent: list[dict[str, Any]] = []
        self.unanswered: list[dict[str, Any]] = []
        self.tools = tools if tools is not None else [tool("echo")]
        self.handlers: dict[str, Handler] = {
            "initialize": lambda p: {
                "protocolVersion": version,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "fake", "version": "1"},
            },
            "tools/list": lambda p: {"tools": self.tools},
            "tools/call": lambda p: {"content": [{"type": "text", "text": f"called {p['name']}"}]},
        }

    def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        method = message.get("method")
        if "id" not in message or method is None:
            return
        handler = self.handlers.get(method)
        if handler is None:
            self.peer.message_received({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601,
                                                                                          "message": "nope"}})
            return
        result = handler(message.get("params") or {})
        if result is NO_ANSWER:
            self.unanswered.append(message)
        else:
            self.peer.message_received({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def notifications(self, method: str) -> list[Any]:
        """Params of every notification we sent with ``method``."""
        return [m.get("params") for m in self.sent if m.get("method") == method and "id" not in m]

    def crash(self, reason: str = "server process killed by signal 9") -> None:
        """What a transport does when the server dies: report, then fail everything with the reason."""
        self.crashed = True
        if self.on_lost is not None:
            self.on_lost(reason)
        self.peer.fail_all(PeerGone(reason))

    def close(self) -> Deferred[None]:
        """Stop: everything pending fails."""
        self.closed = True
        if not self.crashed:
            self.peer.fail_all(PeerGone("stopping"))
        return succeed(None)


class FakeConnector:
    """Hands out a new FakeConnection per start (configured by ``prepare``), or raises ``error``."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.connections: list[FakeConnection] = []
        self.configs: list[ServerConfig] = []
        self.error: Exception | None = None
        self.prepare: Callable[[FakeConnection], None] | None = None

    async def __call__(self, config: ServerConfig) -> FakeConnection:
        self.configs.append(config)
        if self.error is not None:
            raise self.error
        connection = FakeConnection(self.clock)
        if self.prepare is not None:
            self.prepare(connection)
        self.connections.append(connection)
        return connection

    @property
    def last(self) -> FakeConnection:
        """The most recent connection."""
        return self.connections[-1]
