"""The daemon's service tree in-process: its children, and a stop that waits for each child in reverse order."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from aichat.chat.turn import ChatService
from aichat.daemon import AichatService, Stage
from aichat.mcp import MCPHost
from aichat.mcp.supervisor import State
from tests.mcp.support import MODULES, require_npm_servers
from tests.support import free_port, make_settings

START_ORDER = ["store", "outbound", "mcp", "responses", "chat", "http"]


def settings_for(folder: Path) -> Any:
    """Settings for an in-process daemon: loopback on a free port, mock model, SQLite, server-everything."""
    servers = folder / "mcp-servers.json"
    script = str(MODULES / "server-everything" / "dist" / "index.js")
    servers.write_text(json.dumps({"mcpServers": {"everything": {"command": "node", "args": [script, "stdio"]}}}))
    return make_settings(
        folder,
        f"server:\n  host: 127.0.0.1\n  port: {free_port()}\n  shutdown_grace_seconds: 1\n"
        "llm:\n  provider: mock\n"
        f"mcp:\n  servers_file: {servers}\n"
        f"logging:\n  file: {folder / 'aichat.log'}\n",
    )


def alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ServiceTreeTests(TestCase):
    """AichatService is a MultiService whose children start in order and stop, each awaited, in reverse."""

    timeout = 60

    def setUp(self) -> None:
        require_npm_servers()
        thresholds = gc.get_threshold()
        hup = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, hup)
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)

    def service(self) -> AichatService:
        """A daemon built from test settings in a fresh folder; stopped after the test if still running."""
        folder = Path(tempfile.mkdtemp(prefix="aichat-tree-"))
        self.addCleanup(shutil.rmtree, folder, True)
        service = AichatService(settings_for(folder), reactor)

        async def stop_if_running() -> None:
            if service.running:
                await service.stopService()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop_if_running()))
        return service

    def test_children(self) -> None:
        """The tree holds the store, the outbound pool, the MCP host, the responses, chat and the listener."""
        service = self.service()
        self.assertIsInstance(service, MultiService)
        self.assertEqual([child.name for child in service], START_ORDER)
        self.assertIs(service.getServiceNamed("mcp"), service.mcp)
        self.assertIsInstance(service.mcp, MCPHost)
        self.assertIs(service.getServiceNamed("chat"), service.chat)
        self.assertIsInstance(service.chat, ChatService)
        self.assertIs(service.getServiceNamed("http"), service.http)
        for child in service:
            self.assertIs(child.parent, service)

    async def test_start_and_stop_in_order(self) -> None:
        """Start: each child in order, the MCP server running, the port open. Stop: each child's stop is awaited
        before the next begins, in reverse order; the MCP children are gone before the store closes."""
        service = self.service()
        events: list[str] = []
        for child in service:
            self.record(child, events)
        hup_before = signal.getsignal(signal.SIGHUP)
        service.startService()
        assert service._starting is not None
        await service._starting
        self.assertTrue(all(child.running for child in service))
        self.assertIsNotNone(service.port)
        await service.mcp.wait_ready(20)
        supervisor = service.mcp.supervisor("everything")
        self.assertEqual(supervisor.state, State.READY)
        pid = supervisor.pid
        assert pid is not None
        self.assertTrue(alive(pid))
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), hup_before)

        reactor._exitSignal = signal.SIGTERM  # type: ignore[attr-defined]
        self.addCleanup(setattr, reactor, "_exitSignal", None)
        pid_alive_at_store_stop: list[bool] = []
        store_stage = service.getServiceNamed("store")
        original = store_stage.stopService

        def store_stop() -> Any:
            pid_alive_at_store_stop.append(alive(pid))
            return original()

        store_stage.stopService = store_stop
        await service.stopService()

        expected = []
        for name in reversed(START_ORDER):
            expected += [f"stop {name}", f"stopped {name}"]
        self.assertEqual(events, [f"start {name}" for name in START_ORDER] + expected)
        self.assertEqual(pid_alive_at_store_stop, [False])
        self.assertFalse(any(child.running for child in service))
        self.assertIsNone(service.port)
        self.assertEqual(supervisor.state, State.STOPPED)
        self.assertEqual(signal.getsignal(signal.SIGHUP), hup_before)
        self.assertIsNone(reactor._exitSignal)  # type: ignore[attr-defined]

    async def test_a_stop_waits_for_a_slow_child(self) -> None:
        """A child whose stop takes a while holds up the ones after it (MultiService would not)."""
        service = self.service()
        events: list[str] = []

        class Slow(Stage):
            async def stop(self) -> None:
                events.append("slow stopping")
                await deferLater(reactor, 0.2, lambda: None)
                events.append("slow stopped")

        slow = Slow("slow")
        slow.setServiceParent(service)
        service.removeService(service.http)
        service.addService(service.http)
        for child in service:
            self.record(child, events)
        service.startService()
        assert service._starting is not None
        await service._starting
        await service.stopService()
        self.assertEqual(events[events.index("stop slow"):events.index("stop chat")],
                         ["stop slow", "slow stopping", "slow stopped", "stopped slow"])
        self.assertLess(events.index("stopped http"), events.index("stop slow"))

    def record(self, child: Any, events: list[str]) -> None:
        """Wrap ``child``'s start and stop to append ``start NAME``, ``stop NAME`` and ``stopped NAME``."""
        start, stop = child.startService, child.stopService

        def started() -> None:
            events.append(f"start {child.name}")
            start()

        def stopping() -> Any:
            events.append(f"stop {child.name}")
            result = stop()
            if isinstance(result, Deferred):

                def stopped(value: object) -> object:
                    events.append(f"stopped {child.name}")
                    return value

                return result.addCallback(stopped)
            events.append(f"stopped {child.name}")
            return result

        child.startService = started
        child.stopService = stopping


def test_pid_probe_sees_this_process() -> None:
    """The helper's liveness probe (used above) is true for a running process."""
    assert alive(os.getpid())
