"""The stdio transport: an MCP server as a child process speaking newline-delimited JSON-RPC.

:class:`LineFramer` cuts a byte stream into lines with a hard limit. :class:`ServerProcessProtocol` feeds
stdout lines to a :class:`~aichat.mcp.jsonrpc.JSONRPCPeer` and logs stderr line by line.
:class:`StdioConnection` owns one child: it spawns it as the leader of its own process group (through
``setsid``) with a minimal environment, and stops it with the ladder close stdin, SIGTERM to the group,
SIGKILL to the group. Whatever remains of the group when the leader exits is killed, so ``npx`` -> npm ->
node chains leave no orphans.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.jsonfmt import compact
from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import JSONRPCPeer, PeerGone

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


class ServerProcessProtocol(ProcessProtocol):
    """Bytes of one child to and from its :class:`StdioConnection`."""

    def __init__(self, connection: StdioConnection, max_line_bytes: int) -> None:
        self._connection = connection
        self._stdout = LineFramer(max_line_bytes)
        self._stderr = LineFramer(STDERR_MAX_LINE_BYTES)

    def outReceived(self, data: bytes) -> None:
        if self._connection.broken:
            return
        try:
            lines = self._stdout.feed(data)
        except LineTooLong as e:
            self._connection.fatal(f"stdout {e}")
            return
        line_received = self._connection.peer.line_received
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
    """

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
        self._reactor = reactor
        self._clock = clock
        self._max_line_bytes = max_line_bytes
        self._base_env = base_env
        self._stdin_grace = stdin_grace
        self._term_grace = term_grace
        self._transport: IProcessTransport | None = None
        self._stdin_writer: Any = None
        self._exited = False
        self._ended = False
        self._lost = False
        self._closing = False
        self._laddering = False
        self._ended_waiters: list[Deferred[None]] = []
        self._timers: list[IDelayedCall] = []

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
        writer = getattr(self._transport, "pipes", {}).get(0)
        if all(hasattr(writer, name) for name in ("fd", "offset", "dataBuffer", "_tempDataBuffer")):
            self._stdin_writer = writer
        log.info(
            "{server}: started {command} as pid {pid}",
            server=self.config.name,
            command=self.config.command,
            pid=self.pid,
        )

    def _send(self, message: dict[str, Any]) -> None:
        if self._transport is None or self._exited:
            raise PeerGone(f"MCP server {self.config.name!r} is not running")
        data = compact(message).encode("utf-8") + b"\n"
        writer = self._stdin_writer
        if writer is not None and not writer._tempDataBuffer and writer.offset >= len(writer.dataBuffer):
            # Nothing queued: write now instead of after the next reactor iteration (half the latency of
            # a sequential call); whatever the pipe does not take goes through the transport's buffer.
            try:
                written = os.write(writer.fd, data)
            except OSError:
                written = 0
            data = data[written:]
            if not data:
                return
        self._transport.write(data)

    def stderr_line(self, line: bytes) -> None:
        """Log one line the server wrote to stderr."""
        log.info(
            "{server} stderr: {line}",
            server=self.config.name,
            line=line.decode("utf-8", errors="replace"),
            stream="stderr",
        )

    @property
    def broken(self) -> bool:
        """True once the connection was reported lost; later output is ignored."""
        return self._lost

    def fatal(self, reason: str) -> None:
        """The server broke the protocol beyond repair: fail everything, report, and stop the process."""
        log.error("{server}: {reason}; stopping it", server=self.config.name, reason=reason)
        self._report_lost(reason)
        self._stop_ladder()

    def process_exited(self, reason: Failure) -> None:
        """The leader exited: kill what is left of its group and, unless we stopped it, report a crash."""
        self._exited = True
        self._signal_group(signal.SIGKILL)
        how = describe_exit(reason)
        if self._closing:
            log.info("{server}: {how}", server=self.config.name, how=how)
        else:
            log.error("{server}: server process {how}", server=self.config.name, how=how)
            self._report_lost(f"server process {how}")
        # A grandchild outside the group may still hold stdout open; do not wait on it forever.
        self._timers.append(self._clock.callLater(self._term_grace, self._force_close))

    def process_ended(self) -> None:
        """Every pipe closed: the child and the rest of its group are gone."""
        self._ended = True
        self._exited = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def close(self) -> Deferred[None]:
        """Stop the server with the ladder; fires once the process has exited and its pipes are closed."""
        if self._transport is None or self._ended:
            return succeed(None)
        if not self._closing:
            self._closing = True
            if not self._lost:
                self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r} is stopping"))
            if not self._exited:
                self._stop_ladder()
        waiter: Deferred[None] = Deferred()
        self._ended_waiters.append(waiter)
        return waiter

    def _stop_ladder(self) -> None:
        if self._transport is None or self._exited or self._laddering:
            return
        self._laddering = True
        self._stdin_writer = None
        self._transport.closeStdin()
        self._timers.append(self._clock.callLater(self._stdin_grace, self._signal_group, signal.SIGTERM))
        self._timers.append(
            self._clock.callLater(self._stdin_grace + self._term_grace, self._signal_group, signal.SIGKILL)
        )

    def _signal_group(self, signum: int) -> None:
        if self.pid is None or self._ended:
            return
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        else:
            if signum != signal.SIGKILL or not self._exited:
                log.info(
                    "{server}: sent {signal} to process group {pgid}",
                    server=self.config.name,
                    signal=signal.Signals(signum).name,
                    pgid=self.pid,
                )

    def _force_close(self) -> None:
        if self._transport is not None and not self._ended:
            log.warn("{server}: pipes still open after exit; closing them", server=self.config.name)
            self._transport.loseConnection()

    def _report_lost(self, reason: str) -> None:
        if self._lost or self._closing:
            return
        self._lost = True
        # The owner learns first, so callers whose calls fail below already see the new state.
        if self.on_lost is not None:
            self.on_lost(reason)
        self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r}: {reason}"))
