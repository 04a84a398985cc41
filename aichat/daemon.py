"""The daemon's service tree: a ``MultiService`` whose children start in order and stop in reverse.

The children of :class:`AichatService`, in start order (each start and stop is awaited before the next)::

    store      open the database                     close it
    outbound   (nothing)                             close the LLM provider and the connection pool it
                                                     shares with the remote MCP servers
    mcp        MCPHost: start every MCP server       stop every server with the stop ladder
    responses  (nothing)                             let the stopped turns' last bytes reach their
                                                     clients, then close (at last abort) every connection
    cluster    PostgreSQL only: LISTEN, leases       the stopped turns' last events reach the log
    chat       ChatService                           cancel the live turns and wait for them (bounded)
    http       listen; then READY=1                  stop listening; in-flight requests (and the turns
                                                     they wait for) get ``server.shutdown_grace_seconds``

So the stop order is http, chat, cluster, responses, mcp, outbound, store. A start that fails stops the
daemon with exit status 1. A turn still running when ``chat`` stops ends with an ``error`` event that its
SSE readers are sent before their connections close, its partial reply stored. SIGHUP reopens the log
file and reloads the MCP servers file.
"""

from __future__ import annotations

import gc
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
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
from aichat.store.base import Store
from aichat.store.factory import build_store
from aichat.transport import make_http_client, make_pool
from aichat.twisted_internals import clear_stop_signal
from aichat.validation import ConfigError

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

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


class Stage(Service):
    """A child of :class:`AichatService` whose start or stop waits: :meth:`start` and :meth:`stop` coroutines.

    ``started`` fires when the start has finished; the parent waits for it before starting the next child.
    """

    def __init__(self, name: str) -> None:
        self.setName(name)
        self.started: Deferred[None] = succeed(None)

    async def start(self) -> None:
        """Nothing to wait for unless a stage says so."""

    async def stop(self) -> None:
        """Nothing to wait for unless a stage says so."""

    def startService(self) -> None:
        super().startService()
        self.started = Deferred.fromCoroutine(self.start())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.stop())


class StoreStage(Stage):
    """The store: opened first, closed last."""

    def __init__(self, store: Store) -> None:
        super().__init__("store")
        self.store = store

    async def start(self) -> None:
        await self.store.open()

    async def stop(self) -> None:
        await self.store.close()


class OutboundStage(Stage):
    """The LLM provider and the connection pool it shares with the remote MCP servers."""

    def __init__(self, provider: Provider, pool: HTTPConnectionPool) -> None:
        super().__init__("outbound")
        self.provider = provider
        self.pool = pool

    async def stop(self) -> None:
        await self.provider.close()
        await self.pool.closeCachedConnections()


class ClusterStage(Stage):
    """This instance's part among many on one PostgreSQL: the LISTEN connection and the coordinator."""

    def __init__(self, coordinator: Coordinator, listener: NotificationListener) -> None:
        super().__init__("cluster")
        self.coordinator = coordinator
        self.listener = listener

    async def start(self) -> None:
        self.listener.start()
        self.coordinator.start()
        log.info("Serving turns with other instances on this database as {instance}",
                 instance=self.coordinator.instance)

    async def stop(self) -> None:
        # The stopped turns' last events reach the log (and the other instances' readers) first.
        await self.coordinator.stop()
        await self.listener.stop()


class HTTPStage(Stage):
    """The HTTP listener: last to start, first to stop."""

    def __init__(self, reactor: Any, site: APISite, description: str, grace: float) -> None:
        super().__init__("http")
        self.reactor = reactor
        self.site = site
        self.description = description
        self.grace = grace
        self.port: IListeningPort | None = None
        #: Whether the in-flight requests all finished within the grace (read by the ``responses`` stage).
        self.idle = True

    async def start(self) -> None:
        endpoint = serverFromString(self.reactor, self.description)
        self.port = await endpoint.listen(self.site)
        address = self.port.getHost()
        log.info(
            "Listening on {host}:{port}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
            announce=True,
        )

    async def stop(self) -> None:
        log.info("Stopping: no new connections", announce=True)
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        self.idle = await self.site.drain(self.reactor, self.grace)


class ResponsesStage(Stage):
    """The open HTTP connections once the turns have stopped: their last bytes sent, then closed."""

    def __init__(self, reactor: Any, site: APISite, http: HTTPStage) -> None:
        super().__init__("responses")
        self.reactor = reactor
        self.site = site
        self.http = http

    async def stop(self) -> None:
        if not self.http.idle:
            await self.site.drain(self.reactor, FLUSH_SECONDS)
        aborted = await self.site.close_connections(self.reactor, FLUSH_SECONDS)
        if aborted:
            log.warn("Stopping: aborted {count} connections that did not take their last bytes", count=aborted)


class AichatService(MultiService):
    """The whole daemon as one twistd service: the tree of children described above.

    It installs its own log observer on the twistd application (see :meth:`setServiceParent`), so the
    ``logging.*`` settings apply whether it runs under ``twistd`` or ``aichat-backend``.
    """

    def __init__(self, settings: Settings, reactor: Any, metrics: Metrics | None = None) -> None:
        super().__init__()
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
            chat=self.chat,
            mcp=self.mcp,
            metrics=self.metrics,
        )
        self.site = APISite(
            build_resource(self.api),
            self.api.body_limit,
            reactor=reactor,
            request_timeout=settings.server.request_timeout_seconds,
            metrics=self.metrics,
            route_of=self.api.route_of,
        )
        self.http = HTTPStage(
            reactor,
            self.site,
            endpoint_string(settings.server.host, settings.server.port),
            settings.server.shutdown_grace_seconds,
        )
        StoreStage(self.store).setServiceParent(self)
        OutboundStage(self.provider, self._pool).setServiceParent(self)
        self.mcp.setServiceParent(self)
        ResponsesStage(reactor, self.site, self.http).setServiceParent(self)
        if self.coordinator is not None and self.listener is not None:
            ClusterStage(self.coordinator, self.listener).setServiceParent(self)
        self.chat.setServiceParent(self)
        self.http.setServiceParent(self)
        self._previous_hup: Any = None
        self._starting: Deferred[None] | None = None

    @property
    def port(self) -> IListeningPort | None:
        """The listening port, while listening."""
        return self.http.port

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

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver before it begins logging, so ours replaces
        # twistd's default stdout/--logfile observer.
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        # Not MultiService.startService, which starts every child at once: each start here is awaited.
        Service.startService(self)
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        for warning in self.settings.warnings:
            log.warn("Configuration: {warning}", warning=warning)
        self._starting = Deferred.fromCoroutine(self._start())
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
        for child in self:
            child.startService()
            if isinstance(child, Stage):
                await child.started
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
        # Not MultiService.stopService, which stops every child at once: each stop here waits for the last.
        Service.stopService(self)
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("Stopping {service} failed", service=child.name)
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
