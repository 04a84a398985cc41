"""The MCP host service: every configured server supervised, their tools in one table, one call API.

:class:`MCPHost` is what the rest of the daemon uses: ``tools()`` for the model's function list,
``call_tool()`` for the chat layer, ``status()``, ``refresh()`` and ``restart()`` for the HTTP API,
``reload()`` for SIGHUP. It is the daemon's ``mcp`` service, a child of
:class:`~aichat.daemon.AichatService` started after the store and stopped after the chat service (so the
tools of cancelled turns are still there while those turns end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.mcp.config import ServerConfig
from aichat.mcp.registry import ServerTools, Tool, ToolNotFound, ToolRegistry, function_name_prefix
from aichat.mcp.session import ToolResult
from aichat.mcp.stdio import DEFAULT_MAX_LINE_BYTES, StdioConnection
from aichat.mcp.supervisor import Connection, Connector, ServerSupervisor, State, ToolCallError
from aichat.metrics import Metrics

log = Logger()


class UnknownServer(KeyError):
    """No server has this name."""

    def __str__(self) -> str:
        return f"unknown MCP server: {self.args[0]}" if self.args else "unknown MCP server"


class MCPHost(Service):
    """Starts, supervises and stops the configured MCP servers and routes tool calls to them.

    ``reactor`` must also provide ``IReactorTime``; ``http_client`` is treq or a treq-like object
    (``StubTreq`` in tests) for the ``http`` and ``sse`` transports. ``connector`` replaces the transports
    (tests); the grace periods and the first backoff delay are tunable for tests.
    """

    name = "mcp"

    def __init__(
        self,
        reactor: IReactorProcess,
        servers: Sequence[ServerConfig],
        *,
        http_client: Any = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        connector: Connector | None = None,
        stdin_grace: float = 1.0,
        term_grace: float = 5.0,
        initial_backoff: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._reactor = reactor
        self._metrics = metrics if metrics is not None else Metrics()
        self._metrics.mcp_servers.servers = lambda: list(self._supervisors.values())
        self._clock = IReactorTime(reactor)
        self._http_client = http_client
        self._max_line_bytes = max_line_bytes
        self._stdin_grace = stdin_grace
        self._term_grace = term_grace
        self._initial_backoff = initial_backoff
        self._connector: Connector = connector if connector is not None else self._connect
        self._registry = ToolRegistry()
        self._supervisors: dict[str, ServerSupervisor] = {}
        self._ready_waiters: list[Deferred[None]] = []
        self._retiring: set[Deferred[None]] = set()
        for config in servers:
            self._supervisors[config.name] = self._supervisor(config)

    def _supervisor(self, config: ServerConfig) -> ServerSupervisor:
        return ServerSupervisor(
            self._clock, config, self._connector, on_change=self._changed, initial_backoff=self._initial_backoff
        )

    async def _connect(self, config: ServerConfig) -> Connection:
        if config.transport == "stdio":
            connection = StdioConnection(
                self._reactor,
                self._clock,
                config,
                max_line_bytes=self._max_line_bytes,
                stdin_grace=self._stdin_grace,
                term_grace=self._term_grace,
            )
            connection.start()
            return connection
        from aichat.mcp.http import connect_remote

        return await connect_remote(self._clock, config, self._http_client, max_bytes=self._max_line_bytes)

    def startService(self) -> None:
        """Start every enabled server in parallel and return at once."""
        super().startService()
        for supervisor in self._supervisors.values():
            if supervisor.config.enabled:
                supervisor.start()
        self._check_ready()

    def stopService(self) -> Deferred[None]:
        """Stop every server with the stop ladder; fires when all children are gone."""
        super().stopService()
        stops = [supervisor.stop() for supervisor in self._supervisors.values()]
        stops.extend(self._retiring)
        return DeferredList(stops).addCallback(lambda _: None)

    def configs(self) -> list[ServerConfig]:
        """The configuration in force, in order."""
        return [supervisor.config for supervisor in self._supervisors.values()]

    def tools(self) -> list[Tool]:
        """The model-facing tools of every ready server, in deterministic order."""
        return self._registry.tools()

    def timeout_for(self, function_name: str) -> float:
        """The per-call timeout of the server behind ``function_name`` (also while that server is down)."""
        try:
            tool = self._registry.lookup(function_name)
        except ToolNotFound:
            for supervisor in self._supervisors.values():
                if function_name.startswith(function_name_prefix(supervisor.name)):
                    return supervisor.config.timeout
            raise
        return self._supervisors[tool.server].config.timeout

    async def call_tool(self, function_name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call a tool by its model-facing name.

        Raises :class:`ToolNotFound`, or :class:`~aichat.mcp.supervisor.ToolCallError` when the server is not
        ready, crashes, times out or answers a protocol error. A tool's own failure (``isError``) is a
        result with ``is_error``. Cancelling the caller sends ``notifications/cancelled`` to the server.
        """
        started = self._clock.seconds()
        # A name the model made up is counted as "unknown": labels never take the model's (or a client's) words.
        server, tool_name, outcome, error_type = "unknown", "unknown", "error", "not_found"
        try:
            if not isinstance(arguments, dict):
                raise ToolCallError(
                    f"arguments of {function_name} must be a JSON object, not {type(arguments).__name__}"
                )
            try:
                tool = self._registry.lookup(function_name)
            except ToolNotFound:
                self._raise_if_server_down(function_name)
                raise
            supervisor = self._supervisors.get(tool.server)
            if supervisor is None:
                raise ToolNotFound(function_name)
            server, tool_name, error_type = tool.server, tool.name, "tool_call_error"
            result = await supervisor.call_tool(tool.name, arguments)
            outcome, error_type = ("tool_error", "tool_error") if result.is_error else ("ok", "")
            return result
        except CancelledError:
            outcome, error_type = "cancelled", "cancelled"
            raise
        finally:
            metrics = self._metrics
            metrics.tool_calls.labels(server, tool_name, outcome).inc()
            metrics.tool_duration.labels("tools/call", server, tool_name, error_type).observe(
                self._clock.seconds() - started
            )

    def _raise_if_server_down(self, function_name: str) -> None:
        """A tool of a known server that is not ready: say so, rather than "not found"."""
        for supervisor in self._supervisors.values():
            prefix = function_name_prefix(supervisor.name)
            if function_name.startswith(prefix) and supervisor.state is not State.READY:
                state = supervisor.state.value
                reason = f": {supervisor.last_error}" if supervisor.last_error else ""
                raise ToolCallError(f"MCP server {supervisor.name!r} is not ready ({state}){reason}")

    def status(self) -> list[dict[str, Any]]:
        """One entry per configured server, in configuration order."""
        out = []
        for supervisor in self._supervisors.values():
            info = supervisor.info
            uptime = supervisor.uptime
            out.append(
                {
                    "name": supervisor.name,
                    "description": supervisor.config.description,
                    "transport": supervisor.config.transport,
                    "enabled": supervisor.config.enabled,
                    "state": supervisor.state.value,
                    "protocol_version": info.protocol_version if info is not None else None,
                    "server_info": dict(info.server_info) if info is not None else None,
                    "tool_count": len(supervisor.tools) if supervisor.state is State.READY else 0,
                    "pid": supervisor.pid,
                    "restarts": supervisor.restarts,
                    "last_error": supervisor.last_error,
                    "uptime_seconds": round(uptime, 3) if uptime is not None else None,
                }
            )
        return out

    async def refresh(self) -> None:
        """Re-list the tools of every ready server; start failed and backing-off enabled servers now."""
        pending = [
            Deferred.fromCoroutine(supervisor.refresh_tools())
            for supervisor in self._supervisors.values()
            if supervisor.config.enabled
        ]
        await gatherResults(pending, consumeErrors=True)

    async def restart(self, name: str) -> None:
        """Restart one server now (backoff reset); raises :class:`UnknownServer`."""
        supervisor = self._supervisors.get(name)
        if supervisor is None:
            raise UnknownServer(name)
        await supervisor.restart()

    def reload(self, servers: Sequence[ServerConfig]) -> None:
        """Apply a new configuration: start added, stop removed, restart changed, leave unchanged alone."""
        old = self._supervisors
        new: dict[str, ServerSupervisor] = {}
        for config in servers:
            current = old.get(config.name)
            if current is not None and current.config == config:
                new[config.name] = current
                continue
            if current is not None:
                log.info("{server}: configuration changed; restarting", server=config.name)
                current.on_change = None
                self._retire(current)
            else:
                log.info("{server}: added", server=config.name)
            supervisor = self._supervisor(config)
            new[config.name] = supervisor
            if self.running and config.enabled:
                supervisor.start()
        for name, supervisor in old.items():
            if name not in new:
                log.info("{server}: removed; stopping", server=name)
                supervisor.on_change = None
                self._retire(supervisor)
        self._supervisors = new
        self._rebuild()
        self._check_ready()

    def _retire(self, supervisor: ServerSupervisor) -> None:
        """Stop a server that left the configuration; stopService still waits for it."""
        stopping = supervisor.stop()
        self._retiring.add(stopping)
        stopping.addBoth(lambda _: self._retiring.discard(stopping))

    def wait_ready(self, timeout: float) -> Deferred[None]:
        """Fire once no enabled server is ``starting``; fail with TimeoutError after ``timeout`` seconds."""
        if self._all_settled():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        timer: IDelayedCall = self._clock.callLater(timeout, self._ready_timeout, waiter, timeout)
        waiter.addBoth(_cancel_timer, timer)
        return waiter

    def supervisor(self, name: str) -> ServerSupervisor:
        """The supervisor of one server (tests and diagnostics); raises :class:`UnknownServer`."""
        try:
            return self._supervisors[name]
        except KeyError:
            raise UnknownServer(name) from None

    def _ready_timeout(self, waiter: Deferred[None], timeout: float) -> None:
        if waiter in self._ready_waiters:
            self._ready_waiters.remove(waiter)
            starting = [s.name for s in self._supervisors.values() if s.state is State.STARTING]
            waiter.errback(Failure(TimeoutError(f"MCP servers still starting after {timeout:g} s: {starting}")))

    def _changed(self, supervisor: ServerSupervisor) -> None:
        self._rebuild()
        self._check_ready()

    def _rebuild(self) -> None:
        self._registry.rebuild(
            ServerTools(s.name, s.tools, s.config.tools_allow, s.config.tools_deny)
            for s in self._supervisors.values()
            if s.state is State.READY
        )

    def _all_settled(self) -> bool:
        return not self.running or not any(
            s.config.enabled and s.state is State.STARTING for s in self._supervisors.values()
        )

    def _check_ready(self) -> None:
        if self._ready_waiters and self._all_settled():
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)


def _cancel_timer(result: object, timer: IDelayedCall) -> object:
    if timer.active():
        timer.cancel()
    return result
