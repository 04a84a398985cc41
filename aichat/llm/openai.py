"""OpenAI's Chat Completions wire format, for OpenAI and the servers that speak it (vLLM, Ollama,
llama.cpp, LiteLLM), on the shared streaming transport (:mod:`aichat.transport`).

One call of :meth:`OpenAIProvider.complete` is one ``POST {base_url}/chat/completions`` with
``stream: true`` (retried on 429/5xx and connection errors until text has started), read as an event
stream: text deltas go to ``on_text`` as they arrive; ``delta.tool_calls`` fragments are assembled by
``index``; the final usage chunk (``stream_options.include_usage``) and ``data: [DONE]`` end it.

What the wire means is decided here. A ``[DONE]`` seen is a complete answer, however the connection ends
afterwards (llama.cpp cuts a running stream that way, without the last chunk of the chunked body). A
stream whose body ends cleanly without ``[DONE]`` after an answer has begun is complete too; one that ends
without ``[DONE]`` and without any answer, and an empty 200, are errors (``code="empty"``), never an empty
answer. A connection lost before ``[DONE]`` is a connection error.

The limits, retries, error classification and key scrubbing are the transport's. The API key goes only
into the ``Authorization`` header. The messages given are the provider-neutral history
(:mod:`aichat.llm.provider`), which is Chat Completions already; only what other providers add to a tool
call (Gemini's thought signature) is left out on the wire. The tools offered are
:class:`~aichat.llm.tools.ToolSpec` records, written as function tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from aichat.llm.provider import Completion, LLMError, ToolCallAssembler, Usage
from aichat.llm.streaming import StreamingProvider
from aichat.llm.tools import ToolCall, ToolSpec
from aichat.metrics import Metrics
from aichat.sse import SSEEvent
from aichat.transport.client import DEFAULT_MAX_IDLE_CONNECTIONS, HTTPClient, body_producer, make_http_client
from aichat.transport.exchange import ERROR_BODY_LIMIT, Errors, Limits, RetryPolicy, StreamingClient, error_fields
from aichat.transport.exchange import retry_after as _retry_after
from aichat.transport.scrub import short_reason as _reason

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Request fields that only mean something when tools are offered; OpenAI rejects them on other requests.
TOOL_OPTIONS = frozenset({"tool_choice", "parallel_tool_calls"})
#: Request fields the client sets itself; ``llm.options`` cannot override them.
OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "tools"})


class ChunkStream:
    """The sink for one Chat Completions response: chunks (or one ``chat.completion``) to a Completion."""

    def __init__(self, errors: Errors, on_text: Callable[[str], None] | None) -> None:
        self._errors = errors
        self._on_text = on_text
        self.started = False
        self.done = False
        self.garbage = 0
        self._text: list[str] = []
        self._tools = ToolCallAssembler()
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._model: str | None = None

    def completion(self) -> Completion:
        """What was received, assembled."""
        return Completion(
            text="".join(self._text),
            tool_calls=self._tools.calls(),
            finish_reason=self._finish_reason,
            usage=self._usage,
            model=self._model,
        )

    def _answered(self) -> bool:
        """Whether any part of an answer arrived: text, a tool call or a finish reason."""
        return bool(self._text) or bool(self._tools) or self._finish_reason is not None

    def end(self, status: int) -> None:
        if not self._answered():
            raise self._errors(
                "the model returned an empty answer: its stream ended without content or [DONE]",
                status=status,
                code="empty",
            )

    def event(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data:
            return
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.garbage += 1
            return
        if not isinstance(chunk, dict):
            self.garbage += 1
            return
        if "error" in chunk or event.event == "error":
            message, code = error_fields(chunk)
            raise self._errors.failed("the model failed mid-stream", self._errors.scrub(message or data), code=code)
        if isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        usage = Usage.from_openai(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self._emit(content)
                self._tools.feed(delta.get("tool_calls"))
            if isinstance(choice.get("finish_reason"), str):
                self._finish_reason = choice["finish_reason"]

    def whole(self, raw: bytes) -> None:
        """A server that ignored ``stream: true`` and sent one ``chat.completion`` object."""
        errors = self._errors
        if not raw.strip():
            raise errors("the model returned an empty answer: a 200 with an empty body", status=200, code="empty")
        try:
            document = json.loads(raw)
        except ValueError:
            raise errors.failed("the model sent invalid JSON", errors.text(raw), code="protocol") from None
        if not isinstance(document, dict):
            raise errors.failed("the model sent unexpected JSON", errors.text(raw), code="protocol")
        if "error" in document:
            failure, code = error_fields(document)
            raise errors.failed("the model failed", errors.scrub(failure), code=code)
        if isinstance(document.get("model"), str):
            self._model = document["model"]
        self._usage = Usage.from_openai(document.get("usage"))
        choices = document.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        reply: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
        content = reply.get("content")
        if isinstance(content, str) and content:
            self._emit(content)
        calls = reply.get("tool_calls")
        if isinstance(calls, list):
            self._tools.feed([{"index": n, **call} for n, call in enumerate(calls) if isinstance(call, dict)])
        if isinstance(choice.get("finish_reason"), str):
            self._finish_reason = choice["finish_reason"]
        self.done = True

    def _emit(self, text: str) -> None:
        self._text.append(text)
        self.started = True
        if self._on_text is not None:
            self._on_text(text)


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history as Chat Completions messages: tool calls carry only ``id``, ``type`` and ``function``,
    tool results no ``is_error`` (what the other codecs use of the neutral history)."""
    out = []
    for message in messages:
        if "is_error" in message:
            message = {key: value for key, value in message.items() if key != "is_error"}
        calls = message.get("tool_calls")
        if calls and any(isinstance(call, dict) and "extra_content" in call for call in calls):
            message = {
                **message,
                "tool_calls": [
                    {key: value for key, value in call.items() if key != "extra_content"} for call in calls
                ],
            }
        out.append(message)
    return out


class OpenAIProvider(StreamingProvider):
    """A :class:`~aichat.llm.provider.Provider` for any OpenAI-compatible Chat Completions endpoint.

    ``http`` is a treq-like client (the daemon's shared one; tests pass ``StubTreq``); without it one is
    made from ``reactor`` with ``connect_timeout`` and a persistent pool that :meth:`close` empties.
    ``temperature`` and ``extra_body`` (e.g. ``max_tokens``) are sent only when given; ``include_usage``
    asks for the final usage chunk. Before any text has been streamed, failures that are ``retryable``
    are tried again up to ``max_attempts`` times in all, after ``backoff_initial * 2**n`` seconds (at most
    ``backoff_max``) or the upstream's ``Retry-After`` (at most ``retry_after_max``).
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        model: str,
        api_key: str = "",
        base_url: str = DEFAULT_BASE_URL,
        name: str = "openai",
        http: HTTPClient | None = None,
        temperature: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
        include_usage: bool = True,
        connect_timeout: float = 10.0,
        first_byte_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        max_response_bytes: int = 8 * 1024 * 1024,
        max_attempts: int = 3,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
        retry_after_max: float = 30.0,
        max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS,
        metrics: Metrics | None = None,
    ) -> None:
        client = StreamingClient(
            reactor,
            http=http,
            secret=api_key,
            limits=Limits(first_byte_timeout, idle_timeout, max_response_bytes),
            retries=RetryPolicy(max(1, max_attempts), backoff_initial, backoff_max, retry_after_max),
            connect_timeout=connect_timeout,
            max_idle_connections=max_idle_connections,
            error_type=LLMError,
            metrics=metrics,
        )
        self._configure(client, name=name, model=model, api_key=api_key, base_url=base_url,
                        default_base_url=DEFAULT_BASE_URL, temperature=temperature, extra_body=extra_body)
        self.include_usage = include_usage

    # The transport's settings, as attributes of the provider.
    @property
    def _pool(self) -> HTTPConnectionPool | None:
        return self._client.pool

    @property
    def connect_timeout(self) -> float:
        return self._client.connect_timeout

    @property
    def first_byte_timeout(self) -> float:
        return self._client.limits.first_byte_timeout

    @property
    def idle_timeout(self) -> float:
        return self._client.limits.idle_timeout

    @property
    def max_response_bytes(self) -> int:
        return self._client.limits.max_response_bytes

    @property
    def max_attempts(self) -> int:
        return self._client.retries.max_attempts

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return self._client.retries.delay(attempt, retry_after)

    @property
    def url(self) -> str:
        """The Chat Completions endpoint."""
        return f"{self.base_url}/chat/completions"

    def request_body(self, messages: list[dict[str, Any]], tools: Sequence[ToolSpec] | None) -> dict[str, Any]:
        """The JSON body sent for one completion."""
        body: dict[str, Any] = {
            key: value
            for key, value in self.extra_body.items()
            if key not in OWN_FIELDS and (tools or key not in TOOL_OPTIONS)
        }
        body.update(model=self.model, messages=wire_messages(messages), stream=True)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = [tool.to_openai() for tool in tools]
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def _headers(self) -> Headers:
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"text/event-stream"],
                b"User-Agent": [b"aichat-backend"],
            }
        )
        if self._api_key:
            headers.setRawHeaders(b"Authorization", [f"Bearer {self._api_key}".encode()])
        return headers

    def _sink(self, errors: Any, on_text: Callable[[str], None] | None) -> ChunkStream:
        return ChunkStream(errors, on_text)


__all__ = [
    "DEFAULT_BASE_URL",
    "ERROR_BODY_LIMIT",
    "HTTPClient",
    "OpenAIProvider",
    "ToolCall",
    "_reason",
    "_retry_after",
    "body_producer",
    "make_http_client",
]
