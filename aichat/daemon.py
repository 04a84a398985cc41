"""The daemon's service tree: store, MCP host, LLM provider, chat service and HTTP listener.

Start order is that list; the HTTP listener comes last and readiness (``READY=1`` over
``NOTIFY_SOCKET``) is announced once it listens. Stop order is the reverse: stop listening, let
in-flight requests (and the turns they wait for, streams included) finish for up to
``server.shutdown_grace_seconds``, then cancel the turns still running (each ends with an ``error`` event
that its SSE readers are sent before their connections close, its partial reply stored), stop the MCP
children, then close the store. SIGHUP reopens the log file and
reloads the MCP servers file.
"""

from __future__ import annotations

import gc
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger

from aichat import __version__, sdnotify
from aichat.api import API, build_resource
from aichat.api.site import APISite
from aichat.chat.streams import StreamRegistry
from aichat.chat.turn import ChatService
from aichat.cluster.coordinator import Coordinator
from aichat.config import Settings
from aichat.llm.factory import build_provider
from aichat.llm.provider import Provider
from aichat.llm.unconfigured import UnconfiguredProvider
from aichat.logs import ReopenableFile, make_observer
from aichat.mcp import MCPHost, ServerConfig, load_servers_file_if_present
from aichat.metrics import Metrics
from aichat.store.factory import build_store
from aichat.transport import make_http_client, make_pool
from aichat.twisted_internals import clear_stop_signal
from aichat.validation import ConfigError

if TYPE_CHECKING:
    from aichat.cluster.listener import NotificationListener

log = Logger(namespace="aichat")

#: Collector thresholds once serving. Young collections stay small (a few ms at 1000 streams) and the middle
#: generation is collected every 20 of them; with 20,000 young objects per collection the middle generation
#: grew large enough to pause every stream for about 190 ms at 1000 streams, against about 35 ms with 1,000.
GC_THRESHOLDS = (1000, 20, 100)


#: Seconds to connect to a remote MCP server.
MCP_CONNECT_TIMEOUT = 10.0

#: Seconds the responses of turns ended by a stop have to reach their clients before connections are aborted.
FLUSH_SECONDS = 2.0


def endpoint_string(host: str, port: int) -> str:
    """A TCP server endpoint description; IPv6 colons are escaped as the endpoint parser requires."""
    description = f"tcp:port={port}"
    if host:
        description += ":interface=" + host.replace(":", "\\:")
    return description


class AichatService(Service):
    """The whole daemon as one twistd service.

    It installs its own log observer on the twistd application (see :meth:`setServiceParent`), so the
    ``logging.*`` settings apply whether it runs under ``twistd`` or ``aichat-backend``.
    """

    def __init__(self, settings: Settings, reactor: Any, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.reactor = reactor
        #: The daemon's own metrics registry (the composition root's; a fresh one when not given).
        self.metrics = metrics if metrics is not None else Metrics()
        self.observer, self.log_file = make_observer(
            settings.logging.file, settings.logging.level, settings.logging.format
        )
        self.store = build_store(settings.database, reactor)
        self.store.metrics = self.metrics
        # One connection pool for every outbound HTTP request: the model's and the remote MCP servers'.
        self._pool = make_pool(reactor, settings.llm.max_idle_connections)
        self.mcp = MCPHost(
            reactor,
            self._servers() or [],
            http_client=make_http_client(reactor, connect_timeout=MCP_CONNECT_TIMEOUT, pool=self._pool),
            max_line_bytes=settings.mcp.max_line_bytes,
            metrics=self.metrics,
        )
        self.provider = self._provider()
        self.streams = StreamRegistry(reactor, settings.chat.stream_keep_seconds)
        self.coordinator, self.listener = self._cluster()
        self.chat = ChatService(
            reactor,
            self.store,
            self.provider,
            self.mcp,
            settings.chat,
            settings.llm.system_prompt,
            self.streams,
            coordinator=self.coordinator,
            metrics=self.metrics,
        )
        self.api = API(
            settings=settings,
            store=self.store,
            clock=reactor,
            version=__version__,
            services={"chat": self.chat, "mcp": self.mcp},
            metrics=self.metrics,
        )
        self.site = APISite(
            build_resource(self.api),
            self._limit_for,
            reactor=reactor,
            request_timeout=settings.server.request_timeout_seconds,
            metrics=self.metrics,
            route_of=self.api.route_of,
        )
        self.port: IListeningPort | None = None
        self._previous_hup: Any = None
        self._starting: Deferred[None] | None = None

    def _cluster(self) -> tuple[Coordinator | None, NotificationListener | None]:
        """On PostgreSQL, this instance's part among many (the database is the bus); nothing on SQLite."""
        if self.settings.database.engine != "postgres":
            return None, None
        from aichat.cluster.listener import NotificationListener
        from aichat.cluster.log import EVENTS_CHANNEL, PostgresTurnLog
        from aichat.store.postgres import PostgresStore

        assert isinstance(self.store, PostgresStore)
        chat = self.settings.chat
        coordinator = Coordinator(
            self.reactor,
            PostgresTurnLog(self.store.transact),
            self.streams,
            lease_seconds=chat.turn_lease_seconds,
            keep_seconds=chat.stream_keep_seconds,
        )
        listener = NotificationListener(
            self.reactor,
            self.store.dsn,
            [EVENTS_CHANNEL],
            coordinator.notified,
            coordinator.reconnected,
            connect_timeout=self.settings.database.connect_timeout_seconds,
        )
        return coordinator, listener

    def _servers(self) -> list[ServerConfig] | None:
        """The MCP servers file's servers; ``None`` (and a logged error) when it cannot be used."""
        path = self.settings.mcp.servers_file
        try:
            servers = load_servers_file_if_present(path)
        except ConfigError as e:
            log.error("MCP servers file rejected: {problems}", problems="; ".join(map(str, e.problems)))
            return None
        if servers is None:
            log.warn("MCP servers file {path} not found: no MCP servers", path=path)
            return []
        return servers

    def _provider(self) -> Provider:
        try:
            http = make_http_client(
                self.reactor, connect_timeout=self.settings.llm.connect_timeout_seconds, pool=self._pool
            )
            return build_provider(self.settings.llm, self.reactor, http=http, metrics=self.metrics)
        except ValueError as e:
            log.error("LLM provider not usable: {error}; chat turns will fail until it is configured", error=str(e))
            return UnconfiguredProvider(self.settings.llm.provider, self.settings.llm.model, str(e))

    def _limit_for(self, path: bytes) -> int:
        limits = self.settings.limits
        if path.split(b"?", 1)[0].rstrip(b"/").endswith(b"/send-with-files"):
            return limits.max_upload_bytes
        return limits.max_body_bytes

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver before it begins logging, so ours replaces
        # twistd's default stdout/--logfile observer.
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        for warning in self.settings.warnings:
            log.warn("Configuration: {warning}", warning=warning)
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(self._start_failed)

    async def _start(self) -> None:
        settings = self.settings
        log.info(
            "aichat-backend {version} starting (config {config}, database {database})",
            version=__version__,
            config=settings.config_path or "(none)",
            database=settings.database.shown(),
            announce=True,
        )
        await self.store.open()
        if self.coordinator is not None and self.listener is not None:
            self.listener.start()
            self.coordinator.start()
            log.info("Serving turns with other instances on this database as {instance}",
                     instance=self.coordinator.instance)
        self.mcp.startService()
        endpoint = serverFromString(self.reactor, endpoint_string(settings.server.host, settings.server.port))
        self.port = await endpoint.listen(self.site)
        address = self.port.getHost()
        log.info(
            "Listening on {host}:{port}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
            announce=True,
        )
        sdnotify.notify("READY=1\nSTATUS=serving")
        # What start-up built lives as long as the process: keep it out of the collector's scans.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    def _start_failed(self, failure: Any) -> None:
        log.critical("Start-up failed: {error}", error=failure.getErrorMessage())
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        log.info("Stopping: no new connections", announce=True)
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        idle = await self.site.drain(self.reactor, self.settings.server.shutdown_grace_seconds)
        # Turns still running end with an ``error`` event that their SSE readers are sent, and their
        # partial replies are stored; the responses then get a moment to reach the clients.
        await self.chat.stop()
        if self.coordinator is not None and self.listener is not None:
            # The stopped turns' last events reach the log (and the other instances' readers) first.
            await self.coordinator.stop()
            await self.listener.stop()
        if not idle:
            await self.site.drain(self.reactor, FLUSH_SECONDS)
        aborted = await self.site.close_connections(self.reactor, FLUSH_SECONDS)
        if aborted:
            log.warn("Stopping: aborted {count} connections that did not take their last bytes", count=aborted)
        if self.mcp.running:
            await self.mcp.stopService()
        await self.provider.close()
        await self._pool.closeCachedConnections()
        await self.store.close()
        # twistd re-raises the stop signal after shutdown; a completed graceful stop is a success and exits 0.
        clear_stop_signal(self.reactor)
        log.info("Stopped", announce=True)
        if isinstance(self.log_file, ReopenableFile):
            self.log_file.flush()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP: reopen the log file, then reload the MCP servers file (an invalid one is rejected)."""
        if isinstance(self.log_file, ReopenableFile):
            self.log_file.reopen()
        log.info("SIGHUP: log file reopened")
        servers = self._servers()
        if servers is None:
            log.error("SIGHUP: keeping the running MCP servers")
            return
        self.mcp.reload(servers)
        log.info("SIGHUP: MCP servers file reloaded ({count} servers)", count=len(servers))
