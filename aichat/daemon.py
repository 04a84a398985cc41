"""The daemon's service tree: store, MCP host, LLM provider, chat service and HTTP listener.

Start order is that list; the HTTP listener comes last and readiness (``READY=1`` over
``NOTIFY_SOCKET``) is announced once it listens. Stop order is the reverse: stop listening, let
in-flight requests finish for up to ``server.shutdown_grace_seconds``, stop the chat service and the MCP
children, then close the store. SIGHUP reopens the log file and runs the reload hooks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger

from aichat import __version__, sdnotify
from aichat.api import API, build_resource
from aichat.api.site import APISite
from aichat.config import Settings
from aichat.logs import ReopenableFile, make_observer
from aichat.store.sqlite import SQLiteStore

log = Logger(namespace="aichat")


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

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.observer, self.log_file = make_observer(
            settings.logging.file, settings.logging.level, settings.logging.format
        )
        self.store = SQLiteStore(reactor, settings.database.path)
        self.api = API(settings=settings, store=self.store, clock=reactor, version=__version__)
        self.site = APISite(build_resource(self.api), self._limit_for)
        self.port: IListeningPort | None = None
        self.reload_hooks: list[Callable[[], None]] = []
        self.stop_hooks: list[Callable[[], Awaitable[None]]] = []
        self._previous_hup: Any = None
        self._starting: Deferred[None] | None = None

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
            database=settings.database.path,
        )
        await self.store.open()
        endpoint = serverFromString(self.reactor, endpoint_string(settings.server.host, settings.server.port))
        self.port = await endpoint.listen(self.site)
        address = self.port.getHost()
        log.info(
            "Listening on {host}:{port}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )
        sdnotify.notify("READY=1\nSTATUS=serving")

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
        log.info("Stopping: no new connections")
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        for hook in reversed(self.stop_hooks):
            await hook()
        await self.site.drain(self.reactor, self.settings.server.shutdown_grace_seconds)
        await self.store.close()
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            # twistd re-raises the stop signal after shutdown, so the process would die "by SIGTERM";
            # a completed graceful stop is a success and exits 0.
            self.reactor._exitSignal = None
        log.info("Stopped")
        if isinstance(self.log_file, ReopenableFile):
            self.log_file.flush()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP: reopen the log file, then run the reload hooks (the MCP servers file)."""
        if isinstance(self.log_file, ReopenableFile):
            self.log_file.reopen()
        log.info("SIGHUP: log file reopened")
        for hook in self.reload_hooks:
            hook()
