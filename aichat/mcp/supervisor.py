"""Keep one MCP server usable: start it, watch it, restart it with backoff, stop it.

The lifecycle is an Automat state machine (:class:`ServerSupervisor`; magic-wormhole's nameplate
machine is the model)::

    stopped --start--> starting --handshake and tool list--> ready
    starting --failure--> backing_off --delay--> starting
    starting --unsupported protocol version--> failed
    ready --crash / overlong line / unreachable--> backing_off
    ready --session lost while the server answers--> starting (at once, if it was ready >= 1 s)
    any --stop--> stopping --children gone, bring-up settled--> stopped

Events that arrive in a state that no longer expects them (a connection lost after a stop, the result of a
bring-up a stop cancelled, a connection handed over after one) are ignored by the machine, or closed;
a dropped connection's ``on_lost`` is unhooked, so it cannot report into a later session.

The delay starts at 1 s and doubles to 60 s; it goes back to 1 s once a server has stayed ready for 60 s.
A remote server that forgot our session (it restarted) is asked for a new one at once, as the MCP
specification wants; one that loses it again within the first backoff delay of readiness waits like a
crash, so a server that never keeps a session cannot make us spin. A crash fails every in-flight call at
once (the transport fails its peer before telling us). A call the server refused unread
(:class:`~aichat.mcp.jsonrpc.NotDelivered`) is sent once more on the next session, if that is ready
within the call's timeout. The transport is reached through a *connector*, so the logic is tested with a
Clock and fake connections.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from automat import MethodicalMachine
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import JSONRPCPeer, NotDelivered, PeerGone, RequestTimeout, RPCError
from aichat.mcp.session import MCPSession, ProtocolVersionError, ServerInfo, ToolResult

log = Logger()


class State(enum.Enum):
    """Where a server is in its lifecycle (the value is what status reports)."""

    STARTING = "starting"
    READY = "ready"
    BACKING_OFF = "backing_off"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Connection(Protocol):
    """A live transport to one server: its JSON-RPC peer and a way to close it.

    ``reachable`` is read when ``on_lost`` is called: True if the server still answers and only the
    session is gone.
    """

    peer: JSONRPCPeer
    pid: int | None
    on_lost: Callable[[str], None] | None
    protocol_version: str | None
    reachable: bool

    def close(self) -> Deferred[None]:
        """Stop the server or session; fires when it is gone."""


Connector = Callable[[ServerConfig], Awaitable[Connection]]


def _last_value(values: Iterable[Any]) -> Any:
    """What an input returns: the value of its last output (the session adopted, or None)."""
    return list(values)[-1]


class ToolCallError(Exception):
    """A tool could not be called: server not ready, crashed, timed out, or answered a JSON-RPC error."""


class ServerSupervisor:
    """The lifecycle of one configured server, as an Automat state machine (see the module docstring).

    Every event from outside (a start or stop asked for, the connector's connection, the handshake's
    end, the connection's loss, the retry timer) is an input; the machine's state decides what it means,
    so a late event (a connection lost after a stop, a bring-up cancelled by one) has no effect without
    any counter to compare. ``state`` is the public name of the machine's state, announced on change.
    """

    _machine = MethodicalMachine()

    def __init__(
        self,
        clock: IReactorTime,
        config: ServerConfig,
        connect: Connector,
        *,
        on_change: Callable[[ServerSupervisor], None] | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        reset_after: float = 60.0,
    ) -> None:
        self.config = config
        self.state = State.STOPPED
        self.tools: list[dict[str, Any]] = []
        self.info: ServerInfo | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.on_change = on_change
        self._clock = clock
        self._connect = connect
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._reset_after = reset_after
        self._backoff = initial_backoff
        self._connection: Connection | None = None
        self._session: MCPSession | None = None
        self._bring_up: Deferred[None] | None = None
        self._retry_timer: IDelayedCall | None = None
        self._ready_since: float | None = None
        self._listing = False
        self._relist_wanted = False
        self._closing: set[Connection] = set()
        self._outcome_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []

    # -- states -----------------------------------------------------------------------------------

    @_machine.state(initial=True)
    def _stopped(self) -> None:
        """Not running, nothing outstanding."""

    @_machine.state()
    def _starting(self) -> None:
        """A bring-up (connect, initialize, tools/list) is under way, bounded by init_timeout."""

    @_machine.state()
    def _ready(self) -> None:
        """Connected, with its tools listed."""

    @_machine.state()
    def _backing_off(self) -> None:
        """Waiting for the retry timer after a failed start or a crash."""

    @_machine.state()
    def _failed(self) -> None:
        """Refused for good (unsupported protocol version) until started again by hand."""

    @_machine.state()
    def _stopping(self) -> None:
        """Stopped; waiting for the connections still closing and the cancelled bring-up to settle."""

    # -- inputs -----------------------------------------------------------------------------------

    @_machine.input()
    def _start_asked(self) -> None:
        """start(), restart() or refresh asked for the server."""

    @_machine.input()
    def _retry_due(self) -> None:
        """The backoff delay is over."""

    @_machine.input()
    def _connected(self, connection: Connection) -> None:
        """The connector handed over a connection."""

    @_machine.input()
    def _handshake_done(self, tools: list[dict[str, Any]]) -> None:
        """initialize and tools/list succeeded."""

    @_machine.input()
    def _start_failed(self, reason: str) -> None:
        """The bring-up failed or timed out; worth retrying."""

    @_machine.input()
    def _start_refused(self, reason: str) -> None:
        """The bring-up failed in a way retrying cannot mend."""

    @_machine.input()
    def _crashed(self, reason: str) -> None:
        """The connection was lost (process died, overlong line, server unreachable)."""

    @_machine.input()
    def _session_lost(self, reason: str) -> None:
        """The server still answers but forgot our session."""

    @_machine.input()
    def _stop_and_wait(self) -> None:
        """stop() with a connection open or closing, or a bring-up under way."""

    @_machine.input()
    def _halt(self) -> None:
        """stop() with nothing to wait for."""

    @_machine.input()
    def _settled(self) -> None:
        """The last closing connection closed and no bring-up is under way."""

    # -- outputs ----------------------------------------------------------------------------------

    @_machine.output()
    def _begin_attempt(self) -> None:
        self._cancel_retry()
        self.info = None
        self.tools = []
        self._set_state(State.STARTING)
        bring_up = Deferred.fromCoroutine(self._bring_up_once())
        bring_up.addTimeout(self.config.init_timeout, self._clock)

        def finished(result: object) -> None:
            self._bring_up = None
            if isinstance(result, Failure):
                # Outside ``starting`` (a stop cancelled the bring-up) the machine ignores these.
                if result.check(defer.TimeoutError):
                    self._start_failed(f"not ready within init_timeout {self.config.init_timeout:g} s")
                elif result.check(ProtocolVersionError):
                    self._start_refused(_describe(result))
                else:
                    self._start_failed(_describe(result))
            self._settle_if_idle()

        if not bring_up.called:
            self._bring_up = bring_up
        bring_up.addBoth(finished)

    @_machine.output()
    def _adopt(self, connection: Connection) -> MCPSession:
        self._connection = connection
        connection.on_lost = lambda reason: self._connection_lost(reason, connection.reachable)

        def negotiated(version: str) -> None:
            connection.protocol_version = version

        session = MCPSession(
            connection.peer, name=self.name, on_tools_changed=self._tools_changed, on_negotiated=negotiated
        )
        self._session = session
        return session

    @_machine.output()
    def _discard(self, connection: Connection) -> None:
        self._close(connection)

    @_machine.output()
    def _become_ready(self, tools: list[dict[str, Any]]) -> None:
        self.tools = tools
        self.last_error = None
        self._ready_since = self._clock.seconds()
        log.info(
            "{server}: ready ({version}, {count} tools)",
            server=self.name,
            version=self.info.protocol_version if self.info is not None else None,
            count=len(tools),
        )
        self._set_state(State.READY)
        self._settle_waiters()
        if self._relist_wanted:
            self._tools_changed()

    @_machine.output()
    def _record_error(self, reason: str) -> None:
        self.last_error = reason

    @_machine.output()
    def _log_start_failure(self, reason: str) -> None:
        log.error("{server}: start failed: {reason}", server=self.name, reason=reason)

    @_machine.output()
    def _log_loss(self, reason: str) -> None:
        uptime = self.uptime or 0.0
        if uptime >= self._reset_after:
            self._backoff = self._initial_backoff
        log.error("{server}: lost after {uptime:.1f} s: {reason}", server=self.name, uptime=uptime, reason=reason)

    @_machine.output()
    def _drop(self) -> None:
        self._drop_connection()

    @_machine.output()
    def _schedule_retry(self) -> None:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)
        self.restarts += 1
        self._set_state(State.BACKING_OFF)
        log.info("{server}: restarting in {delay:g} s", server=self.name, delay=delay)
        self._retry_timer = self._clock.callLater(delay, self._retry_due)

    @_machine.output()
    def _now_failed(self) -> None:
        self._set_state(State.FAILED)

    @_machine.output()
    def _count_new_session(self) -> None:
        self.restarts += 1
        log.info("{server}: the server answers; starting a new session now", server=self.name)

    @_machine.output()
    def _wake_waiters(self) -> None:
        self._settle_waiters()

    @_machine.output()
    def _abandon(self) -> None:
        self._cancel_retry()
        self._settle_waiters()

    @_machine.output()
    def _cancel_bring_up(self) -> None:
        if self._bring_up is not None:
            self._bring_up.cancel()

    @_machine.output()
    def _now_stopping(self) -> None:
        self._set_state(State.STOPPING)

    @_machine.output()
    def _now_stopped(self) -> None:
        self._set_state(State.STOPPED)
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- transitions ------------------------------------------------------------------------------

    for _idle in (_stopped, _backing_off, _failed):
        _idle.upon(_start_asked, enter=_starting, outputs=[_begin_attempt])
        _idle.upon(_halt, enter=_stopped, outputs=[_abandon, _now_stopped])
        _idle.upon(_stop_and_wait, enter=_stopping, outputs=[_abandon, _now_stopping, _cancel_bring_up, _drop])
        _idle.upon(_settled, enter=_idle)
    _backing_off.upon(_retry_due, enter=_starting, outputs=[_begin_attempt])

    _starting.upon(_start_asked, enter=_starting)
    _starting.upon(_connected, enter=_starting, outputs=[_adopt], collector=_last_value)
    _starting.upon(_handshake_done, enter=_ready, outputs=[_become_ready])
    _starting.upon(_start_failed, enter=_backing_off,
                   outputs=[_record_error, _log_start_failure, _drop, _schedule_retry, _wake_waiters])
    _starting.upon(_start_refused, enter=_failed,
                   outputs=[_record_error, _log_start_failure, _drop, _now_failed, _wake_waiters])
    # Lost during the handshake: the bring-up fails by itself (its requests fail), with this reason noted.
    _starting.upon(_crashed, enter=_starting, outputs=[_record_error])
    _starting.upon(_session_lost, enter=_starting, outputs=[_record_error])
    _starting.upon(_halt, enter=_stopped, outputs=[_abandon, _now_stopped])
    _starting.upon(_stop_and_wait, enter=_stopping, outputs=[_abandon, _now_stopping, _cancel_bring_up, _drop])
    _starting.upon(_settled, enter=_starting)

    _ready.upon(_start_asked, enter=_ready)
    _ready.upon(_crashed, enter=_backing_off, outputs=[_record_error, _log_loss, _drop, _schedule_retry])
    _ready.upon(_session_lost, enter=_starting,
                outputs=[_record_error, _log_loss, _drop, _count_new_session, _begin_attempt])
    _ready.upon(_stop_and_wait, enter=_stopping, outputs=[_abandon, _now_stopping, _cancel_bring_up, _drop])
    _ready.upon(_settled, enter=_ready)

    _stopping.upon(_start_asked, enter=_stopping)
    _stopping.upon(_stop_and_wait, enter=_stopping, outputs=[_drop])
    _stopping.upon(_halt, enter=_stopped, outputs=[_now_stopped])
    _stopping.upon(_settled, enter=_stopped, outputs=[_now_stopped])

    # Events of a bring-up that a stop overtook: its connection is closed, its outcome ignored.
    for _done in (_stopped, _stopping):
        _done.upon(_connected, enter=_done, outputs=[_discard], collector=_last_value)
        _done.upon(_handshake_done, enter=_done)
        _done.upon(_start_failed, enter=_done)
        _done.upon(_start_refused, enter=_done)
    del _idle, _done

    @property
    def name(self) -> str:
        """The server's configured name."""
        return self.config.name

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs (stdio only)."""
        return self._connection.pid if self._connection is not None else None

    @property
    def state_name(self) -> str:
        """The state as status and the metrics report it."""
        return self.state.value

    @property
    def tool_count(self) -> int:
        """How many tools the server offers now (none unless it is ready)."""
        return len(self.tools) if self.state is State.READY else 0

    @property
    def uptime(self) -> float | None:
        """Seconds since the server became ready, while it is ready."""
        return None if self._ready_since is None else self._clock.seconds() - self._ready_since

    def start(self) -> None:
        """Start now unless already starting, ready or stopping; a pending retry is brought forward."""
        self._start_asked()

    def stop(self) -> Deferred[None]:
        """Stop the server (stop ladder for a child); fires when every process it started is gone.

        Safe to call repeatedly; also waits for connections still closing after earlier failures and for
        a cancelled bring-up to settle.
        """
        if self._connection is not None or self._closing or self._bring_up is not None:
            self._stop_and_wait()
        else:
            self._halt()
        if self.state is State.STOPPED:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    async def restart(self) -> None:
        """Stop (if running), start again at once with the backoff reset, and wait for ready or failure."""
        await self.stop()
        self._backoff = self._initial_backoff
        self._start_asked()
        await self._started()

    async def _started(self) -> None:
        """Wait for the current bring-up to end (its outcome is in ``state`` and ``last_error``)."""
        bring_up = self._bring_up
        if bring_up is None:
            return
        waiter: Deferred[None] = Deferred()

        def ended(result: object) -> object:
            waiter.callback(None)
            return result

        bring_up.addBoth(ended)
        await waiter

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> ToolResult:
        """Call ``tool`` with the configured per-call timeout; failures become :class:`ToolCallError`.

        A call the server refused unread because it no longer knew our session (it restarted) is sent once
        more on the new session, within the same timeout.
        """
        session = self._session
        if self.state is not State.READY or session is None:
            detail = f": {self.last_error}" if self.last_error and self.state is not State.STARTING else ""
            raise ToolCallError(f"MCP server {self.name!r} is not ready ({self.state.value}){detail}")
        deadline = self._clock.seconds() + self.config.timeout
        try:
            try:
                return await session.call_tool(tool, arguments, time_limit=self.config.timeout)
            except NotDelivered as e:
                log.info("{server}: {tool} was not delivered ({error}); resending on a new session",
                         server=self.name, tool=tool, error=str(e))
                session = await self._next_session(session, deadline, tool, e)
                remaining = max(deadline - self._clock.seconds(), 0.001)
                return await session.call_tool(tool, arguments, time_limit=remaining)
        except CancelledError:
            raise
        except RequestTimeout:
            raise ToolCallError(
                f"tool {tool!r} of MCP server {self.name!r} timed out after {self.config.timeout:g} s"
            ) from None
        except PeerGone as e:
            raise ToolCallError(f"tool {tool!r} failed: {e}") from None
        except RPCError as e:
            raise ToolCallError(f"tool {tool!r} of MCP server {self.name!r} failed: {e}") from None
        except ToolCallError:
            raise
        except Exception as e:
            raise ToolCallError(f"tool {tool!r} of MCP server {self.name!r} failed: {e}") from e

    async def _next_session(self, old: MCPSession, deadline: float, tool: str, cause: Exception) -> MCPSession:
        """The session that replaced ``old``, if the next bring-up makes one before ``deadline``.

        Waits for one bring-up at most: a server still down then is reported, not waited for.
        """
        if self._session is old or self.state is not State.READY:
            remaining = deadline - self._clock.seconds()
            retry_at = self._retry_timer.getTime() if self._retry_timer is not None else None
            too_late = self.state is State.BACKING_OFF and retry_at is not None and retry_at >= deadline
            if remaining > 0 and not too_late and self.state not in (State.FAILED, State.STOPPING, State.STOPPED):
                await self._outcome(remaining)
        session = self._session
        if self.state is State.READY and session is not None and session is not old:
            return session
        detail = f": {self.last_error}" if self.last_error and self.last_error not in str(cause) else ""
        raise ToolCallError(f"tool {tool!r} was not run: {cause}; not ready again ({self.state.value}){detail}")

    async def _outcome(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until a bring-up ends, or the server stops."""
        waiter: Deferred[None] = Deferred(lambda d: self._outcome_waiters.remove(d))
        self._outcome_waiters.append(waiter)

        def give_up() -> None:
            if waiter in self._outcome_waiters:
                self._outcome_waiters.remove(waiter)
                waiter.callback(None)

        timer = self._clock.callLater(within, give_up)
        try:
            await waiter
        finally:
            if timer.active():
                timer.cancel()

    def _settle_waiters(self) -> None:
        waiters, self._outcome_waiters = self._outcome_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def refresh_tools(self) -> None:
        """Re-list the tools of a ready server; retry a failed or backing-off one now and wait for it."""
        if self.state in (State.FAILED, State.BACKING_OFF):
            self.start()
        if self.state is State.STARTING:
            await self._started()
            return
        if self.state is State.READY:
            await self._relist()

    async def _bring_up_once(self) -> None:
        connection = await self._connect(self.config)
        session: MCPSession | None = self._connected(connection)
        if session is None:
            return
        # The init_timeout timer of _begin_attempt bounds the whole bring-up, these requests included.
        self.info = await session.initialize()
        self._relist_wanted = False
        tools = await session.list_tools()
        self._handshake_done(tools)

    def _connection_lost(self, reason: str, reachable: bool) -> None:
        """The current connection's ``on_lost``: a session to renew at once, or a crash to back off from."""
        uptime = self.uptime or 0.0
        if reachable and uptime >= self._initial_backoff:
            self._session_lost(reason)
        else:
            self._crashed(reason)

    def _drop_connection(self) -> None:
        connection, self._connection, self._session = self._connection, None, None
        self._ready_since = None
        self.tools = []
        if connection is not None:
            connection.on_lost = None
            self._close(connection)

    def _close(self, connection: Connection) -> None:
        if connection in self._closing:
            return
        self._closing.add(connection)
        closing = connection.close()

        def closed(result: object) -> None:
            self._closing.discard(connection)
            if isinstance(result, Failure):
                log.failure("{server}: error while closing", result, server=self.name)
            self._settle_if_idle()

        closing.addBoth(closed)

    def _settle_if_idle(self) -> None:
        if self._connection is None and not self._closing and self._bring_up is None:
            self._settled()

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
        self._retry_timer = None

    def _tools_changed(self) -> None:
        if self.state is not State.READY:
            self._relist_wanted = True
            return
        Deferred.fromCoroutine(self._relist()).addErrback(
            lambda f: None if f.check(CancelledError) else log.failure("relist", f)
        )

    async def _relist(self) -> None:
        self._relist_wanted = True
        if self._listing:
            return
        self._listing = True
        try:
            while self._relist_wanted and self.state is State.READY and self._session is not None:
                self._relist_wanted = False
                session = self._session
                try:
                    tools = await session.list_tools(time_limit=self.config.timeout)
                except CancelledError:
                    raise
                except Exception as e:
                    log.warn("{server}: tools/list failed: {error}", server=self.name, error=_describe(Failure(e)))
                    return
                if session is self._session:
                    self.tools = tools
                    log.info("{server}: tool list now has {count} tools", server=self.name, count=len(tools))
                    self._notify()
        finally:
            self._listing = False

    def _set_state(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.failure("{server}: change listener failed", server=self.name)


def _describe(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, OSError) and value.strerror:
        return f"{value.strerror}"
    return str(value) or type(value).__name__
