"""The stdio transport: an MCP server as a child process speaking newline-delimited JSON-RPC.

:class:`LineFramer` cuts a byte stream into lines with a hard limit. :class:`ServerProcessProtocol` feeds
stdout lines to a :class:`~aichat.mcp.jsonrpc.JSONRPCPeer` and logs stderr line by line.
:class:`StdioConnection` owns one child: it spawns it as the leader of its own process group (through
``setsid``) with a minimal environment, and stops it with the ladder close stdin, SIGTERM to the group,
SIGKILL to the group. Whatever remains of the group when the leader exits is killed, so ``npx`` -> npm ->
node chains leave no orphans. Its lifecycle is an Automat state machine (idle, running, broken, stopping,
exited, ended; see the class); the synchronous stdin write goes through :mod:`aichat.twisted_internals`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from automat import MethodicalMachine
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.jsonfmt import compact
from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import JSONRPCPeer, PeerGone
from aichat.twisted_internals import DirectStdin, direct_stdin

log = Logger()

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
STDERR_MAX_LINE_BYTES = 64 * 1024
INHERITED_ENV = ("PATH", "HOME", "LANG", "USER", "LOGNAME", "SHELL", "TERM")

_SETSID_SHIM = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


class LineTooLong(Exception):
    """A line grew past the framer's limit before its newline arrived."""


class LineFramer:
    """Split a byte stream at ``\\n`` (a trailing ``\\r`` is dropped); lines over ``max_length`` raise.

    Chunks of an unfinished line are kept in a list, so a long line arriving in many chunks is joined once.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the complete, non-empty lines in it."""
        if b"\n" not in data:
            self._size += len(data)
            if self._size > self.max_length:
                self._parts, self._size = [], 0
                raise LineTooLong(f"line exceeds {self.max_length} bytes")
            self._parts.append(data)
            return []
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts, self._size = [], 0
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > self.max_length:
            raise LineTooLong(f"line exceeds {self.max_length} bytes")
        if rest:
            self._parts, self._size = [rest], len(rest)
        out = []
        for line in lines:
            if len(line) > self.max_length:
                raise LineTooLong(f"line exceeds {self.max_length} bytes")
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                out.append(line)
        return out

    def flush(self) -> bytes:
        """Return and forget an unterminated last line."""
        rest = b"".join(self._parts)
        self._parts, self._size = [], 0
        return rest


def child_environment(config_env: Mapping[str, str], base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed variables of ``base_env`` (default: ours) plus the server's own ``env``."""
    base = os.environ if base_env is None else base_env
    env = {key: base[key] for key in INHERITED_ENV if key in base}
    env.update(config_env)
    return env


def group_command(command: str, args: tuple[str, ...]) -> tuple[str, list[str]]:
    """Executable and argv that run ``command`` as the leader of a new session and process group.

    ``setsid`` (util-linux) calls setsid(2) and execs the command, so the child keeps its pid and that pid
    is also its group id. Without ``setsid`` a tiny Python shim does the same.
    """
    setsid = shutil.which("setsid", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setsid is not None:
        return setsid, ["setsid", command, *args]
    return sys.executable, [sys.executable, "-c", _SETSID_SHIM, command, *args]


def describe_exit(reason: Failure) -> str:
    """``exited with status N`` or ``killed by signal N`` for a process-ended failure."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exited with status {value.exitCode}"
    return f"ended: {value}"


def _last_value(values: Iterable[Any]) -> Any:
    """What an input returns: the value of its last output (the Deferred of ``close``)."""
    return list(values)[-1]


class ServerProcessProtocol(ProcessProtocol):
    """Bytes of one child to and from its :class:`StdioConnection`."""

    def __init__(self, connection: StdioConnection, max_line_bytes: int) -> None:
        self._connection = connection
        self._stdout = LineFramer(max_line_bytes)
        self._stderr = LineFramer(STDERR_MAX_LINE_BYTES)

    def outReceived(self, data: bytes) -> None:
        line_received = self._connection.stdout_sink
        if line_received is None:
            return
        try:
            lines = self._stdout.feed(data)
        except LineTooLong as e:
            self._connection.fatal(f"stdout {e}")
            return
        for line in lines:
            line_received(line)

    def errReceived(self, data: bytes) -> None:
        try:
            lines = self._stderr.feed(data)
        except LineTooLong:
            self._stderr.flush()
            lines = [b"(a stderr line longer than %d bytes was dropped)" % STDERR_MAX_LINE_BYTES]
        for line in lines:
            self._connection.stderr_line(line)

    def processExited(self, reason: Failure) -> None:
        self._connection.process_exited(reason)

    def processEnded(self, reason: Failure) -> None:
        rest = self._stderr.flush()
        if rest:
            self._connection.stderr_line(rest)
        self._connection.process_ended()


class StdioConnection:
    """One running MCP server process and the JSON-RPC peer talking to it.

    ``on_lost(reason)`` is called once if the process dies or misbehaves while we did not ask it to stop;
    right after it returns, every pending request fails with :class:`PeerGone` naming the reason.

    The lifecycle is an Automat state machine::

        idle --spawned--> running
        running --violated (overlong line)--> broken: report the loss, start the stop ladder
        running --close--> stopping: fail pending calls, start the stop ladder
        broken --close--> stopping
        running | broken | stopping --leader_exited--> exited: kill the rest of the group (a crash is
                                                       reported unless we were stopping)
        any started state --pipes_closed--> ended: timers cancelled, close() waiters fired

    The stop ladder (stdin closed, SIGTERM to the group after ``stdin_grace``, SIGKILL after
    ``term_grace`` more) runs once, from whichever of running -> broken or running -> stopping came first.
    Where stdin writes and stdout lines go is set on each transition (``stdout_sink`` is None once the
    output can no longer be trusted or is no longer wanted).
    """

    _machine = MethodicalMachine()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        config: ServerConfig,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        base_env: Mapping[str, str] | None = None,
        stdin_grace: float = 1.0,
        term_grace: float = 5.0,
    ) -> None:
        self.config = config
        self.peer = JSONRPCPeer(clock, self._send, name=config.name)
        self.on_lost: Callable[[str], None] | None = None
        self.reachable = False
        self.pid: int | None = None
        self.protocol_version: str | None = None
        #: Where stdout lines go now; None while they are dropped.
        self.stdout_sink: Callable[[bytes], None] | None = None
        self._reactor = reactor
        self._clock = clock
        self._max_line_bytes = max_line_bytes
        self._base_env = base_env
        self._stdin_grace = stdin_grace
        self._term_grace = term_grace
        self._transport: IProcessTransport | None = None
        self._write: Callable[[bytes], None] = self._refuse
        self._direct: DirectStdin | None = None
        self._ended_waiters: list[Deferred[None]] = []
        self._timers: list[IDelayedCall] = []

    # -- states -----------------------------------------------------------------------------------

    @_machine.state(initial=True)
    def _idle(self) -> None:
        """Not started yet."""

    @_machine.state()
    def _running(self) -> None:
        """The child runs and we talk to it."""

    @_machine.state()
    def _broken(self) -> None:
        """The child broke the protocol: the loss is reported, the stop ladder runs, stdout is ignored."""

    @_machine.state()
    def _stopping(self) -> None:
        """We asked the child to stop: the stop ladder runs."""

    @_machine.state()
    def _exited(self) -> None:
        """The leader exited; its pipes (held by a stray grandchild, perhaps) are not all closed yet."""

    @_machine.state(terminal=True)
    def _ended(self) -> None:
        """The child and the rest of its group are gone; every pipe is closed."""

    # -- inputs -----------------------------------------------------------------------------------

    @_machine.input()
    def _spawned(self) -> None:
        """spawnProcess returned the child's transport."""

    @_machine.input()
    def _violated(self, reason: str) -> None:
        """The child broke the protocol beyond repair."""

    @_machine.input()
    def _leader_exited(self, reason: Failure) -> None:
        """The process we spawned exited."""

    @_machine.input()
    def _pipes_closed(self) -> None:
        """Every pipe to the child is closed."""

    @_machine.input()
    def _close(self) -> None:
        """The owner wants the server stopped."""

    @_machine.input()
    def _term_due(self) -> None:
        """The stdin grace is over: time for SIGTERM."""

    @_machine.input()
    def _kill_due(self) -> None:
        """The SIGTERM grace is over: time for SIGKILL."""

    @_machine.input()
    def _force_close_due(self) -> None:
        """The leader exited a while ago and some pipe is still open."""

    # -- outputs ----------------------------------------------------------------------------------

    @_machine.output()
    def _connect_pipes(self) -> None:
        self._direct = direct_stdin(self._transport)
        self._write = self._write_direct if self._direct is not None else self._write_buffered
        self.stdout_sink = self.peer.line_received

    @_machine.output()
    def _log_violation(self, reason: str) -> None:
        log.error("{server}: {reason}; stopping it", server=self.config.name, reason=reason)

    @_machine.output()
    def _report_violation(self, reason: str) -> None:
        self.stdout_sink = None
        self._report_lost(reason)

    @_machine.output()
    def _fail_pending_as_stopping(self) -> None:
        self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r} is stopping"))

    @_machine.output()
    def _start_ladder(self) -> None:
        assert self._transport is not None
        self._write = self._write_buffered
        self._transport.closeStdin()
        self._timers.append(self._clock.callLater(self._stdin_grace, self._term_due))
        self._timers.append(self._clock.callLater(self._stdin_grace + self._term_grace, self._kill_due))

    @_machine.output()
    def _wait_ended(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._ended_waiters.append(waiter)
        return waiter

    @_machine.output()
    def _already_ended(self) -> Deferred[None]:
        return succeed(None)

    @_machine.output()
    def _kill_rest_of_group(self) -> None:
        self._write = self._refuse
        self.stdout_sink = None
        self._signal_group(signal.SIGKILL, quiet=True)

    @_machine.output()
    def _log_exit(self, reason: Failure) -> None:
        log.info("{server}: {how}", server=self.config.name, how=describe_exit(reason))

    @_machine.output()
    def _log_crash(self, reason: Failure) -> None:
        log.error("{server}: server process {how}", server=self.config.name, how=describe_exit(reason))

    @_machine.output()
    def _report_crash(self, reason: Failure) -> None:
        self._report_lost(f"server process {describe_exit(reason)}")

    @_machine.output()
    def _arm_force_close(self) -> None:
        # A grandchild outside the group may still hold stdout open; do not wait on it forever.
        self._timers.append(self._clock.callLater(self._term_grace, self._force_close_due))

    @_machine.output()
    def _send_term(self) -> None:
        self._signal_group(signal.SIGTERM)

    @_machine.output()
    def _send_kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    @_machine.output()
    def _send_kill_quietly(self) -> None:
        self._signal_group(signal.SIGKILL, quiet=True)

    @_machine.output()
    def _force_close(self) -> None:
        assert self._transport is not None
        log.warn("{server}: pipes still open after exit; closing them", server=self.config.name)
        self._transport.loseConnection()

    @_machine.output()
    def _finish(self) -> None:
        self._write = self._refuse
        self.stdout_sink = None
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- transitions ------------------------------------------------------------------------------

    _idle.upon(_spawned, enter=_running, outputs=[_connect_pipes])
    _idle.upon(_close, enter=_idle, outputs=[_already_ended], collector=_last_value)

    _running.upon(_violated, enter=_broken, outputs=[_log_violation, _report_violation, _start_ladder])
    _running.upon(_close, enter=_stopping, outputs=[_fail_pending_as_stopping, _start_ladder, _wait_ended],
                  collector=_last_value)
    _running.upon(_leader_exited, enter=_exited, outputs=[_kill_rest_of_group, _log_crash, _report_crash,
                                                          _arm_force_close])
    _running.upon(_pipes_closed, enter=_ended, outputs=[_finish])

    _broken.upon(_close, enter=_stopping, outputs=[_wait_ended], collector=_last_value)
    _broken.upon(_leader_exited, enter=_exited, outputs=[_kill_rest_of_group, _log_crash, _arm_force_close])
    _broken.upon(_term_due, enter=_broken, outputs=[_send_term])
    _broken.upon(_kill_due, enter=_broken, outputs=[_send_kill])
    _broken.upon(_pipes_closed, enter=_ended, outputs=[_finish])

    _stopping.upon(_violated, enter=_stopping, outputs=[_log_violation])
    _stopping.upon(_close, enter=_stopping, outputs=[_wait_ended], collector=_last_value)
    _stopping.upon(_leader_exited, enter=_exited, outputs=[_kill_rest_of_group, _log_exit, _arm_force_close])
    _stopping.upon(_term_due, enter=_stopping, outputs=[_send_term])
    _stopping.upon(_kill_due, enter=_stopping, outputs=[_send_kill])
    _stopping.upon(_pipes_closed, enter=_ended, outputs=[_finish])

    _exited.upon(_close, enter=_exited, outputs=[_wait_ended], collector=_last_value)
    _exited.upon(_term_due, enter=_exited, outputs=[_send_term])
    _exited.upon(_kill_due, enter=_exited, outputs=[_send_kill_quietly])
    _exited.upon(_force_close_due, enter=_exited, outputs=[_force_close])
    _exited.upon(_pipes_closed, enter=_ended, outputs=[_finish])

    _ended.upon(_close, enter=_ended, outputs=[_already_ended], collector=_last_value)

    # -- the connection's face ----------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child; raises OSError if the command cannot be found or spawned."""
        assert self.config.command is not None
        env = child_environment(self.config.env, self._base_env)
        if shutil.which(self.config.command, path=env.get("PATH", os.defpath)) is None and not (
            self.config.cwd and shutil.which(os.path.join(self.config.cwd, self.config.command))
        ):
            raise FileNotFoundError(f"command not found: {self.config.command}")
        executable, argv = group_command(self.config.command, self.config.args)
        protocol = ServerProcessProtocol(self, self._max_line_bytes)
        self._transport = self._reactor.spawnProcess(
            protocol,
            executable,
            argv,
            env=env,
            path=self.config.cwd,
            usePTY=False,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.pid = self._transport.pid
        self._spawned()
        log.info(
            "{server}: started {command} as pid {pid}",
            server=self.config.name,
            command=self.config.command,
            pid=self.pid,
        )

    def close(self) -> Deferred[None]:
        """Stop the server with the ladder; fires once the process has exited and its pipes are closed."""
        closing: Deferred[None] = self._close()
        return closing

    def fatal(self, reason: str) -> None:
        """The server broke the protocol beyond repair: fail everything, report, and stop the process."""
        self._violated(reason)

    def process_exited(self, reason: Failure) -> None:
        """The leader exited: kill what is left of its group and, unless we stopped it, report a crash."""
        self._leader_exited(reason)

    def process_ended(self) -> None:
        """Every pipe closed: the child and the rest of its group are gone."""
        self._pipes_closed()

    def stderr_line(self, line: bytes) -> None:
        """Log one line the server wrote to stderr."""
        log.info(
            "{server} stderr: {line}",
            server=self.config.name,
            line=line.decode("utf-8", errors="replace"),
            stream="stderr",
        )

    # -- helpers of the outputs ---------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        self._write(compact(message).encode("utf-8") + b"\n")

    def _refuse(self, data: bytes) -> None:
        raise PeerGone(f"MCP server {self.config.name!r} is not running")

    def _write_direct(self, data: bytes) -> None:
        # Nothing queued: write now instead of after the next reactor iteration (half the latency of a
        # sequential call); whatever the pipe does not take goes through the transport's buffer.
        assert self._direct is not None
        rest = self._direct.write(data)
        if rest:
            self._write_buffered(rest)

    def _write_buffered(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _signal_group(self, signum: int, *, quiet: bool = False) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        else:
            if not quiet:
                log.info(
                    "{server}: sent {signal} to process group {pgid}",
                    server=self.config.name,
                    signal=signal.Signals(signum).name,
                    pgid=self.pid,
                )

    def _report_lost(self, reason: str) -> None:
        # The owner learns first, so callers whose calls fail below already see the new state.
        if self.on_lost is not None:
            self.on_lost(reason)
        self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r}: {reason}"))
