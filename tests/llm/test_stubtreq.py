"""The OpenAI client through treq's own machinery (``StubTreq``, an in-memory HTTP/1.1 connection): the
request as it is on the wire, the streamed body read unbuffered, and errors, with no network."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from aichat.llm.openai import HTTPClient, OpenAIProvider
from aichat.llm.provider import LLMError, ToolCall
from tests.llm.fakes import sse, text_events
from tests.upstream import Send, tool_stream

KEY = "sk-stub-SECRET-31337"


class Recorder(Resource):
    """Answers each request with the next (status, content type, body) and records what it got."""

    isLeaf = True

    def __init__(self, *answers: tuple[int, str, bytes]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.received: list[tuple[bytes, bytes, dict[bytes, Sequence[bytes]], Any]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        self.received.append((request.method, request.uri, headers, json.loads(request.content.read())))
        status, content_type, body = self.answers.pop(0)
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode())
        return body


def client(resource: Resource, **kwargs: Any) -> OpenAIProvider:
    """A client whose HTTP goes to ``resource`` through StubTreq."""
    return OpenAIProvider(
        reactor=Clock(),
        http=cast(HTTPClient, StubTreq(resource)),
        model="gpt-4o-mini",
        api_key=KEY,
        base_url="https://api.example.test/v1",
        **kwargs,
    )


class StubTreqTests(SynchronousTestCase):
    """Request shape and response handling over a real (in-memory) HTTP connection."""

    def test_request_on_the_wire(self) -> None:
        """Method, path, headers and JSON body as the upstream receives them."""
        resource = Recorder((200, "text/event-stream", sse(*text_events("Hi", "!"))))
        seen: list[str] = []
        messages = [{"role": "user", "content": "hello"}]
        d = Deferred.fromCoroutine(client(resource).complete(messages, on_text=seen.append))
        self.assertEqual(self.successResultOf(d).text, "Hi!")
        self.assertEqual(seen, ["Hi", "!"])
        [(method, uri, headers, body)] = resource.received
        self.assertEqual((method, uri), (b"POST", b"/v1/chat/completions"))
        self.assertEqual(headers[b"authorization"], [f"Bearer {KEY}".encode()])
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"accept"], [b"text/event-stream"])
        self.assertEqual(
            body,
            {
                "model": "gpt-4o-mini",
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )

    def test_tool_calls_over_http(self) -> None:
        """A tool-call stream from the upstream's builder is assembled after a real HTTP parse."""
        script = tool_stream([("call_1", "echo", '{"message": "x"}'), ("call_2", "echo", "{}")])
        body = sse(*[step.data for step in script.steps if isinstance(step, Send)], done=False)
        resource = Recorder((200, "text/event-stream", body))
        d = Deferred.fromCoroutine(client(resource).complete([{"role": "user", "content": "x"}]))
        self.assertEqual(
            self.successResultOf(d).tool_calls,
            [ToolCall("call_1", "echo", '{"message": "x"}'), ToolCall("call_2", "echo", "{}")],
        )

    def test_error_status(self) -> None:
        """A 400 with OpenAI's error body is surfaced with its message and without our key."""
        error_body = json.dumps({"error": {"message": f"Unknown model (key {KEY})", "code": "model_not_found"}})
        resource = Recorder((400, "application/json", error_body.encode()))
        d = Deferred.fromCoroutine(client(resource).complete([{"role": "user", "content": "x"}]))
        error = self.failureResultOf(d, LLMError).value
        self.assertEqual((error.status, error.code), (400, "model_not_found"))
        self.assertIn("Unknown model", error.message)
        self.assertNotIn(KEY, error.message)
