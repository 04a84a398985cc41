"""Integration tests against the real pinned npm MCP servers (everything, filesystem, memory) over stdio."""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from aichat.mcp import MCPHost, ServerConfig, ToolCallError
from tests.mcp.support import (
    ROOT,
    alive,
    everything,
    fake,
    filesystem,
    group_empty,
    group_members,
    memory,
    require_npm_servers,
    structured,
    wait_for,
)


def call(host: MCPHost, name: str, arguments: dict[str, Any]) -> Deferred[Any]:
    """``host.call_tool`` as a Deferred."""
    return Deferred.fromCoroutine(host.call_tool(name, arguments))


class NpmServerTests(TestCase):
    """The three npm servers, started together, each used through its tools."""

    timeout = 60

    def setUp(self) -> None:
        """Start all three servers and wait until none is starting."""
        require_npm_servers()
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.host = MCPHost(
            reactor,
            [everything(), filesystem(self.tmp), memory(os.path.join(self.tmp, "memory.jsonl"))],
        )
        self.host.startService()
        self.addCleanup(self.host.stopService)
        return self.host.wait_ready(20)  # type: ignore[return-value]

    async def test_status_and_tools(self) -> None:
        """Every server is ready with the protocol we asked for, its tools listed with prefixed names."""
        status = {s["name"]: s for s in self.host.status()}
        self.assertEqual({s["state"] for s in status.values()}, {"ready"})
        self.assertEqual({s["protocol_version"] for s in status.values()}, {"2025-06-18"})
        self.assertEqual(status["filesystem"]["tool_count"], 14)
        self.assertEqual(status["memory"]["tool_count"], 9)
        self.assertGreaterEqual(status["everything"]["tool_count"], 13)
        names = [t.function_name for t in self.host.tools()]
        self.assertIn("everything__echo", names)
        self.assertIn("filesystem__read_text_file", names)
        self.assertIn("memory__create_entities", names)
        self.assertEqual(names, [t.function_name for t in self.host.tools()])
        echo = next(t for t in self.host.tools() if t.function_name == "everything__echo")
        self.assertEqual((echo.server, echo.name), ("everything", "echo"))
        self.assertIn("message", echo.input_schema["properties"])

    async def test_everything(self) -> None:
        """echo and get-sum answer; an image result is described; structured content is kept."""
        result = await self.host.call_tool("everything__echo", {"message": "hello"})
        self.assertEqual((result.text, result.is_error), ("Echo: hello", False))
        result = await self.host.call_tool("everything__get-sum", {"a": 2, "b": 40})
        self.assertIn("42", result.text)
        result = await self.host.call_tool("everything__get-tiny-image", {})
        self.assertRegex(result.text, r"\[image: image/png, \d+ bytes\]")
        result = await self.host.call_tool("everything__get-structured-content", {"location": "Chicago"})
        self.assertIsInstance(result.structured, dict)

    async def test_filesystem(self) -> None:
        """Write a file in the allowed directory and read it back; a path outside is a tool error."""
        path = os.path.join(self.tmp, "note.txt")
        result = await self.host.call_tool("filesystem__write_file", {"path": path, "content": "line one"})
        self.assertFalse(result.is_error, result.text)
        result = await self.host.call_tool("filesystem__read_text_file", {"path": path})
        self.assertEqual(result.text, "line one")
        result = await self.host.call_tool("filesystem__read_text_file", {"path": "/etc/passwd"})
        self.assertTrue(result.is_error)

    async def test_memory(self) -> None:
        """Create an entity and find it in the graph."""
        await self.host.call_tool(
            "memory__create_entities",
            {"entities": [{"name": "Twisted", "entityType": "library", "observations": ["event-driven"]}]},
        )
        result = await self.host.call_tool("memory__read_graph", {})
        self.assertIn("Twisted", result.text)

    async def test_environment_is_minimal(self) -> None:
        """The child sees PATH and its own env, never the daemon's secrets."""
        os.environ["OPENAI_API_KEY"] = "sk-must-not-leak"
        self.addCleanup(os.environ.pop, "OPENAI_API_KEY", None)
        await self.host.restart("everything")
        env = json.loads((await self.host.call_tool("everything__get-env", {})).text)
        self.assertNotIn("OPENAI_API_KEY", env)
        self.assertIn("PATH", env)
        self.assertLessEqual(set(env), {"PATH", "HOME", "LANG", "USER", "LOGNAME", "SHELL", "TERM"})

    async def test_timeout_cancels_on_the_server(self) -> None:
        """A slow call fails after the per-server timeout and the server keeps working."""
        self.host.reload([everything(timeout=0.5), *[c for c in self.host.configs() if c.name != "everything"]])
        await self.host.wait_ready(20)
        started = time.monotonic()
        with self.assertRaises(ToolCallError) as raised:
            await self.host.call_tool("everything__trigger-long-running-operation", {"duration": 30, "steps": 3})
        self.assertIn("timed out after 0.5 s", str(raised.exception))
        self.assertLess(time.monotonic() - started, 3)
        result = await self.host.call_tool("everything__echo", {"message": "still here"})
        self.assertEqual(result.text, "Echo: still here")


class CrashTests(TestCase):
    """kill -9 under load: in-flight calls fail fast, the server comes back, its group is gone."""

    timeout = 90

    async def test_kill_under_load(self) -> None:
        """Five kills of server-everything while 100 calls are in flight."""
        require_npm_servers()
        host = MCPHost(reactor, [everything()], initial_backoff=0.05)
        host.startService()
        self.addCleanup(host.stopService)
        await host.wait_ready(20)
        for round_number in range(5):
            pid = host.status()[0]["pid"]
            self.assertEqual(os.getpgid(pid), pid, "the server leads its own process group")
            calls = [call(host, "everything__echo", {"message": str(i)}) for i in range(100)]
            os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            outcomes = await DeferredList(calls, consumeErrors=True)
            elapsed = time.monotonic() - started
            failures = [result for ok, result in outcomes if not ok]
            self.assertTrue(failures, f"round {round_number}: some calls were in flight")
            for failure in failures:
                failure.trap(ToolCallError)
                self.assertRegex(str(failure.value), "killed by signal 9|not ready")
            self.assertLess(elapsed, 2.0, "in-flight calls fail fast")
            await wait_for(partial(group_empty, pid), 5, "the killed server's group to be empty")
            await wait_for(lambda: host.status()[0]["state"] == "ready", 20, "the server to come back")
            self.assertNotEqual(host.status()[0]["pid"], pid)
            result = await host.call_tool("everything__echo", {"message": "back"})
            self.assertEqual(result.text, "Echo: back")
        self.assertEqual(host.status()[0]["restarts"], 5)

    async def test_grandchildren_killed_with_the_group(self) -> None:
        """A server that started a grandchild (npx -> node in miniature): kill -9 of the leader kills both."""
        host = MCPHost(reactor, [fake("chain", "--spawn-grandchild")], initial_backoff=0.05)
        host.startService()
        self.addCleanup(host.stopService)
        await host.wait_ready(20)
        ids = await structured(host, "chain__ids", {})
        self.assertEqual(ids["pgid"], ids["pid"])
        self.assertTrue(alive(ids["grandchild"]))
        os.kill(ids["pid"], signal.SIGKILL)
        await wait_for(lambda: not alive(ids["grandchild"]), 5, "the grandchild to die")
        await wait_for(lambda: host.status()[0]["state"] == "ready", 20, "the server to come back")


class ShutdownTests(TestCase):
    """After the host stops, no child process remains."""

    timeout = 60

    async def test_no_child_after_stop(self) -> None:
        """Stopping the host ends every server and every process in their groups."""
        require_npm_servers()
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        host = MCPHost(
            reactor,
            [everything(), filesystem(tmp), memory(os.path.join(tmp, "m.jsonl")), fake("chain", "--spawn-grandchild")],
        )
        host.startService()
        await host.wait_ready(20)
        grandchild = (await structured(host, "chain__ids", {}))["grandchild"]
        pids = [s["pid"] for s in host.status()]
        self.assertTrue(all(pids))
        started = time.monotonic()
        await host.stopService()
        self.assertLess(time.monotonic() - started, 8)
        for pid in pids:
            self.assertEqual(group_members(pid), [], f"group {pid} is empty")
        self.assertFalse(alive(grandchild))
        self.assertEqual({s["state"] for s in host.status()}, {"stopped"})


class NpxChainTests(TestCase):
    """A real ``npx`` -> npm -> node chain (``npx --offline`` finds the pinned package in node_modules)."""

    timeout = 90

    async def test_npx_chain_leaves_no_orphan(self) -> None:
        """kill -9 of npx kills the node server too; stopping the host empties the new group."""
        require_npm_servers()
        config = ServerConfig(
            "npx", command="npx", args=("--offline", "mcp-server-everything", "stdio"), cwd=str(ROOT), init_timeout=30
        )
        host = MCPHost(reactor, [config], initial_backoff=0.05)
        host.startService()
        self.addCleanup(host.stopService)
        await host.wait_ready(40)
        self.assertEqual((await host.call_tool("npx__echo", {"message": "via npx"})).text, "Echo: via npx")
        leader = host.status()[0]["pid"]
        members = group_members(leader)
        self.assertGreater(len(members), 1, "npx runs the server in a child process of the same group")
        os.kill(leader, signal.SIGKILL)
        await wait_for(partial(group_empty, leader), 5, "every process of the npx group to die")
        await wait_for(lambda: host.status()[0]["state"] == "ready", 40, "the server to come back")
        second = host.status()[0]["pid"]
        self.assertNotEqual(second, leader)
        await host.stopService()
        self.assertEqual(group_members(second), [])
