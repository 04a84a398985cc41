"""The OpenAI client driven in memory: exact chunk boundaries, tool-call assembly, usage, retries and the
three limits on a fake Clock, cancellation, and the API key kept out of every error."""

from __future__ import annotations

import json
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from aichat.llm import openai
from aichat.llm.openai import OpenAIProvider, _retry_after
from aichat.llm.provider import Completion, LLMError, ToolCall, ToolCallAssembler, Usage
from aichat.llm.tools import specs_from_openai
from aichat.transport import exchange
from tests.llm.fakes import HANG, FakeHTTP, FakeResponse, Hang, sse, text_events
from tests.upstream import chunk

KEY = "sk-test-SECRET-0123456789abcdef"
USER = [{"role": "user", "content": "hi"}]


def provider(http: FakeHTTP, clock: Clock | None = None, **kwargs: Any) -> OpenAIProvider:
    """A client on ``http`` and ``clock`` with the test key."""
    return OpenAIProvider(
        reactor=clock or Clock(), http=http, model="gpt-test", api_key=KEY, base_url="http://up/v1/", **kwargs
    )


def run(client: OpenAIProvider, messages: list[dict[str, Any]] = USER, **kwargs: Any) -> Deferred[Completion]:
    """Start one completion."""
    if kwargs.get("tools") is not None:
        kwargs["tools"] = specs_from_openai(kwargs["tools"])
    return Deferred.fromCoroutine(client.complete(messages, **kwargs))


def dropped() -> Failure:
    """A body cut off by a reset."""
    return Failure(ResponseFailed([Failure(ConnectionRefusedError("reset"))]))


def tool_delta(index: int, *, call_id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
    """One ``delta.tool_calls`` chunk."""
    entry: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        entry["id"] = call_id
        entry["type"] = "function"
    if name:
        entry["function"]["name"] = name
    return chunk({"tool_calls": [entry]})


class StreamTests(SynchronousTestCase):
    """Parsing a successful stream."""

    def test_text_deltas_usage_and_model(self) -> None:
        """Each text delta reaches on_text in order; the completion has the text, finish reason, usage."""
        seen: list[str] = []
        http = FakeHTTP(FakeResponse(pieces=sse(*text_events("Hel", "lo", " world"))))
        result = self.successResultOf(run(provider(http), on_text=seen.append))
        self.assertEqual(seen, ["Hel", "lo", " world"])
        self.assertEqual(result.text, "Hello world")
        self.assertEqual(result.finish_reason, "stop")
        self.assertEqual(result.usage, Usage(3, 3, 6))
        self.assertEqual(result.model, "test-model")
        self.assertEqual(result.tool_calls, [])

    @settings(max_examples=60, deadline=None)
    @given(
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
        newline=st.sampled_from(["\n", "\r\n", "\r"]),
        space=st.sampled_from(["", " "]),
    )
    def test_any_chunk_boundaries(self, cuts: list[int], newline: str, space: str) -> None:
        """Whatever the boundaries, line endings and ``data:`` spacing, the result is the same."""
        events = [
            *text_events("naïve ", "→ ", "ok"),
            tool_delta(0, call_id="call_a", name="echo", args='{"me'),
            tool_delta(0, args='ssage": "é"}'),
        ]
        body = (": keep-alive" + newline + newline).encode() + sse(*events, newline=newline, space=space)
        points = sorted({c % (len(body) + 1) for c in cuts})
        pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
        seen: list[str] = []
        http = FakeHTTP(FakeResponse(pieces=[p for p in pieces if p]))
        result = self.successResultOf(run(provider(http), on_text=seen.append))
        self.assertEqual(result.text, "naïve → ok")
        self.assertEqual("".join(seen), "naïve → ok")
        self.assertEqual(result.tool_calls, [ToolCall("call_a", "echo", '{"message": "é"}')])
        self.assertEqual(result.usage, Usage(3, 3, 6))

    def test_every_single_split_point(self) -> None:
        """Splitting the stream in two at every byte gives the same completion."""
        body = sse(*text_events("a", "b"), tool_delta(0, call_id="c1", name="f", args="{}"))
        for cut in range(len(body) + 1):
            http = FakeHTTP(FakeResponse(pieces=[body[:cut], body[cut:]]))
            result = self.successResultOf(run(provider(http)))
            self.assertEqual((result.text, result.tool_calls), ("ab", [ToolCall("c1", "f", "{}")]), cut)

    def test_parallel_tool_calls_assembled_by_index(self) -> None:
        """Interleaved fragments of two calls are joined per index; finish reason tool_calls."""
        events = [
            chunk({"role": "assistant", "content": None}),
            tool_delta(0, call_id="call_1", name="echo"),
            tool_delta(1, call_id="call_2", name="get-sum"),
            tool_delta(0, args='{"message":'),
            tool_delta(1, args='{"a": 1,'),
            tool_delta(1, args=' "b": 2}'),
            tool_delta(0, args=' "hi"}'),
            chunk({}, finish_reason="tool_calls"),
        ]
        result = self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=sse(*events))))))
        self.assertEqual(
            result.tool_calls,
            [ToolCall("call_1", "echo", '{"message": "hi"}'), ToolCall("call_2", "get-sum", '{"a": 1, "b": 2}')],
        )
        self.assertEqual(result.finish_reason, "tool_calls")
        self.assertEqual(result.text, "")

    def test_id_and_name_repeated_on_every_delta(self) -> None:
        """llama.cpp repeats id and name on each fragment: they are not concatenated."""
        events = [tool_delta(0, call_id="c", name="echo", args=part) for part in ('{"a"', ": 1", "}")]
        result = self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=sse(*events))))))
        self.assertEqual(result.tool_calls, [ToolCall("c", "echo", '{"a": 1}')])

    def test_tool_call_without_id_or_arguments(self) -> None:
        """A call with no id gets one; empty arguments become an empty object."""
        result = self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=sse(tool_delta(0, name="now")))))))
        [call] = result.tool_calls
        self.assertTrue(call.id.startswith("call_"))
        self.assertEqual((call.name, call.arguments), ("now", "{}"))
        self.assertEqual(
            call.to_openai(), {"id": call.id, "type": "function", "function": {"name": "now", "arguments": "{}"}}
        )

    def test_garbage_lines_and_comments_skipped(self) -> None:
        """Unparsable data lines, unknown fields and comments do not break the stream."""
        body = b": comment\n\ngarbage line\ndata: {not json\n\n" + sse(*text_events("ok")) + b"data: tail\n\n"
        result = self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=body)))))
        self.assertEqual(result.text, "ok")

    def test_data_after_done_ignored(self) -> None:
        """Nothing after ``[DONE]`` is parsed."""
        body = sse(*text_events("ok")) + sse(chunk({"content": "late"}), done=False)
        result = self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=body)))))
        self.assertEqual(result.text, "ok")

    def test_done_with_connection_left_open(self) -> None:
        """A server that keeps the body open after ``[DONE]`` is cut off shortly, without an error."""
        clock = Clock()
        response = FakeResponse(pieces=sse(*text_events("ok")), end=None)
        d = run(provider(FakeHTTP(response), clock))
        self.assertNoResult(d)
        clock.advance(2)
        self.assertEqual(self.successResultOf(d).text, "ok")
        self.assertTrue(response.transport.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stream_without_done(self) -> None:
        """A body that ends cleanly without ``[DONE]`` still completes, last event included."""
        body = sse(*text_events("a", "b"), done=False)[:-1]
        result = self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=body)))))
        self.assertEqual((result.text, result.usage), ("ab", Usage(3, 2, 5)))

    def test_empty_stream_is_an_error_not_an_answer(self) -> None:
        """A 200 stream that ends cleanly without ``[DONE]`` and without a chunk (llama.cpp's broken
        ``chatml-function-calling`` stream), or with only comments and a role chunk, is an ``empty`` error,
        not an empty answer; it is not retried."""
        for body in (b"", b": ping\n\n", sse(chunk({"role": "assistant", "content": ""}), done=False)):
            http = FakeHTTP(FakeResponse(pieces=body), FakeResponse(pieces=sse(*text_events("again"))))
            error = self.failureResultOf(run(provider(http)), LLMError).value
            self.assertEqual((error.code, error.started, error.retryable), ("empty", False, False), body)
            self.assertIn("empty answer: its stream ended without content or [DONE]", error.message)
            self.assertEqual(len(http.sent), 1)

    def test_empty_json_200_is_an_error(self) -> None:
        """An empty ``application/json`` 200 is an ``empty`` error too, named as such."""
        response = FakeResponse(pieces=b"", headers={"Content-Type": "application/json"})
        error = self.failureResultOf(run(provider(FakeHTTP(response))), LLMError).value
        self.assertEqual((error.code, error.status), ("empty", 200))
        self.assertIn("empty answer: a 200 with an empty body", error.message)

    def test_done_then_connection_lost_is_complete(self) -> None:
        """``[DONE]`` followed by a lost connection (the chunked body's end never came) is a whole answer,
        text and tool calls alike, and nothing is retried."""
        lost = Failure(ResponseFailed([Failure(ConnectionLost("Chunked decoder in 'CHUNK_LENGTH' state"))]))
        bodies = (
            sse(*text_events("Hel", "lo")),
            sse(tool_delta(0, call_id="c1", name="echo", args='{"a"'), tool_delta(0, call_id="c1", name="echo",
                args=": 1}"), chunk({}, finish_reason="tool_calls")),
        )
        for body in bodies:
            http = FakeHTTP(FakeResponse(pieces=body, end=lost))
            result = self.successResultOf(run(provider(http)))
            self.assertEqual(len(http.sent), 1)
        self.assertEqual(result.tool_calls, [ToolCall("c1", "echo", '{"a": 1}')])

    def test_server_ignoring_stream_flag(self) -> None:
        """A JSON ``chat.completion`` answer is accepted: text (given to on_text) and tool calls."""
        document = {
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": "Sure.",
                        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
        response = FakeResponse(pieces=json.dumps(document).encode(), headers={"Content-Type": "application/json"})
        seen: list[str] = []
        result = self.successResultOf(run(provider(FakeHTTP(response)), on_text=seen.append))
        self.assertEqual(seen, ["Sure."])
        self.assertEqual(result.tool_calls, [ToolCall("x", "f", "{}")])
        self.assertEqual((result.finish_reason, result.usage, result.model), ("tool_calls", Usage(1, 2, 3), "m"))

    def test_error_event_mid_stream(self) -> None:
        """An ``error`` object inside the stream becomes an LLMError with its message, marked started."""
        body = sse(*text_events("par")[:2], {"error": {"message": "model overloaded", "code": "overloaded"}})
        error = self.failureResultOf(run(provider(FakeHTTP(FakeResponse(pieces=body)))), LLMError).value
        self.assertIn("model overloaded", error.message)
        self.assertEqual((error.started, error.code), (True, "overloaded"))

    def test_html_instead_of_stream(self) -> None:
        """A 200 with an unexpected content type is a protocol error quoting the body."""
        response = FakeResponse(pieces=b"<html>captive portal</html>", headers={"Content-Type": "text/html"})
        error = self.failureResultOf(run(provider(FakeHTTP(response))), LLMError).value
        self.assertEqual(error.code, "protocol")
        self.assertIn("captive portal", error.message)


class ErrorTextTests(SynchronousTestCase):
    """What of an upstream's error text a user is shown."""

    def test_reason_hides_server_files_and_keeps_it_short(self) -> None:
        """Files on the server become ``…``, API paths and URLs stay, traceback lines go, and a long text is
        cut at a word to 200 characters; the detail keeps all of it."""
        text = (
            "Traceback (most recent call last):\n"
            '  File "/usr/lib/python3/dist-packages/server/app.py", line 12, in handler\n'
            "failed to load model from /srv/models/smollm2.gguf (see /var/log/llama/server/errors) "
            "for POST /v1/chat/completions, docs at https://example.org/a/b/c.html; " + "padding " * 40
        )
        body = json.dumps({"error": {"message": text}}).encode()
        error = self.failureResultOf(run(provider(FakeHTTP(FakeResponse(400, body)))), LLMError).value
        reason = error.message.removeprefix("the model's server answered HTTP 400: ")
        self.assertTrue(reason.startswith(
            "failed to load model from … (see …) for POST /v1/chat/completions, docs at https://example.org/a/b/c.html;"
        ), reason)
        self.assertTrue(reason.endswith("padding…"), reason)
        self.assertLessEqual(len(reason), 201)
        self.assertEqual(error.detail, f"the model's server answered HTTP 400: {text}")


class RequestTests(SynchronousTestCase):
    """What the client sends."""

    def test_request_shape(self) -> None:
        """POST to base_url/chat/completions, bearer key, streaming with usage, messages and tools as given."""
        http = FakeHTTP(FakeResponse(pieces=sse(*text_events("ok"))))
        tools = [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}]
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:x"}}],
            },
            {"role": "assistant", "content": None, "tool_calls": [ToolCall("c1", "echo", "{}").to_openai()]},
            {"role": "tool", "tool_call_id": "c1", "content": "echoed"},
        ]
        client = provider(http, temperature=0.2, extra_body={"max_tokens": 50, "stream": False})
        self.successResultOf(run(client, messages, tools=tools))
        [sent] = http.sent
        self.assertEqual((sent.method, sent.url), ("POST", "http://up/v1/chat/completions"))
        self.assertEqual(sent.headers.getRawHeaders(b"authorization"), [f"Bearer {KEY}".encode()])
        self.assertEqual(sent.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            sent.body,
            {
                "model": "gpt-test",
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
                "tools": tools,
                "temperature": 0.2,
                "max_tokens": 50,
            },
        )

    def test_one_shot_without_key_or_tools(self) -> None:
        """complete(messages, None): no tools field, no temperature, no Authorization without a key."""
        http = FakeHTTP(FakeResponse(pieces=sse(*text_events("Title"))))
        client = OpenAIProvider(reactor=Clock(), http=http, model="m", base_url="http://local:1/v1")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(client.complete(USER, None))).text, "Title")
        [sent] = http.sent
        self.assertNotIn("tools", sent.body)
        self.assertNotIn("temperature", sent.body)
        self.assertIsNone(sent.headers.getRawHeaders(b"authorization"))

    def test_tool_options_only_with_tools(self) -> None:
        """``llm.options`` of any JSON shape are sent; ``tool_choice`` and ``parallel_tool_calls`` only on
        requests that offer tools (OpenAI rejects them otherwise: the title request has none)."""
        forced = {"type": "function", "function": {"name": "echo"}}
        options = {
            "tool_choice": forced,
            "parallel_tool_calls": False,
            "stop": ["\n\n", "User:"],
            "logit_bias": {"50256": -100},
            "response_format": {"type": "text"},
        }
        tools = [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}]
        http = FakeHTTP(FakeResponse(pieces=sse(*text_events("a"))), FakeResponse(pieces=sse(*text_events("b"))))
        client = provider(http, extra_body=options)
        self.successResultOf(run(client, tools=tools))
        self.successResultOf(run(client))
        with_tools, without = (sent.body for sent in http.sent)
        self.assertEqual({key: with_tools[key] for key in options}, options)
        self.assertNotIn("tool_choice", without)
        self.assertNotIn("parallel_tool_calls", without)
        self.assertEqual(
            (without["stop"], without["logit_bias"], without["response_format"]),
            (["\n\n", "User:"], {"50256": -100}, {"type": "text"}),
        )

    def test_rejects_roles_the_api_rejects(self) -> None:
        """Unknown roles and tool results without tool_call_id never leave the process."""
        http = FakeHTTP()
        for messages in ([{"role": "tool_approval", "content": "x"}], [{"role": "tool", "content": "x"}]):
            self.failureResultOf(run(provider(http), messages), ValueError)
        self.assertEqual(http.sent, [])


class BodyTests(SynchronousTestCase):
    """How the request body is handed to the agent."""

    def test_bytes_are_written_at_once(self) -> None:
        """treq's hook turns the body into a producer that writes it whole at once, with its length
        declared, so the request leaves in the same turn of the reactor as its headers."""
        from twisted.internet.testing import StringTransport

        producer = openai.body_producer(b'{"model":"m"}')
        transport = StringTransport()
        finished = producer.startProducing(transport)
        self.assertEqual((transport.value(), producer.length), (b'{"model":"m"}', 13))
        self.assertIsNone(self.successResultOf(finished))


class RetryTests(SynchronousTestCase):
    """Which failures are retried, when, and how often."""

    def test_retry_after_honoured(self) -> None:
        """A 429 with Retry-After 2 is retried after exactly 2 s, then succeeds."""
        clock = Clock()
        limited = FakeResponse(429, b'{"error":{"message":"Rate limit"}}', headers={"Retry-After": "2"})
        http = FakeHTTP(limited, FakeResponse(pieces=sse(*text_events("ok"))))
        d = run(provider(http, clock))
        clock.advance(1.99)
        self.assertEqual(len(http.sent), 1)
        clock.advance(0.01)
        self.assertEqual(self.successResultOf(d).text, "ok")
        self.assertEqual(len(http.sent), 2)

    def test_retry_after_capped(self) -> None:
        """An hour-long Retry-After waits only retry_after_max."""
        clock = Clock()
        http = FakeHTTP(FakeResponse(503, b"", headers={"Retry-After": "3600"}), FakeResponse(pieces=sse()))
        d = run(provider(http, clock, retry_after_max=5))
        clock.advance(5)
        self.successResultOf(d)

    def test_exponential_backoff_then_give_up(self) -> None:
        """5xx and connection errors are tried max_attempts times, 0.5 s then 1 s apart, then raised."""
        clock = Clock()
        http = FakeHTTP(
            FakeResponse(502, b"bad gateway"),
            ResponseNeverReceived([Failure(ConnectionRefusedError())]),
            FakeResponse(500, b'{"error":{"message":"boom","type":"server_error"}}'),
        )
        d = run(provider(http, clock))
        clock.advance(0.49)
        self.assertEqual(len(http.sent), 1)
        clock.advance(0.01)
        self.assertEqual(len(http.sent), 2)
        clock.advance(0.99)
        self.assertEqual(len(http.sent), 2)
        clock.advance(0.01)
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual((error.status, error.retryable, error.started), (500, True, False))
        self.assertIn("boom", error.message)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connection_refused_every_time(self) -> None:
        """Connection errors end as an LLMError with code connection after all attempts."""
        clock = Clock()
        http = FakeHTTP(*[ConnectionRefusedError("nope")] * 3)
        d = run(provider(http, clock))
        clock.pump([1] * 5)
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual((error.code, error.status, len(http.sent)), ("connection", None, 3))

    def test_client_errors_not_retried(self) -> None:
        """400, 401, 404 and a quota 429 fail at once with the upstream's message."""
        for response, expected in [
            (FakeResponse(400, b'{"error":{"message":"bad messages","code":"invalid"}}'), "bad messages"),
            (FakeResponse(401, b'{"error":{"message":"Incorrect API key"}}'), "Incorrect API key"),
            (FakeResponse(404, b"<h1>Not Found</h1>", headers={"Content-Type": "text/html"}), "Not Found"),
            (FakeResponse(429, b'{"error":{"message":"quota","code":"insufficient_quota"}}'), "quota"),
            (FakeResponse(400, b'{"error":"ollama style"}'), "ollama style"),
        ]:
            http = FakeHTTP(response)
            error = self.failureResultOf(run(provider(http)), LLMError).value
            self.assertIn(expected, error.message)
            self.assertEqual((error.status, error.retryable, len(http.sent)), (response.code, False, 1))

    def test_drop_before_text_retried(self) -> None:
        """A stream cut before any text (only the role chunk seen) is retried."""
        clock = Clock()
        first = FakeResponse(pieces=sse(chunk({"role": "assistant", "content": ""}), done=False), end=dropped())
        http = FakeHTTP(first, FakeResponse(pieces=sse(*text_events("ok"))))
        d = run(provider(http, clock))
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d).text, "ok")

    def test_drop_after_text_not_retried(self) -> None:
        """Once text has streamed, a cut ends the call with started=True and no second request."""
        clock = Clock()
        first = FakeResponse(pieces=sse(*text_events("partial")[:2], done=False), end=dropped())
        http = FakeHTTP(first, FakeResponse(pieces=sse(*text_events("ok"))))
        seen: list[str] = []
        d = run(provider(http, clock), on_text=seen.append)
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual((error.started, error.code, seen, len(http.sent)), (True, "connection", ["partial"], 1))


class LimitTests(SynchronousTestCase):
    """Deadline to the first byte, idle timer, size cap; every timer cancelled."""

    def test_deadline_before_headers(self) -> None:
        """No headers within first_byte_timeout: the request is cancelled and a timeout raised."""
        clock = Clock()
        http = FakeHTTP(HANG)
        d = run(provider(http, clock, first_byte_timeout=5))
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual((error.code, error.retryable, http.cancelled), ("timeout", False, 1))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_after_headers(self) -> None:
        """Headers but no body byte within the deadline is a timeout too."""
        clock = Clock()
        response = FakeResponse(end=None)
        d = run(provider(FakeHTTP(response), clock, first_byte_timeout=5, idle_timeout=100))
        clock.advance(5)
        self.assertEqual(self.failureResultOf(d, LLMError).value.code, "timeout")
        self.assertTrue(response.transport.stopped)

    def test_idle_timer_reset_by_each_chunk(self) -> None:
        """Chunks 9 s apart keep a 10 s idle timer alive; 10 s of silence ends the call, marked started."""
        clock = Clock()
        response = FakeResponse(end=None)
        d = run(provider(FakeHTTP(response), clock, first_byte_timeout=30, idle_timeout=10), on_text=lambda _: None)
        clock.advance(20)
        for part in ("a", "b", "c"):
            response.send(sse(chunk({"content": part}), done=False))
            clock.advance(9)
        self.assertNoResult(d)
        clock.advance(1)
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual((error.code, error.started), ("timeout", True))
        self.assertIn("nothing for 10 s", error.message)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_size_cap(self) -> None:
        """A body larger than max_response_bytes is cut off with code too_large."""
        response = FakeResponse(end=None)
        d = run(provider(FakeHTTP(response), max_response_bytes=2000))
        for _ in range(30):
            response.send(sse(chunk({"content": "x" * 50}), done=False))
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual(error.code, "too_large")
        self.assertTrue(response.transport.stopped)

    def test_timers_cancelled_after_success(self) -> None:
        """A completed call leaves no delayed call behind."""
        clock = Clock()
        self.successResultOf(run(provider(FakeHTTP(FakeResponse(pieces=sse(*text_events("x")))), clock)))
        self.assertEqual(clock.getDelayedCalls(), [])


class CancellationTests(SynchronousTestCase):
    """Cancelling the call's Deferred stops the HTTP work and surfaces CancelledError."""

    def test_cancel_while_connecting(self) -> None:
        """The pending request is cancelled; no timer is left."""
        clock = Clock()
        http = FakeHTTP(HANG)
        d = run(provider(http, clock))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(http.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_reported_as_agent_errors(self) -> None:
        """However the agent reports a cancelled attempt, the caller gets CancelledError and no retry."""
        for error in (
            ConnectingCancelledError(None),
            ResponseNeverReceived([Failure(CancelledError())]),
        ):
            clock = Clock()
            http = FakeHTTP(Hang(error), FakeResponse(pieces=sse()))
            d = run(provider(http, clock))
            d.cancel()
            self.failureResultOf(d, CancelledError)
            clock.advance(60)
            self.assertEqual(len(http.sent), 1)

    def test_cancel_while_streaming(self) -> None:
        """The body's connection is closed and the call fails with CancelledError, not LLMError."""
        clock = Clock()
        response = FakeResponse(pieces=sse(chunk({"content": "a"}), done=False), end=None)
        d = run(provider(FakeHTTP(response), clock))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_during_backoff(self) -> None:
        """Cancelling between attempts sends no further request."""
        clock = Clock()
        http = FakeHTTP(FakeResponse(503, b""), FakeResponse(pieces=sse()))
        d = run(provider(http, clock))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        clock.advance(60)
        self.assertEqual(len(http.sent), 1)


class CallerErrorTests(SynchronousTestCase):
    """Errors that are not the network's are not disguised as such."""

    def test_on_text_raising(self) -> None:
        """An exception from on_text ends the call with that exception and closes the connection."""

        def broken(_: str) -> None:
            raise ZeroDivisionError("caller bug")

        response = FakeResponse(pieces=sse(*text_events("a", "b")), end=None)
        http = FakeHTTP(response, FakeResponse(pieces=sse(*text_events("again"))))
        self.failureResultOf(run(provider(http), on_text=broken), ZeroDivisionError)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(len(http.sent), 1)


class SecretTests(SynchronousTestCase):
    """The API key never appears in an error."""

    def test_key_scrubbed_from_error_bodies(self) -> None:
        """An upstream echoing our key or bearer header gets it redacted."""
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}. Header: Bearer {KEY}"}})
        error = self.failureResultOf(run(provider(FakeHTTP(FakeResponse(401, body.encode())))), LLMError).value
        self.assertNotIn(KEY, error.message)
        self.assertNotIn(KEY, str(error))
        self.assertNotIn(KEY, repr(error))
        self.assertIn("[redacted]", error.message)

    def test_key_scrubbed_from_text_and_connection_errors(self) -> None:
        """Plain-text bodies and connection failures are scrubbed too; the key is not in repr."""
        clock = Clock()
        http = FakeHTTP(FakeResponse(400, f"bad key {KEY}".encode(), headers={}), ConnectionRefusedError(KEY))
        error = self.failureResultOf(run(provider(http, clock)), LLMError).value
        self.assertNotIn(KEY, error.message)
        client = provider(FakeHTTP(ConnectionRefusedError(KEY)), clock, max_attempts=1)
        self.assertNotIn(KEY, self.failureResultOf(run(client), LLMError).value.message)
        self.assertNotIn(KEY, repr(client))

    def test_key_scrubbed_before_the_text_is_cut(self) -> None:
        """A key crossing the length cut of the user's message, or the read limit of an error body, leaves
        no beginning of itself behind (it was cut first and scrubbed after)."""
        prefixes = [KEY[:n] for n in range(6, len(KEY) + 1)]
        for before in range(150, 310, 7):
            body = ("x" * before + " " + KEY + " tail").encode()
            error = self.failureResultOf(run(provider(FakeHTTP(FakeResponse(400, body, headers={})))), LLMError).value
            for text in (error.message, error.detail):
                self.assertFalse([p for p in prefixes if p in text], (before, text))
        for cut in (6, len(KEY) // 2, len(KEY) - 1):
            body = b"y" * (openai.ERROR_BODY_LIMIT - cut) + KEY.encode() + b" and more"
            error = self.failureResultOf(run(provider(FakeHTTP(FakeResponse(400, body, headers={})))), LLMError).value
            self.assertFalse([p for p in prefixes if p in error.detail], cut)
            self.assertTrue(error.detail.endswith("[redacted]"))

    def test_key_not_logged(self) -> None:
        """Retry and failure log lines carry the scrubbed message only."""
        events: list[dict[str, Any]] = []
        self.patch(exchange, "log", Logger(observer=cast(ILogObserver, events.append)))
        clock = Clock()
        body = f'{{"error":{{"message":"bad key {KEY}"}}}}'.encode()
        http = FakeHTTP(FakeResponse(503, body), FakeResponse(401, body))
        d = run(provider(http, clock))
        clock.advance(1)
        self.failureResultOf(d, LLMError)
        self.assertEqual(len(events), 2)
        for event in events:
            self.assertNotIn(KEY, formatEvent(event))
            self.assertNotIn(KEY, repr(event))


class AssemblerTests(SynchronousTestCase):
    """ToolCallAssembler on its own: the shapes servers send."""

    def test_fragments_without_index(self) -> None:
        """Servers that omit ``index`` continue the last call until a new id starts another."""
        assembler = ToolCallAssembler()
        assembler.feed([{"id": "a", "function": {"name": "f", "arguments": '{"x"'}}])
        assembler.feed([{"function": {"arguments": ": 1}"}}])
        assembler.feed([{"id": "b", "function": {"name": "g", "arguments": "{}"}}])
        self.assertEqual(assembler.calls(), [ToolCall("a", "f", '{"x": 1}'), ToolCall("b", "g", "{}")])

    def test_whole_call_in_one_delta_and_object_arguments(self) -> None:
        """A call sent whole (Ollama) works, and arguments sent as an object are encoded as JSON."""
        assembler = ToolCallAssembler()
        assembler.feed([{"index": 0, "id": "a", "function": {"name": "f", "arguments": {"x": 1}}}])
        self.assertEqual(assembler.calls(), [ToolCall("a", "f", '{"x": 1}')])

    def test_malformed_entries_ignored(self) -> None:
        """Non-list and non-dict fragments are skipped."""
        assembler = ToolCallAssembler()
        assembler.feed("nonsense")
        assembler.feed([None, 3])
        self.assertFalse(assembler)
        self.assertEqual(assembler.calls(), [])


class RetryAfterTests(SynchronousTestCase):
    """Parsing Retry-After."""

    def test_seconds_and_dates(self) -> None:
        """Seconds (also fractional) and HTTP dates are understood; nonsense is ignored."""

        def parse(value: str, now: float = 0.0) -> float | None:
            return _retry_after(Headers({b"Retry-After": [value.encode()]}), now)

        self.assertEqual(parse("7"), 7.0)
        self.assertEqual(parse("0.25"), 0.25)
        self.assertEqual(parse("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0), 10.0)
        self.assertIsNone(parse("soon"))
        self.assertIsNone(_retry_after(Headers(), 0.0))
