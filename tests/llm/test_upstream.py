"""The OpenAI client against the scripted upstream on a real port: every failure mode of the issue over real
TCP (429 with Retry-After, 5xx, resets before and during the stream, stalls, garbage, error bodies), what
the upstream receives, cancellation reaching the server, and the upstream run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from aichat.llm.openai import OpenAIProvider, make_http_client
from aichat.llm.provider import Completion, LLMError, ToolCall, Usage
from aichat.llm.tools import specs_from_openai
from aichat.transport import exchange
from tests.upstream import (
    LLAMA_NULL_CONTENT,
    Drop,
    Raw,
    Reset,
    Script,
    Send,
    SendHeaders,
    Sleep,
    Stall,
    Upstream,
    _as_completion,
    chunk,
    error_reply,
    text_stream,
    tool_stream,
)

KEY = "sk-upstream-SECRET-42424242"
reactor: Any = global_reactor
ROOT = Path(__file__).resolve().parents[2]
TOOLS = [
    {"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get-sum", "parameters": {"type": "object"}}},
]


class UpstreamTests(TestCase):
    """One upstream and one client per test; both closed afterwards."""

    timeout = 20

    def setUp(self) -> None:
        self.upstream = Upstream(reactor)
        self.upstream.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.upstream.stop()))

    def client(self, **kwargs: Any) -> OpenAIProvider:
        """A client of the upstream with fast retries; its pool is closed at cleanup."""
        options: dict[str, Any] = {"backoff_initial": 0.01, "retry_after_max": 0.05}
        options.update(kwargs)
        client = OpenAIProvider(
            reactor=reactor, model="gpt-test", api_key=KEY, base_url=self.upstream.base_url, **options
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        return client

    async def complete(self, client: OpenAIProvider | None = None, **kwargs: Any) -> tuple[Completion, list[str]]:
        """One completion of a user message; returns it and the text deltas seen."""
        seen: list[str] = []
        messages = kwargs.pop("messages", [{"role": "user", "content": "hi"}])
        if kwargs.get("tools") is not None:
            kwargs["tools"] = specs_from_openai(kwargs["tools"])
        result = await (client or self.client()).complete(messages, on_text=seen.append, **kwargs)
        return result, seen

    async def failure(self, client: OpenAIProvider | None = None, **kwargs: Any) -> LLMError:
        """The LLMError a completion ends with."""
        try:
            await self.complete(client, **kwargs)
        except LLMError as error:
            self.assertNotIn(KEY, str(error))
            return error
        raise AssertionError("the completion did not fail")

    async def test_streamed_text_with_delays(self) -> None:
        """Chunks sent 20 ms apart arrive as separate deltas; usage and [DONE] end it."""
        self.upstream.push(
            text_stream(
                ["Hel", "lo", "!"], delay=0.02, usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            )
        )
        result, seen = await self.complete()
        self.assertEqual((seen, result.text, result.finish_reason), (["Hel", "lo", "!"], "Hello!", "stop"))
        self.assertEqual((result.usage, result.model), (Usage(5, 3, 8), "test-model"))
        [received] = self.upstream.requests
        self.assertEqual((received.method, received.path), ("POST", "/v1/chat/completions"))
        self.assertEqual(received.headers["authorization"], f"Bearer {KEY}")
        self.assertEqual(received.body["stream_options"], {"include_usage": True})

    async def test_parallel_tool_calls(self) -> None:
        """Two calls interleaved across deltas, with and without id/name repeated, are assembled."""
        calls = [("call_1", "echo", '{"message": "hello world"}'), ("call_2", "get-sum", '{"a": 2, "b": 3}')]
        for repeat in (False, True):
            self.upstream.push(tool_stream(calls, pieces=4, repeat_id_and_name=repeat, text="Let me check. "))
            result, seen = await self.complete(tools=TOOLS)
            self.assertEqual(result.tool_calls, [ToolCall(*call) for call in calls])
            self.assertEqual((seen, result.finish_reason), (["Let me check. "], "tool_calls"))

    async def test_history_sent_as_the_api_requires(self) -> None:
        """Assistant tool_calls and tool results with tool_call_id reach the upstream unchanged."""
        call = ToolCall("call_9", "echo", '{"message": "x"}')
        messages = [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "call echo"},
            {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": "call_9", "content": "Echo: x"},
        ]
        result, _ = await self.complete(messages=messages, tools=TOOLS)
        self.assertEqual(result.text, "Mock summary of 1 tool result(s): echo: Echo: x")
        body = self.upstream.requests[0].body
        self.assertEqual(body["messages"], messages)
        self.assertEqual({m["role"] for m in body["messages"]}, {"system", "user", "assistant", "tool"})
        self.assertEqual(body["tools"], TOOLS)

    async def test_429_with_retry_after(self) -> None:
        """A 429 is retried after its Retry-After; the second attempt succeeds."""
        self.upstream.push(error_reply(429, "Rate limit reached", code="rate_limit_exceeded", retry_after="0.05"))
        self.upstream.push(text_stream(["ok"]))
        start = reactor.seconds()
        result, _ = await self.complete()
        self.assertEqual(result.text, "ok")
        self.assertGreaterEqual(reactor.seconds() - start, 0.04)
        self.assertEqual(len(self.upstream.requests), 2)

    async def test_5xx_retried_then_surfaced(self) -> None:
        """503 then 502 then 500: three attempts, the last message surfaced with its status."""
        for status in (503, 502, 500):
            self.upstream.push(error_reply(status, f"upstream {status}"))
        error = await self.failure()
        self.assertEqual((error.status, error.retryable, error.started), (500, True, False))
        self.assertIn("upstream 500", error.message)
        self.assertEqual(len(self.upstream.requests), 3)

    async def test_error_body_not_retried(self) -> None:
        """A 400 error body is surfaced at once with its message and code, without our key."""
        self.upstream.push(
            error_reply(400, f"Invalid 'messages' (key {KEY})", type="invalid_request_error", code="bad")
        )
        error = await self.failure()
        self.assertEqual((error.status, error.code, error.retryable), (400, "bad", False))
        self.assertIn("Invalid 'messages'", error.message)
        self.assertEqual(len(self.upstream.requests), 1)

    async def test_wrong_key_401(self) -> None:
        """An upstream requiring another key answers 401; the message is OpenAI's, not retried."""
        self.upstream.api_key = "sk-other"
        error = await self.failure()
        self.assertEqual((error.status, error.code), (401, "invalid_api_key"))

    async def test_reset_before_headers_retried(self) -> None:
        """A connection reset before any response is a connection error, retried."""
        self.upstream.push(Script([Reset()]), text_stream(["ok"]))
        result, _ = await self.complete()
        self.assertEqual(result.text, "ok")
        self.assertEqual(len(self.upstream.requests), 2)

    async def test_reset_after_text_not_retried(self) -> None:
        """A reset once text has streamed ends the call with started=True; the partial text was seen."""
        self.upstream.push(text_stream(["par", "tial"], done=False).plus(Sleep(0.02), Reset()), text_stream(["no"]))
        seen: list[str] = []
        with self.assertRaises(LLMError) as caught:
            await self.client().complete([{"role": "user", "content": "x"}], on_text=seen.append)
        self.assertEqual((caught.exception.started, caught.exception.code), (True, "connection"))
        self.assertEqual(seen, ["par", "tial"])
        self.assertEqual(len(self.upstream.requests), 1)

    async def test_stall_before_headers(self) -> None:
        """No response at all: the first-byte deadline ends the call and closes the connection."""
        self.upstream.push(Script([Stall()]))
        error = await self.failure(self.client(first_byte_timeout=0.2))
        self.assertEqual((error.code, error.started), ("timeout", False))
        self.assertEqual(await self.upstream.requests[0].closed, "lost")

    async def test_stall_after_headers(self) -> None:
        """Headers then nothing: the first-byte deadline applies to the body too."""
        self.upstream.push(Script([SendHeaders(), Stall()]))
        error = await self.failure(self.client(first_byte_timeout=0.2))
        self.assertEqual(error.code, "timeout")

    async def test_stall_mid_stream(self) -> None:
        """Text then silence: the idle timer ends the call, marked started."""
        self.upstream.push(text_stream(["a"], done=False).plus(Stall()))
        error = await self.failure(self.client(idle_timeout=0.2))
        self.assertEqual((error.code, error.started), ("timeout", True))
        self.assertEqual(await self.upstream.requests[0].closed, "lost")

    async def test_garbage_lines(self) -> None:
        """Garbage, comments and an unparsable data line among the chunks are skipped."""
        script = text_stream(["a", "b"])
        script = Script(
            [
                Raw(b": hello\n\nnot an sse line\ndata: {broken\n\n"),
                *script.steps[:2],
                Raw(b"\r\n\r\n"),
                *script.steps[2:],
            ]
        )
        self.upstream.push(script)
        result, _ = await self.complete()
        self.assertEqual(result.text, "ab")

    async def test_json_answer_to_a_stream_request(self) -> None:
        """An upstream that answers with one chat.completion object still works."""
        self.upstream.push(_as_completion(tool_stream([("c", "echo", "{}")], text="Calling.")))
        result, seen = await self.complete(tools=TOOLS)
        self.assertEqual((seen, result.tool_calls), (["Calling."], [ToolCall("c", "echo", "{}")]))

    async def test_non_streaming_request(self) -> None:
        """The upstream answers a stream:false request with a chat.completion built from the script."""
        self.upstream.push(tool_stream([("c", "echo", '{"a": 1}')], text="Hi"))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.post(
            self.upstream.base_url + "/chat/completions",
            pool=pool,
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        document = await response.json()
        message = document["choices"][0]["message"]
        self.assertEqual(document["object"], "chat.completion")
        self.assertEqual(message["content"], "Hi")
        self.assertEqual(message["tool_calls"][0]["function"], {"name": "echo", "arguments": '{"a": 1}'})
        self.assertEqual(document["choices"][0]["finish_reason"], "tool_calls")

    async def test_cancel_closes_the_upstream_connection(self) -> None:
        """Cancelling mid-stream fails with CancelledError and the upstream sees the connection go."""
        self.upstream.push(text_stream(["first"], done=False).plus(Stall()))
        seen: list[str] = []
        call = Deferred.fromCoroutine(self.client().complete([{"role": "user", "content": "x"}], on_text=seen.append))
        while not seen:
            await deferLater(reactor, 0.01)
        call.cancel()
        with self.assertRaises(CancelledError):
            await call
        self.assertEqual(await self.upstream.requests[0].closed, "lost")

    async def test_cancel_before_headers(self) -> None:
        """Cancelling while the upstream has not answered is a CancelledError, never a retry."""
        self.upstream.push(Script([Stall()]))
        call = Deferred.fromCoroutine(self.client().complete([{"role": "user", "content": "x"}]))
        while not self.upstream.requests:
            await deferLater(reactor, 0.01)
        call.cancel()
        with self.assertRaises(CancelledError):
            await call
        self.assertEqual(await self.upstream.requests[0].closed, "lost")
        await deferLater(reactor, 0.1)
        self.assertEqual(len(self.upstream.requests), 1)

    # What llama.cpp (llama-cpp-python 0.3.36) sends; see tests/llama for the real server.

    async def test_empty_stream_is_an_error_not_an_answer(self) -> None:
        """200 and an event stream that ends (cleanly) without a chunk and without ``[DONE]`` (llama.cpp with
        ``--chat_format chatml-function-calling`` and ``tool_choice: auto``), one with only a role chunk, and
        an empty JSON 200: ``empty`` errors, each from one request (no retries)."""
        scripts = [
            Script([SendHeaders()]),
            Script([Send(chunk({"role": "assistant", "content": None}))]),
            Script([], headers={"Content-Type": "application/json"}, body=b""),
        ]
        for script in scripts:
            self.upstream.push(script, text_stream(["not asked for"]))
            before = len(self.upstream.requests)
            error = await self.failure(tools=TOOLS)
            self.assertEqual((error.code, error.started), ("empty", False), error)
            self.assertEqual(len(self.upstream.requests) - before, 1)
            self.upstream.scripts.clear()

    async def test_done_then_close_without_the_final_chunk_is_complete(self) -> None:
        """llama.cpp interrupting a stream sends ``[DONE]`` and closes without the chunked body's last
        chunk: the answer (text, or tool calls repeating id and name in every delta) is complete, and
        nothing is retried."""
        self.upstream.push(text_stream(["Hel", "lo"]).plus(Drop()))
        result, seen = await self.complete()
        self.assertEqual((result.text, seen), ("Hello", ["Hel", "lo"]))
        calls = [("call_1", "echo", '{"message": "hi"}')]
        self.upstream.push(tool_stream(calls, repeat_id_and_name=True).plus(Drop()))
        result, _ = await self.complete(tools=TOOLS)
        self.assertEqual(result.tool_calls, [ToolCall(*calls[0])])
        self.assertEqual(len(self.upstream.requests), 2)

    async def test_error_text_short_for_the_user_whole_in_the_log(self) -> None:
        """llama.cpp's 500 (pydantic's validation dump and a traceback line with a file on the server): the
        error's message has the status and a short reason without the traceback or the path; its detail,
        which is what the log gets, has everything."""
        events: list[dict[str, Any]] = []
        self.patch(exchange, "log", Logger(observer=cast(ILogObserver, events.append)))
        self.upstream.push(error_reply(500, LLAMA_NULL_CONTENT.format(n=2), type="internal_server_error"))
        error = await self.failure(self.client(max_attempts=1))
        self.assertTrue(error.message.startswith("the model's server answered HTTP 500: 7 validation errors: "))
        self.assertLessEqual(len(error.message), 260)
        for hidden in ("site-packages", "File \"", "app.py", "\n"):
            self.assertNotIn(hidden, error.message)
        self.assertIn('File "/opt/llama/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376', error.detail)
        self.assertIn("Input should be a valid string", error.detail)
        [logged] = events
        self.assertIn("Input should be a valid string", formatEvent(logged))
        self.assertIn("llama_cpp/server/app.py", formatEvent(logged))

    async def test_close_without_done_after_text_is_still_an_error(self) -> None:
        """Without ``[DONE]``, a connection closed before the body's end is a broken answer (started), so
        the caller keeps what was said and reports it."""
        self.upstream.push(text_stream(["par", "tial"], done=False).plus(Sleep(0.02), Drop()))
        error = await self.failure()
        self.assertEqual((error.code, error.started), ("connection", True))

    async def test_connection_refused(self) -> None:
        """A closed port is a retryable connection error, tried max_attempts times."""
        client = self.client()
        await self.upstream.stop()
        error = await self.failure(client)
        self.assertEqual((error.code, error.retryable, error.status), ("connection", True, None))


class HTTPClientTests(TestCase):
    """The agent behind the default client."""

    def test_connect_timeout_reaches_the_connection(self) -> None:
        """make_http_client's connect timeout is the one the TCP connection attempt gets."""
        memory = MemoryReactorClock()
        client = make_http_client(memory, connect_timeout=3.5)
        client.request("POST", "http://127.0.0.1:9/v1/chat/completions", data=b"{}", unbuffered=True)
        memory.advance(0)
        [(host, port, _, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 3.5))


class SubprocessTests(TestCase):
    """``python -m tests.upstream`` as the benchmarks and end-to-end tests run it."""

    timeout = 30

    def spawn(self, *arguments: str) -> str:
        """Start ``python -m tests.upstream --port 0 ARGUMENTS``, stopped at cleanup; return its base URL."""
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream", "--port", "0", *arguments],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        assert process.stdout is not None
        line = process.stdout.readline()
        process.stdout.close()
        self.assertTrue(line.startswith("listening on http://127.0.0.1:"), line)
        return line.split()[-1]

    async def test_default_echo_script(self) -> None:
        """The process prints its URL, streams exactly --chunks deltas, and calls tools on request."""
        base_url = self.spawn("--chunks", "5", "--delay", "0.001")
        client = OpenAIProvider(reactor=reactor, model="m", base_url=base_url)
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        seen: list[str] = []
        result = await client.complete([{"role": "user", "content": "one two"}], on_text=seen.append)
        self.assertEqual(seen, ["Echo: ", "one ", "two", "Echo: ", "one "])
        self.assertEqual(result.finish_reason, "stop")
        message = {"role": "user", "content": 'call echo {"message": "hi"}\ncall get-sum {"a": 1, "b": 2}'}
        result = await client.complete([message], specs_from_openai(TOOLS))
        self.assertEqual(
            result.tool_calls,
            [
                ToolCall("call_mock_1", "echo", '{"message": "hi"}'),
                ToolCall("call_mock_2", "get-sum", '{"a": 1, "b": 2}'),
            ],
        )
        self.assertEqual(json.loads(result.tool_calls[1].arguments), {"a": 1, "b": 2})
