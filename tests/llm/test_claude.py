"""Claude (Anthropic Messages API) against a scripted upstream on a real port that speaks the format
exactly: text and parallel tool calls, the request on the wire, history with tool results accepted by
the API's own rules, events cut at every byte, 429/529 with retry-after(-ms), error events before and
during the stream, stalls, a wrong key; and the official ``anthropic`` SDK as the oracle that the
scripted stream is the real format."""

from __future__ import annotations

import json
from typing import Any

import anthropic
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from aichat.llm.anthropic import EventStream, request_body
from aichat.llm.provider import ToolCall, Usage
from aichat.sse import SSEDecoder
from aichat.transport.exchange import Errors
from aichat.transport.scrub import Scrubber
from tests.llm.wire_support import KEY, TOOLS, WireTestCase, reactor, render
from tests.upstream import Reset, Sleep, Stall
from tests.upstream_claude import ClaudeWire, ToolUse, claude_error, claude_stream, error_event, refusal

CALLS = [
    ToolUse("toolu_01A", "everything__echo", '{"message": "split across fragments"}'),
    ToolUse("toolu_01B", "everything__get-sum", '{"a": 40, "b": 2}'),
]
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "use the tools"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            ToolCall("call_a", "everything__echo", '{"message": "x"}').to_openai(),
            ToolCall("call_b", "everything__get-sum", '{"a": 1, "b": 2}', signature="sig-from-gemini").to_openai(),
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "Echo: x"},
    {"role": "tool", "tool_call_id": "call_b", "content": "Tool returned an error: no", "is_error": True},
    {"role": "assistant", "content": "Done."},
    {"role": "user", "content": "and again"},
]


class ClaudeUpstreamTests(WireTestCase):
    kind = "claude"

    def wire(self) -> ClaudeWire:
        return ClaudeWire()

    async def test_text_then_parallel_tool_calls(self) -> None:
        """Text deltas are passed on as they come; two tool_use blocks with their input in fragments come
        out as two calls with the whole arguments; stop_reason tool_use is ``tool_calls``; usage read."""
        self.upstream.push(claude_stream("Let me check. ", *CALLS, pieces=4, delay=0.005))
        result, seen = await self.complete(tools=TOOLS)
        self.assertEqual("".join(seen), "Let me check. ")
        self.assertGreater(len(seen), 1)
        self.assertEqual(result.tool_calls, [ToolCall(c.id, c.name, c.input) for c in CALLS])
        self.assertEqual(
            (result.finish_reason, result.usage, result.model), ("tool_calls", Usage(12, 7, 19), "claude-test")
        )

    async def test_request_on_the_wire(self) -> None:
        """POST /v1/messages with x-api-key and anthropic-version; system on top, tools as input_schema,
        max_tokens (default 4096, or llm.max_tokens), temperature, stream."""
        await self.complete(tools=TOOLS)
        await self.complete(provider=self.provider(max_tokens=77))
        first, second = self.upstream.requests
        self.assertEqual((first.path, first.headers["x-api-key"]), ("/v1/messages", KEY))
        self.assertEqual(first.headers["anthropic-version"], "2023-06-01")
        self.assertNotIn("authorization", first.headers)
        body = first.body
        self.assertEqual((body["model"], body["max_tokens"], body["stream"]), ("test-model", 4096, True))
        self.assertEqual((body["system"], body["temperature"]), ("Be brief.", 0.2))
        self.assertEqual(body["messages"], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        self.assertEqual(
            body["tools"][1],
            {"name": "everything__get-sum", "description": "Adds two numbers",
             "input_schema": TOOLS[1]["function"]["parameters"]},
        )
        self.assertEqual(second.body["max_tokens"], 77)
        self.assertNotIn("tools", second.body)

    async def test_history_with_tool_results_is_what_the_api_accepts(self) -> None:
        """Tool calls become tool_use blocks; their results one user message that begins with the
        tool_result blocks (is_error kept), in the calls' order; a signature from Gemini is not sent."""
        await self.complete(HISTORY, tools=TOOLS)
        messages = self.upstream.requests[0].body["messages"]
        self.assertIsNone(refusal(self.upstream.requests[0].body))
        self.assertEqual([m["role"] for m in messages], ["user", "assistant", "user", "assistant", "user"])
        self.assertEqual(
            messages[1]["content"],
            [
                {"type": "tool_use", "id": "call_a", "name": "everything__echo", "input": {"message": "x"}},
                {"type": "tool_use", "id": "call_b", "name": "everything__get-sum", "input": {"a": 1, "b": 2}},
            ],
        )
        self.assertEqual(
            messages[2]["content"],
            [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "Echo: x"},
                {"type": "tool_result", "tool_use_id": "call_b", "content": "Tool returned an error: no",
                 "is_error": True},
            ],
        )
        self.assertNotIn("sig-from-gemini", self.upstream.requests[0].raw.decode())

    async def test_tool_results_and_new_text_share_one_user_turn(self) -> None:
        """A result followed by the user's next message (a turn cut short): one user turn, results first."""
        history = [*HISTORY[:5], {"role": "user", "content": "never mind"}]
        await self.complete(history)
        body = self.upstream.requests[0].body
        self.assertIsNone(refusal(body))
        last = body["messages"][-1]["content"]
        self.assertEqual([b["type"] for b in last], ["tool_result", "tool_result", "text"])

    async def test_529_overloaded_retried_after_retry_after_ms(self) -> None:
        """529 overloaded_error is retried after retry-after-ms; 429 after retry-after; then success."""
        self.upstream.push(
            claude_error(529, "overloaded_error", "Overloaded", retry_after_ms="60"),
            claude_error(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit",
                         retry_after="0.05"),
            claude_stream("ok"),
        )
        start = reactor.seconds()
        result, _ = await self.complete()
        self.assertEqual(result.text, "ok")
        self.assertGreaterEqual(reactor.seconds() - start, 0.1)
        self.assertEqual(len(self.upstream.requests), 3)

    async def test_overload_that_lasts_is_surfaced_with_its_status(self) -> None:
        """Three 529s: the error carries 529, the API's error type and message, and is retryable."""
        for _ in range(3):
            self.upstream.push(claude_error(529, "overloaded_error", "Overloaded"))
        error = await self.failure()
        self.assertEqual(
            (error.status, error.code, error.retryable, error.started), (529, "overloaded_error", True, False)
        )
        self.assertEqual(error.message, "the model's server answered HTTP 529: Overloaded")
        self.assertEqual(error.http_status, 502)

    async def test_error_event_before_any_text_is_retried(self) -> None:
        """An overloaded_error event before any output: the call is made again and succeeds."""
        start = claude_stream("x").steps[:2]
        self.upstream.push(claude_stream("").__class__([*start, error_event()]), claude_stream("second try"))
        result, seen = await self.complete()
        self.assertEqual((result.text, "".join(seen)), ("second try", "second try"))
        self.assertEqual(len(self.upstream.requests), 2)

    async def test_error_event_mid_stream_keeps_the_partial_text(self) -> None:
        """An error event after text: not retried; the error says started and carries the API's reason."""
        stream = claude_stream("Partial answer that is cut", pieces=3)
        steps = [*stream.steps[:5], error_event()]
        self.upstream.push(stream.__class__(steps, headers=stream.headers))
        self.upstream.push(claude_stream("never"))
        error = await self.failure()
        self.assertEqual((error.started, error.code), (True, "overloaded_error"))
        self.assertIn("Overloaded", error.message)
        self.assertEqual(len(self.upstream.requests), 1)
        # The whole response had arrived with the error event: the connection goes back to the pool.
        await self.upstream.requests[0].closed
        await deferLater(reactor, 0)

    async def test_reset_before_and_during_the_stream(self) -> None:
        """A reset before the answer is retried; one during a tool call's input is a connection error."""
        stream = claude_stream("a", *CALLS)
        self.upstream.push(stream.__class__([Reset()]), stream.plus())
        result, _ = await self.complete()
        self.assertEqual(len(result.tool_calls), 2)
        self.upstream.push(stream.__class__([*claude_stream(*CALLS).steps[:6], Reset()]))
        error = await self.failure(provider=self.provider(max_retries=0))
        self.assertEqual(error.code, "connection")

    async def test_stall_hits_the_idle_timer(self) -> None:
        """Pings then silence: the idle timer (reset by every chunk) ends the call as a timeout (504)."""
        stream = claude_stream("x")
        self.upstream.push(stream.__class__([*stream.steps[:2], Sleep(0.1), *stream.steps[1:2], Stall()]))
        error = await self.failure(provider=self.provider(idle_timeout_seconds=0.3, max_retries=0))
        self.assertEqual((error.code, error.http_status), ("timeout", 504))
        self.assertIn("sent nothing for 0.3 s", error.message)

    async def test_wrong_key_is_401_not_retried(self) -> None:
        """The API's authentication_error: status 401, its message, one attempt, the key nowhere."""
        error = await self.failure(provider=self.provider(api_key="sk-ant-wrong-key-123456"))
        self.assertEqual((error.status, error.code, error.retryable), (401, "authentication_error", False))
        self.assertIn("invalid x-api-key", error.message)
        self.assertEqual(len(self.upstream.requests), 1)

    async def test_the_sdk_reads_the_scripted_stream_as_we_do(self) -> None:
        """Oracle: the official anthropic SDK, pointed at the upstream, parses the same scripted stream
        without error and yields the same text and tool calls as our client."""
        script = claude_stream("Let me check. ", *CALLS, pieces=5)
        self.upstream.push(script, script)
        ours, _ = await self.complete(tools=TOOLS)

        def with_sdk() -> Any:
            client = anthropic.Anthropic(
                api_key=KEY, base_url=self.upstream.root_url, max_retries=0, default_headers={"Connection": "close"}
            )
            with client, client.messages.stream(
                model="test-model", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                return stream.get_final_message()

        message = await deferToThread(with_sdk)
        await self.upstream.requests[-1].closed
        await deferLater(reactor, 0.01)
        text = "".join(block.text for block in message.content if block.type == "text")
        calls = [
            ToolCall(block.id, block.name, json.dumps(block.input))
            for block in message.content
            if block.type == "tool_use"
        ]
        self.assertEqual(text, ours.text)
        self.assertEqual(message.stop_reason, "tool_use")
        self.assertEqual(
            [(c.id, c.name, json.loads(c.arguments)) for c in calls],
            [(c.id, c.name, json.loads(c.arguments)) for c in ours.tool_calls],
        )


class EventCutTests(WireTestCase):
    """The stream parsed whole and cut at every byte gives the same completion."""

    kind = "claude"

    def wire(self) -> ClaudeWire:
        return ClaudeWire()

    def test_events_cut_at_every_byte(self) -> None:
        data = render(claude_stream("Héllo, wörld. ", *CALLS, pieces=3))
        expected = self._parse([data])
        self.assertEqual(len(expected.tool_calls), 2)
        for cut in range(1, len(data)):
            self.assertEqual(self._parse([data[:cut], data[cut:]]), expected, cut)
        self.assertEqual(self._parse([bytes([b]) for b in data]), expected)

    def _parse(self, chunks: list[bytes]) -> Any:
        errors = Errors(Scrubber(KEY), Exception, lambda: False)  # type: ignore[arg-type]
        sink = EventStream(errors, None)
        decoder = SSEDecoder()
        for chunk in chunks:
            for event in decoder.feed(chunk):
                sink.event(event)
        self.assertTrue(sink.done)
        return sink.completion()

    def test_request_body_merges_consecutive_turns(self) -> None:
        """Two user messages in a row become one turn (the API wants turns to alternate)."""
        body = request_body("m", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None)
        self.assertEqual(body["messages"], [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}])
