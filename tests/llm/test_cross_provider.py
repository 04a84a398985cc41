"""Provider-neutral history: a session that started on Gemini (tool calls with thought signatures and
their results stored) continues on Claude and on an OpenAI server, and one from OpenAI continues on
Gemini; each strict upstream accepts the history as its API would, and the calls keep their ids."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred

from aichat.chat.context import build_messages
from aichat.llm.provider import ToolCall
from aichat.llm.tools import specs_from_openai
from aichat.store.base import Message
from tests.llm.wire_support import KEY, TOOLS, WireTestCase, reactor
from tests.upstream import Upstream, strict_server
from tests.upstream_claude import ClaudeWire
from tests.upstream_claude import refusal as claude_refusal
from tests.upstream_gemini import Call, GeminiWire, gemini_stream
from tests.upstream_gemini import refusal as gemini_refusal


def stored(calls: list[ToolCall], results: list[str], *, failed: int | None = None) -> list[Message]:
    """A session's rows as the turn stores them: user, assistant with calls, one tool row per call."""
    rows = [
        Message("u1", "s", "user", "use the tools"),
        Message("a1", "s", "assistant", "Checking.", tool_calls=[c.to_openai() for c in calls]),
    ]
    for n, (call, result) in enumerate(zip(calls, results, strict=True)):
        execution: dict[str, Any] = {"id": call.id, "tool_name": call.name, "result": result}
        if n == failed:
            execution["error"] = result
        rows.append(Message(f"t{n}", "s", "tool", result, tool_call_id=call.id, tool_executions=[execution]))
    rows += [Message("a2", "s", "assistant", "Done."), Message("u2", "s", "user", "and now?")]
    return rows


class CrossProviderTests(WireTestCase):
    kind = "gemini"

    def wire(self) -> GeminiWire:
        return GeminiWire()

    async def test_gemini_session_continues_on_claude_and_openai(self) -> None:
        self.upstream.push(
            gemini_stream([], [Call("everything__echo", {"message": "x"}, signature="c2ln"),
                               Call("everything__get-sum", {"a": 1, "b": 2})], calls_per_event=2)
        )
        made, _ = await self.complete(tools=TOOLS)
        self.assertEqual(made.tool_calls[0].signature, "c2ln")
        history = build_messages("sys", stored(made.tool_calls, ["Echo: x", "boom"], failed=1), 100_000, _now())

        claude = Upstream(reactor, wire=ClaudeWire(), api_key=KEY)
        claude.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(claude.stop()))
        claude_provider = self.provider(provider="claude", base_url=claude.root_url)
        result = await claude_provider.complete(history, specs_from_openai(TOOLS))
        self.assertTrue(result.text.startswith("Echo:"))
        body = claude.requests[0].body
        self.assertIsNone(claude_refusal(body))
        results = body["messages"][2]["content"]
        self.assertEqual([r["tool_use_id"] for r in results], [c.id for c in made.tool_calls])
        self.assertEqual([r.get("is_error", False) for r in results], [False, True])

        openai = Upstream(reactor, rejects=strict_server)
        openai.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(openai.stop()))
        openai_provider = self.provider(provider="openai", base_url=openai.base_url)
        await openai_provider.complete(history, specs_from_openai(TOOLS))
        sent = openai.requests[0].body["messages"]
        self.assertEqual(sent[2]["tool_calls"], [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in made.tool_calls
        ])
        self.assertNotIn("is_error", sent[3])

    async def test_openai_session_continues_on_gemini(self) -> None:
        calls = [ToolCall("call_abc", "everything__echo", '{"message": "x"}')]
        history = build_messages("sys", stored(calls, ["Echo: x"]), 100_000, _now())
        result, _ = await self.complete(history, tools=TOOLS)
        self.assertTrue(result.text.startswith("Echo:"))
        body = self.upstream.requests[0].body
        self.assertIsNone(gemini_refusal(body))
        self.assertEqual(body["contents"][2]["parts"][0]["functionResponse"]["id"], "call_abc")


def _now() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)
