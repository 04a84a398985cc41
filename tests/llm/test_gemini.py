"""Gemini (native streamGenerateContent) against a scripted upstream on a real port that speaks the
format exactly: text, parallel function calls in one event or several (with and without ids), thought
signatures kept and sent back, the request on the wire, history accepted by the API's own rules,
events cut at every byte (CRLF framing), 429/503 retried, an error mid-stream, a stall, a blocked prompt,
a wrong key; and the official ``google-genai`` SDK as the oracle that the scripted stream is the real
format."""

from __future__ import annotations

import base64
import json
from typing import Any

from google import genai
from google.genai import types
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from aichat.llm.gemini import FOREIGN_SIGNATURE, ResponseStream
from aichat.llm.provider import ToolCall, Usage
from aichat.sse import SSEDecoder
from aichat.transport.exchange import Errors
from aichat.transport.scrub import Scrubber
from tests.llm.wire_support import KEY, TOOLS, WireTestCase, reactor, render
from tests.upstream import Raw, Reset, Script, Sleep, Stall
from tests.upstream_gemini import Call, GeminiWire, event, gemini_error, gemini_stream, refusal

SIG_A = base64.b64encode(b"signature of call a").decode()
CALLS = [
    Call("everything__echo", {"message": "parallel one"}, id="fc-1", signature=SIG_A),
    Call("everything__get-sum", {"a": 40, "b": 2}, id="fc-2"),
]
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "use the tools"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            ToolCall("fc-1", "everything__echo", '{"message": "x"}', signature=SIG_A).to_openai(),
            ToolCall("call_from_openai", "everything__get-sum", '{"a": 1, "b": 2}').to_openai(),
        ],
    },
    {"role": "tool", "tool_call_id": "fc-1", "content": "Echo: x"},
    {"role": "tool", "tool_call_id": "call_from_openai", "content": "Tool returned an error: no", "is_error": True},
    {"role": "assistant", "content": "Done."},
    {"role": "user", "content": "and again"},
]


class GeminiUpstreamTests(WireTestCase):
    kind = "gemini"

    def wire(self) -> GeminiWire:
        return GeminiWire()

    async def test_text_then_parallel_calls_in_one_event(self) -> None:
        """Two functionCall parts in one event are two calls with their own arguments and ids; the first
        keeps its thought signature; finish STOP with calls is ``tool_calls``; usage read."""
        self.upstream.push(gemini_stream(["Let me ", "check. "], CALLS, calls_per_event=2, delay=0.005))
        result, seen = await self.complete(tools=TOOLS)
        self.assertEqual(seen, ["Let me ", "check. "])
        self.assertEqual(
            result.tool_calls,
            [
                ToolCall("fc-1", "everything__echo", '{"message": "parallel one"}', signature=SIG_A),
                ToolCall("fc-2", "everything__get-sum", '{"a": 40, "b": 2}'),
            ],
        )
        self.assertEqual(
            (result.finish_reason, result.usage, result.model), ("tool_calls", Usage(9, 4, 13), "gemini-test")
        )

    async def test_parallel_calls_without_ids_across_events(self) -> None:
        """Calls without ids, one per event, even of the same function: separate calls with distinct ids."""
        calls = [Call("everything__echo", {"message": "a"}), Call("everything__echo", {"message": "b"})]
        self.upstream.push(gemini_stream([], calls, calls_per_event=1))
        result, _ = await self.complete(tools=TOOLS)
        self.assertEqual([json.loads(c.arguments) for c in result.tool_calls], [{"message": "a"}, {"message": "b"}])
        self.assertEqual(len({c.id for c in result.tool_calls}), 2)

    async def test_request_on_the_wire(self) -> None:
        """POST /v1beta/models/<model>:streamGenerateContent?alt=sse with x-goog-api-key (never in the URL);
        system as systemInstruction, tools as functionDeclarations with the JSON Schema as it is."""
        await self.complete(tools=TOOLS)
        request = self.upstream.requests[0]
        self.assertEqual(request.path, "/v1beta/models/test-model:streamGenerateContent")
        self.assertEqual(request.headers["x-goog-api-key"], KEY)
        self.assertNotIn(KEY, request.path)
        body = request.body
        self.assertEqual(body["systemInstruction"], {"parts": [{"text": "Be brief."}]})
        self.assertEqual(body["contents"], [{"role": "user", "parts": [{"text": "hi"}]}])
        self.assertEqual(body["generationConfig"], {"temperature": 0.2})
        declarations = body["tools"][0]["functionDeclarations"]
        self.assertEqual(
            declarations[0],
            {"name": "everything__echo", "description": "Echoes back the input",
             "parametersJsonSchema": TOOLS[0]["function"]["parameters"]},
        )

    async def test_history_round_trips_signatures_and_results(self) -> None:
        """The model turn has a text part and one functionCall part per call, each with its own signature
        (Google's placeholder for the call another provider made); the results are one user turn of
        functionResponse parts by name and id, an error as ``error``; the API's rules accept it."""
        await self.complete(HISTORY, tools=TOOLS)
        body = self.upstream.requests[0].body
        self.assertIsNone(refusal(body))
        contents = body["contents"]
        self.assertEqual([c["role"] for c in contents], ["user", "model", "user", "model", "user"])
        self.assertEqual(
            contents[1]["parts"],
            [
                {"text": "Checking."},
                {"functionCall": {"id": "fc-1", "name": "everything__echo", "args": {"message": "x"}},
                 "thoughtSignature": SIG_A},
                {"functionCall": {"id": "call_from_openai", "name": "everything__get-sum", "args": {"a": 1, "b": 2}},
                 "thoughtSignature": FOREIGN_SIGNATURE},
            ],
        )
        self.assertEqual(
            contents[2]["parts"],
            [
                {"functionResponse": {"id": "fc-1", "name": "everything__echo", "response": {"result": "Echo: x"}}},
                {"functionResponse": {"id": "call_from_openai", "name": "everything__get-sum",
                                      "response": {"error": "Tool returned an error: no"}}},
            ],
        )

    async def test_429_and_503_retried(self) -> None:
        """RESOURCE_EXHAUSTED after its Retry-After, then UNAVAILABLE, then the answer."""
        self.upstream.push(
            gemini_error(429, "Resource has been exhausted (e.g. check quota).", retry_after="0.05"),
            gemini_error(503, "The model is overloaded. Please try again later."),
            gemini_stream(["ok"]),
        )
        start = reactor.seconds()
        result, _ = await self.complete()
        self.assertEqual(result.text, "ok")
        self.assertGreaterEqual(reactor.seconds() - start, 0.05)
        self.assertEqual(len(self.upstream.requests), 3)

    async def test_error_in_the_stream_after_text(self) -> None:
        """An error object mid-stream after text: not retried, started, with Google's status as its code."""
        error_event = (
            b'data: {"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}\r\n\r\n'
        )
        self.upstream.push(Script([Raw(event([{"text": "Partial"}])), Raw(error_event)]))
        error = await self.failure()
        self.assertEqual((error.started, error.code), (True, "UNAVAILABLE"))
        self.assertIn("The model is overloaded.", error.message)
        self.assertEqual(len(self.upstream.requests), 1)
        await self.upstream.requests[0].closed
        await deferLater(reactor, 0)

    async def test_reset_before_the_answer_is_retried(self) -> None:
        self.upstream.push(Script([Reset()]), gemini_stream(["fine"]))
        result, _ = await self.complete()
        self.assertEqual(result.text, "fine")

    async def test_stall_hits_the_idle_timer(self) -> None:
        """Text, then silence past the idle timeout: a timeout (504), the text passed on already."""
        self.upstream.push(Script([Raw(event([{"text": "Hel"}])), Sleep(0.05), Raw(event([{"text": "lo"}])), Stall()]))
        seen: list[str] = []
        provider = self.provider(idle_timeout_seconds=0.3, max_retries=0)
        try:
            await provider.complete([{"role": "user", "content": "hi"}], on_text=seen.append)
        except Exception as error:
            self.assertEqual((getattr(error, "code", None), getattr(error, "http_status", None)), ("timeout", 504))
        else:
            raise AssertionError("no timeout")
        self.assertEqual(seen, ["Hel", "lo"])

    async def test_blocked_prompt_is_an_error(self) -> None:
        """No candidates and a block reason: an error naming it, not an empty answer."""
        blocked = b'data: {"promptFeedback":{"blockReason":"SAFETY"},"modelVersion":"gemini-test"}\r\n\r\n'
        self.upstream.push(Script([Raw(blocked)]))
        error = await self.failure()
        self.assertEqual(error.code, "blocked")
        self.assertIn("SAFETY", error.message)

    async def test_wrong_key_is_400_not_retried(self) -> None:
        error = await self.failure(provider=self.provider(api_key="AIza-wrong-key-0000"))
        self.assertEqual((error.status, error.code, error.retryable), (400, "INVALID_ARGUMENT", False))
        self.assertIn("API key not valid", error.message)
        self.assertEqual(len(self.upstream.requests), 1)

    async def test_the_sdk_reads_the_scripted_stream_as_we_do(self) -> None:
        """Oracle: the official google-genai SDK, pointed at the upstream, parses the same scripted stream
        without error and yields the same text, function calls (ids, arguments) and signatures."""
        script = gemini_stream(["Let me ", "check. "], CALLS, calls_per_event=2)
        self.upstream.push(script, script)
        ours, _ = await self.complete(tools=TOOLS)

        def with_sdk() -> list[Any]:
            client = genai.Client(
                api_key=KEY,
                http_options=types.HttpOptions(
                    base_url=self.upstream.root_url, api_version="v1beta", headers={"Connection": "close"}
                ),
            )
            with client:
                return list(client.models.generate_content_stream(model="test-model", contents="hi"))

        chunks = await deferToThread(with_sdk)
        await self.upstream.requests[-1].closed
        await deferLater(reactor, 0.01)
        parts = [part for chunk in chunks for part in chunk.candidates[0].content.parts]
        text = "".join(part.text for part in parts if part.text)
        calls = [
            (
                part.function_call.id,
                part.function_call.name,
                part.function_call.args,
                base64.b64encode(part.thought_signature).decode() if part.thought_signature else None,
            )
            for part in parts
            if part.function_call
        ]
        self.assertEqual(text, ours.text)
        self.assertEqual(chunks[-1].candidates[0].finish_reason, types.FinishReason.STOP)
        self.assertEqual(calls, [(c.id, c.name, json.loads(c.arguments), c.signature) for c in ours.tool_calls])


class EventCutTests(WireTestCase):
    """The stream parsed whole and cut at every byte gives the same completion."""

    kind = "gemini"

    def wire(self) -> GeminiWire:
        return GeminiWire()

    def test_events_cut_at_every_byte(self) -> None:
        data = render(gemini_stream(["Héllo, ", "wörld. "], CALLS, calls_per_event=2))
        self.assertIn(b"\r\n\r\n", data)
        expected = self._parse([data])
        self.assertEqual(len(expected.tool_calls), 2)
        for cut in range(1, len(data)):
            self.assertEqual(self._parse([data[:cut], data[cut:]]), expected, cut)
        self.assertEqual(self._parse([bytes([b]) for b in data]), expected)

    def _parse(self, chunks: list[bytes]) -> Any:
        errors = Errors(Scrubber(KEY), Exception, lambda: False)  # type: ignore[arg-type]
        sink = ResponseStream(errors, None)
        decoder = SSEDecoder()
        for chunk in chunks:
            for item in decoder.feed(chunk):
                sink.event(item)
        self.assertTrue(sink.done)
        return sink.completion()
