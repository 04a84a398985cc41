"""Integration tests with small misbehaving stdio servers: garbage, oversized lines, hangs, crashes, slow starts."""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from aichat.mcp import MCPHost, ServerConfig, ToolCallError
from tests.mcp.support import alive, fake, group_members, structured, wait_for


class MisbehavingServerTests(TestCase):
    """Each test starts one fake server with one misbehaviour and checks the host copes."""

    timeout = 30

    def start(self, *configs: ServerConfig, **options: object) -> MCPHost:
        """A started host over ``configs`` that is stopped after the test."""
        host = MCPHost(reactor, list(configs), initial_backoff=0.05, stdin_grace=0.2, term_grace=1.0, **options)  # type: ignore[arg-type]
        host.startService()
        self.addCleanup(host.stopService)
        return host

    def state(self, host: MCPHost) -> str:
        """The single server's state."""
        return str(host.status()[0]["state"])

    async def test_garbage_lines_are_skipped(self) -> None:
        """Non-JSON lines before every message are logged and skipped; calls work."""
        host = self.start(fake("junk", "--garbage"))
        await host.wait_ready(10)
        self.assertEqual(self.state(host), "ready")
        result = await host.call_tool("junk__echo", {"message": "through the noise"})
        self.assertEqual(result.text, "through the noise")

    async def test_oversized_line_fails_calls_and_restarts(self) -> None:
        """A line over the limit fails the pending call clearly and the server is restarted."""
        host = self.start(fake("big"), max_line_bytes=4096)
        await host.wait_ready(10)
        small = await host.call_tool("big__big", {"size": 100})
        self.assertEqual(len(small.text), 100)
        first_pid = host.status()[0]["pid"]
        with self.assertRaises(ToolCallError) as raised:
            await host.call_tool("big__big", {"size": 10_000})
        self.assertIn("line exceeds 4096 bytes", str(raised.exception))
        await wait_for(lambda: self.state(host) == "ready" and host.status()[0]["pid"] != first_pid, 10, "restart")
        self.assertEqual(host.status()[0]["restarts"], 1)
        self.assertIn("line exceeds 4096 bytes", str(host.status()[0]["last_error"]) + str(raised.exception))

    async def test_hanging_call_times_out_and_is_cancelled(self) -> None:
        """A call that never answers fails after the server's timeout; the server receives the cancellation."""
        host = self.start(fake("slow", timeout=0.3))
        await host.wait_ready(10)
        started = time.monotonic()
        with self.assertRaises(ToolCallError) as raised:
            await host.call_tool("slow__hang", {})
        self.assertIn("timed out after 0.3 s", str(raised.exception))
        self.assertLess(time.monotonic() - started, 2)
        cancelled = (await structured(host, "slow__cancelled", {}))["cancelled"]
        self.assertEqual(len(cancelled), 1)

    async def test_caller_cancellation_reaches_the_server(self) -> None:
        """Cancelling the caller's Deferred sends notifications/cancelled for that request."""
        host = self.start(fake("slow"))
        await host.wait_ready(10)
        pending = Deferred.fromCoroutine(host.call_tool("slow__hang", {}))
        pending.cancel()
        self.failureResultOf(pending)
        cancelled = (await structured(host, "slow__cancelled", {}))["cancelled"]
        self.assertEqual(len(cancelled), 1)

    async def test_hang_at_initialize(self) -> None:
        """A server that never answers initialize is given up on after init_timeout and retried."""
        host = self.start(fake("mute", "--hang-init", init_timeout=0.3))
        await host.wait_ready(5)
        self.assertIn(self.state(host), ("backing_off", "starting"))
        await wait_for(lambda: host.status()[0]["restarts"] >= 2, 10, "two retries")
        self.assertIn("init_timeout 0.3 s", str(host.status()[0]["last_error"]))
        self.assertEqual(host.tools(), [])

    async def test_crash_during_call(self) -> None:
        """A server that exits mid-call fails the call with its exit status, then comes back."""
        host = self.start(fake("fragile"))
        await host.wait_ready(10)
        with self.assertRaises(ToolCallError) as raised:
            await host.call_tool("fragile__crash", {})
        self.assertIn("exited with status 3", str(raised.exception))
        await wait_for(lambda: self.state(host) == "ready", 10, "restart")
        self.assertEqual((await host.call_tool("fragile__echo", {"message": "again"})).text, "again")

    async def test_exit_at_start_backs_off(self) -> None:
        """A server that exits at once is retried with growing delays and reports why."""
        host = self.start(fake("dead", "--exit-at-start", "2"))
        await wait_for(lambda: host.status()[0]["restarts"] >= 3, 10, "three retries")
        self.assertIn("exited with status 2", str(host.status()[0]["last_error"]))

    async def test_missing_command(self) -> None:
        """A command that does not exist leaves the server backing off with a readable error."""
        host = self.start(ServerConfig("ghost", command="/nonexistent/mcp-server"))
        await wait_for(lambda: host.status()[0]["restarts"] >= 1, 10, "a retry")
        self.assertEqual(host.status()[0]["last_error"], "command not found: /nonexistent/mcp-server")

    async def test_slow_start(self) -> None:
        """A slow server is visible as starting meanwhile, then ready."""
        host = self.start(fake("sloth", "--slow-start", "0.5"))
        self.assertEqual(self.state(host), "starting")
        self.assertEqual(host.tools(), [])
        await host.wait_ready(10)
        self.assertEqual(self.state(host), "ready")

    async def test_unsupported_protocol(self) -> None:
        """A server answering an unknown protocol version is refused: state failed, no retries."""
        host = self.start(fake("future", "--protocol", "2099-01-01"))
        await host.wait_ready(10)
        status = host.status()[0]
        self.assertEqual(status["state"], "failed")
        self.assertIn("2099-01-01", status["last_error"])

    async def test_pagination_and_list_changed(self) -> None:
        """Tools listed over several pages; a list_changed notification brings a new tool in."""
        host = self.start(fake("pages", "--page-size", "2"))
        await host.wait_ready(10)
        self.assertEqual(host.status()[0]["tool_count"], 11)
        await host.call_tool("pages__add_tool", {"name": "brand_new"})
        await wait_for(lambda: any(t.name == "brand_new" for t in host.tools()), 5, "the new tool")
        self.assertEqual(host.status()[0]["tool_count"], 12)

    async def test_server_requests(self) -> None:
        """ping and roots/list from the server are answered; sampling gets method-not-found."""
        host = self.start(fake("chatty"))
        await host.wait_ready(10)
        replies = await structured(host, "chatty__ping_client", {})
        self.assertEqual(replies["s1"]["result"], {})
        self.assertEqual(replies["s2"]["error"]["code"], -32601)
        self.assertEqual(replies["s3"]["result"], {"roots": []})

    async def test_result_formatting_and_tool_errors(self) -> None:
        """Mixed content is joined and described; isError is a result the model can read."""
        host = self.start(fake("mix"))
        await host.wait_ready(10)
        result = await host.call_tool("mix__mixed", {})
        self.assertEqual(
            result.text,
            "first\n[image: image/png, 8 bytes]\nsecond\n[resource link: a.txt <file:///a.txt>, text/plain]\n"
            "[resource: file:///b.txt, text/plain]\ninside b",
        )
        self.assertEqual(result.structured, {"answer": 42})
        failed = await host.call_tool("mix__fail", {})
        self.assertEqual((failed.text, failed.is_error), ("it went wrong", True))

    async def test_environment_cwd_and_group(self) -> None:
        """Minimal environment plus the server's env, its cwd, and its own process group."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.environ["OPENAI_API_KEY"] = "sk-must-not-leak"
        self.addCleanup(os.environ.pop, "OPENAI_API_KEY", None)
        host = self.start(fake("env", env={"MY_SETTING": "on"}, cwd=directory))
        await host.wait_ready(10)
        env = await structured(host, "env__env", {})
        self.assertEqual(env["MY_SETTING"], "on")
        self.assertNotIn("OPENAI_API_KEY", env)
        self.assertLessEqual(set(env) - {"MY_SETTING"}, {"PATH", "HOME", "LANG", "USER", "LOGNAME", "SHELL", "TERM"})
        ids = await structured(host, "env__ids", {})
        self.assertEqual(ids["pgid"], ids["pid"])
        self.assertEqual(ids["pid"], host.status()[0]["pid"])
        self.assertEqual(os.path.realpath(ids["cwd"]), os.path.realpath(directory))


class StopLadderTests(TestCase):
    """The stop ladder escalates: close stdin, SIGTERM the group, SIGKILL the group."""

    timeout = 30

    async def test_stubborn_server_is_killed(self) -> None:
        """A server ignoring stdin EOF and SIGTERM (with a grandchild) is SIGKILLed after the grace."""
        host = MCPHost(reactor, [fake("mule", "--stubborn", "--spawn-grandchild")], stdin_grace=0.2, term_grace=0.5)
        host.startService()
        await host.wait_ready(10)
        ids = await structured(host, "mule__ids", {})
        started = time.monotonic()
        await host.stopService()
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.65, "it waited for stdin and SIGTERM first")
        self.assertLess(elapsed, 3)
        self.assertFalse(alive(ids["pid"]))
        # The group's SIGKILL was sent before the child was reaped; the grandchild's death follows it, on a
        # loaded machine a moment later.
        await wait_for(lambda: not alive(ids["grandchild"]) and not group_members(ids["pgid"]), 2, "the group's end")
        self.assertEqual(host.status()[0]["state"], "stopped")

    async def test_polite_server_stops_on_stdin_close(self) -> None:
        """A well-behaved server exits when its stdin closes, before any signal."""
        host = MCPHost(reactor, [fake("polite")], stdin_grace=5, term_grace=5)
        host.startService()
        await host.wait_ready(10)
        started = time.monotonic()
        await host.stopService()
        self.assertLess(time.monotonic() - started, 2)


class ReloadTests(TestCase):
    """SIGHUP-style reload with real children: unchanged ones keep their process."""

    timeout = 30

    async def test_reload_with_processes(self) -> None:
        """Unchanged keeps its pid, changed gets a new one, removed is gone, added starts."""
        host = MCPHost(reactor, [fake("same"), fake("changed"), fake("removed")], stdin_grace=0.2, term_grace=1.0)
        host.startService()
        self.addCleanup(host.stopService)
        await host.wait_ready(10)
        before = {s["name"]: s["pid"] for s in host.status()}
        host.reload([fake("same"), fake("changed", timeout=5), fake("added")])
        await host.wait_ready(10)
        after = {s["name"]: s["pid"] for s in host.status()}
        self.assertEqual(set(after), {"same", "changed", "added"})
        self.assertEqual(after["same"], before["same"])
        self.assertNotEqual(after["changed"], before["changed"])
        await wait_for(lambda: not alive(before["removed"]) and not alive(before["changed"]), 5, "old children to exit")
        self.assertEqual((await host.call_tool("added__echo", {"message": "new"})).text, "new")
