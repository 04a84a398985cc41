"""The offline mock provider: deterministic answers, its documented tool-call syntax, summaries of tool
results, word-by-word streaming on an injected clock, cancellation, and the warning it logs."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from aichat.llm import mock
from aichat.llm.mock import MockProvider
from aichat.llm.provider import Completion, ToolCall
from aichat.llm.tools import specs_from_openai

TOOLS = [
    {"type": "function", "function": {"name": "echo", "parameters": {}}},
    {"type": "function", "function": {"name": "get-sum", "parameters": {}}},
]


def complete(
    provider: MockProvider, messages: list[dict[str, Any]], tools: Any = None, **kw: Any
) -> Deferred[Completion]:
    """Start one completion."""
    specs = None if tools is None else specs_from_openai(tools)
    return Deferred.fromCoroutine(provider.complete(messages, specs, **kw))


class MockTests(SynchronousTestCase):
    """Behaviour of MockProvider without a delay."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(mock, "log", Logger(observer=cast(ILogObserver, self.events.append)))
        self.provider = MockProvider()

    def test_logged_as_mock(self) -> None:
        """Creating it logs a warning that says it is the mock."""
        [event] = self.events
        self.assertIn("MOCK", formatEvent(event))
        self.assertEqual(event["log_level"].name, "warn")

    def test_plain_answer_streams_words(self) -> None:
        """The answer names the last user message and the tool count; deltas are its words."""
        seen: list[str] = []
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "How are you?"}]
        result = self.successResultOf(complete(self.provider, messages, TOOLS, on_text=seen.append))
        self.assertEqual(result.text, "Mock response to: 'How are you?'. Available tools: 2")
        self.assertEqual("".join(seen), result.text)
        self.assertEqual(seen[:3], ["Mock ", "response ", "to: "])
        self.assertEqual((result.finish_reason, result.tool_calls, result.model), ("stop", [], "mock-model"))
        again = self.successResultOf(complete(self.provider, messages, TOOLS))
        self.assertEqual(again, result)

    def test_one_shot_without_tools(self) -> None:
        """complete(messages, None) works for a one-shot prompt such as a title."""
        result = self.successResultOf(complete(self.provider, [{"role": "user", "content": "Title this"}]))
        self.assertEqual(result.text, "Mock response to: 'Title this'. Available tools: 0")

    def test_call_syntax_gives_parallel_tool_calls(self) -> None:
        """Each ``call <tool> <json>`` line becomes a call; arguments pass through as written."""
        text = 'Please:\ncall echo {"message": "hi"}\ncall get-sum {"a": 1, "b": 2}\ncall echo {bad json'
        result = self.successResultOf(complete(self.provider, [{"role": "user", "content": text}], TOOLS))
        self.assertEqual(
            result.tool_calls,
            [
                ToolCall("call_mock_1", "echo", '{"message": "hi"}'),
                ToolCall("call_mock_2", "get-sum", '{"a": 1, "b": 2}'),
                ToolCall("call_mock_3", "echo", "{bad json"),
            ],
        )
        self.assertEqual((result.text, result.finish_reason), ("", "tool_calls"))

    def test_call_without_arguments(self) -> None:
        """``call echo`` alone sends an empty object."""
        result = self.successResultOf(complete(self.provider, [{"role": "user", "content": "call echo"}], TOOLS))
        self.assertEqual(result.tool_calls, [ToolCall("call_mock_1", "echo", "{}")])

    def test_unknown_tool(self) -> None:
        """A tool that is not offered is refused in text, not called."""
        result = self.successResultOf(complete(self.provider, [{"role": "user", "content": "call rm {}"}], TOOLS))
        self.assertEqual(
            (result.tool_calls, result.text), ([], "Mock cannot call 'rm': no such tool. Available tools: 2")
        )

    def test_summary_after_tool_results(self) -> None:
        """After tool results the answer quotes each result with its tool's name."""
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "call echo {}\ncall get-sum {}"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [ToolCall("a", "echo", "{}").to_openai(), ToolCall("b", "get-sum", "{}").to_openai()],
            },
            {"role": "tool", "tool_call_id": "a", "content": "Echo: hi"},
            {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "3"}]},
        ]
        result = self.successResultOf(complete(self.provider, messages, TOOLS))
        self.assertEqual(result.text, "Mock summary of 2 tool result(s): echo: Echo: hi | get-sum: 3")
        self.assertEqual(result.tool_calls, [])

    def test_loop_calls_again_after_results(self) -> None:
        """``loop`` asks for the call after every result, with a new id each round."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": "loop echo {}"}]
        ids = []
        for _ in range(3):
            result = self.successResultOf(complete(self.provider, messages, TOOLS))
            [call] = result.tool_calls
            ids.append(call.id)
            messages += [
                {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
                {"role": "tool", "tool_call_id": call.id, "content": "again"},
            ]
        self.assertEqual(ids, ["call_mock_1", "call_mock_2", "call_mock_3"])

    def test_image_parts(self) -> None:
        """A vision message's text parts are quoted and its images counted."""
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
        result = self.successResultOf(complete(self.provider, [{"role": "user", "content": content}]))
        self.assertEqual(result.text, "Mock response to: 'What is this? [1 image(s)]'. Available tools: 0")

    def test_rejects_bad_roles(self) -> None:
        """History with a role the API rejects is refused, as by the real client."""
        self.failureResultOf(complete(self.provider, [{"role": "tool_approval", "content": "x"}]), ValueError)


class DelayTests(SynchronousTestCase):
    """Streaming with a delay on an injected clock."""

    def test_one_word_per_delay_and_cancel(self) -> None:
        """Words arrive ``delay`` apart; cancelling stops the stream with CancelledError."""
        clock = Clock()
        provider = MockProvider(clock, delay=0.2)
        seen: list[str] = []
        d = complete(provider, [{"role": "user", "content": "a b c"}], on_text=seen.append)
        self.assertEqual(seen, ["Mock "])
        clock.advance(0.2)
        self.assertEqual(seen, ["Mock ", "response "])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        clock.advance(10)
        self.assertEqual(len(seen), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_delay_needs_reactor(self) -> None:
        """A delay without a reactor is a configuration error."""
        self.assertRaises(ValueError, MockProvider, None, delay=1.0)
