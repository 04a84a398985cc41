"""A streaming client for OpenAI's Chat Completions API and the servers that speak it (vLLM, Ollama,
llama.cpp, LiteLLM), written on treq.

One call of :meth:`OpenAIProvider.complete` is one ``POST {base_url}/chat/completions`` with
``stream: true`` (retried on 429/5xx and connection errors until text has started), read as an event
stream: text deltas go to ``on_text`` as they arrive; ``delta.tool_calls`` fragments are assembled by
``index``; the final usage chunk (``stream_options.include_usage``) and ``data: [DONE]`` end it.

What the wire means is decided here. A ``[DONE]`` seen is a complete answer, however the connection ends
afterwards (llama.cpp cuts a running stream that way, without the last chunk of the chunked body). A
stream whose body ends cleanly without ``[DONE]`` after an answer has begun is complete too; one that ends
without ``[DONE]`` and without any answer, and an empty 200, are errors (``code="empty"``), never an empty
answer. A connection lost before ``[DONE]`` is a connection error.

Every exchange is bounded by a deadline to the first byte of the body, an idle timer reset on every chunk
and a cap on the total size; the connect timeout belongs to the HTTP client (:func:`make_http_client`).
The API key goes only into the ``Authorization`` header: it is never logged and is scrubbed from every
error message, before any text is cut to a length. An upstream's error text reaches the user as the status
and a short reason cleaned of tracebacks and server file paths (``LLMError.message``); the whole text goes
to the log only (``LLMError.detail``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as BodyProtocol
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from aichat.llm.provider import Completion, LLMError, ToolCall, ToolCallAssembler, Usage, check_messages
from aichat.sse import SSEDecoder, SSEEvent, SSETooLargeError

if TYPE_CHECKING:
    from treq.client import HTTPClient as TreqHTTPClient
    from twisted.web.client import HTTPConnectionPool

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Upstream error codes that a retry cannot fix even when the status says "try again".
PERMANENT_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
ERROR_BODY_LIMIT = 64 * 1024
#: Characters of an upstream's error text shown to a user.
REASON_LIMIT = 200
#: Request fields that only mean something when tools are offered; OpenAI rejects them on other requests.
TOOL_OPTIONS = frozenset({"tool_choice", "parallel_tool_calls"})
#: Request fields the client sets itself; ``llm.options`` cannot override them.
OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "tools"})
#: Failures of the connection itself: retried before the first token.
NETWORK_ERRORS = (
    ConnectError,
    ConnectingCancelledError,
    ConnectionLost,
    ConnectionDone,
    OSError,
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
)
AFTER_DONE_GRACE = 2.0
#: Idle connections kept per upstream host; enough for the turns one daemon streams at once.
DEFAULT_MAX_IDLE_CONNECTIONS = 256

log = Logger()


class HTTPClient(Protocol):
    """What we use of :class:`treq.HTTPClient` (and of ``treq.testing.StubTreq``)."""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers | None = None,
        data: bytes | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]:
        """Send a request; the Deferred fires with the response once its headers have arrived."""
        ...


def make_pool(reactor: Any, max_idle: int = DEFAULT_MAX_IDLE_CONNECTIONS) -> HTTPConnectionPool:
    """A persistent connection pool keeping up to ``max_idle`` idle connections per host.

    Each streaming turn holds its connection for the whole answer, so after a burst of ``n`` concurrent
    turns ``n`` connections come back; the ones beyond ``max_idle`` are closed and the next burst has to
    connect again. Close the pool with ``closeCachedConnections()`` at shutdown.
    """
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_idle
    return pool


def make_http_client(
    reactor: Any,
    *,
    connect_timeout: float = 10.0,
    pool: HTTPConnectionPool | None = None,
) -> TreqHTTPClient:
    """A treq client whose agent gives up connecting after ``connect_timeout`` seconds.

    ``reactor`` must provide TCP, SSL and time (the real reactor). Without ``pool`` one is made by
    :func:`make_pool`.
    """
    from treq.client import HTTPClient as TreqHTTPClient
    from twisted.web.client import Agent

    agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool or make_pool(reactor))
    return TreqHTTPClient(agent, data_to_body_producer=body_producer)


def body_producer(data: Any) -> IBodyProducer:
    """treq's ``data_to_body_producer``: bytes as a :class:`BytesBody`, anything else as treq would."""
    return BytesBody(data) if isinstance(data, bytes) else IBodyProducer(data)


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written in one go.

    treq would wrap bytes in a ``FileBodyProducer``, which writes from a cooperative task on a later
    turn of the reactor; with this the request line, headers and body of a model call leave together.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _BodyReader(BodyProtocol):
    """Hand each chunk of a response body to ``on_data``; fire ``finished`` when the body ends or fails."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.finished: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, finished: Deferred[None]) -> None:
        # Fail first: closing may report the lost connection synchronously.
        finished.errback(Failure(CancelledError()))
        self.close()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        try:
            self._on_data(data)
        except Exception:
            self.fail(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def close(self) -> None:
        """Drop the connection (it cannot go back to the pool half read)."""
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def succeed(self) -> None:
        """End the read early with success, closing the connection."""
        if not self.finished.called:
            self.finished.callback(None)
        self.close()

    def fail(self, failure: Failure | BaseException) -> None:
        """End the read with ``failure``, closing the connection."""
        if not self.finished.called:
            self.finished.errback(failure if isinstance(failure, Failure) else Failure(failure))
        self.close()


class _Exchange:
    """One HTTP attempt: the request, the three limits, and the parse of the event stream."""

    def __init__(self, provider: OpenAIProvider, on_text: Callable[[str], None] | None) -> None:
        self._provider = provider
        self._reactor = provider._reactor
        self._on_text = on_text
        self._timer: IDelayedCall | None = None
        self._why = ""
        self._expired: str | None = None
        self._pending: Deferred[Any] | None = None
        self._reader: _BodyReader | None = None
        self._decoder = SSEDecoder(max_event_size=provider.max_response_bytes)
        self._idle_why = f"the model sent nothing for {provider.idle_timeout:g} s"
        self._received = 0
        self._done = False
        self._garbage = 0
        self.started = False
        self._text: list[str] = []
        self._tools = ToolCallAssembler()
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._model: str | None = None

    # Timers

    def _arm(self, seconds: float, why: str) -> None:
        self._why = why
        timer = self._timer
        if timer is not None and timer.active():
            if self._reactor.seconds() + seconds >= timer.getTime():
                # Pushing a timer later is cheap; pulling one earlier makes the reactor search its heap.
                timer.reset(seconds)
                return
            timer.cancel()
        self._timer = self._reactor.callLater(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expire(self) -> None:
        why = self._why
        self._timer = None
        if self._done and self._reader is not None:
            self._reader.succeed()
            return
        self._expired = why
        if self._pending is not None:
            # Not guarded by ``called``: a request waiting on the connection's own Deferred is "called".
            self._pending.cancel()
        if self._reader is not None:
            self._reader.fail(self._error(why, code="timeout"))

    def _error(self, message: str, *, detail: str | None = None, **kwargs: Any) -> LLMError:
        scrub = self._provider._scrub
        return LLMError(
            scrub(message), detail=scrub(detail) if detail is not None else None, started=self.started, **kwargs
        )

    def _upstream_text(self, raw: bytes, *, truncated: bool = False) -> str:
        """Text the upstream sent, decoded and scrubbed of the key before anything cuts it."""
        return self._provider._scrub(raw.decode("utf-8", "replace"), truncated=truncated)

    # The exchange

    async def run(self, url: str, headers: Headers, body: bytes) -> Completion:
        provider = self._provider
        self._arm(
            provider.first_byte_timeout,
            f"no response from the model within {provider.first_byte_timeout:g} s",
        )
        try:
            self._pending = provider._http.request("POST", url, headers=headers, data=body, unbuffered=True)
            try:
                response = await self._pending
            except Exception as error:
                self._reraise(error, "connecting to the model")
            finally:
                self._pending = None
            if response.code != 200:
                raw = await self._read(response, ERROR_BODY_LIMIT, truncate=True)
                raise self._status_error(response, raw)
            content_type = _content_type(response.headers)
            if content_type == "application/json":
                raw = await self._read(response, provider.max_response_bytes)
                self._whole(raw)
            elif content_type in ("text/event-stream", ""):
                await self._read(response, provider.max_response_bytes, stream=True)
                if not self._done:
                    for event in self._decoder.feed(b"\n\n"):
                        self._event(event)
                    if not self._answered():
                        raise self._error(
                            "the model returned an empty answer: its stream ended without content or [DONE]",
                            status=response.code,
                            code="empty",
                        )
            else:
                raw = await self._read(response, ERROR_BODY_LIMIT, truncate=True)
                text = self._upstream_text(raw, truncated=self._received > ERROR_BODY_LIMIT)
                raise self._error(
                    f"the model answered with content type {content_type!r}, not an event stream: {_reason(text)}",
                    detail=f"the model answered with content type {content_type!r}, not an event stream: {text}",
                    status=response.code,
                    code="protocol",
                )
            if self._garbage:
                log.warn("Skipped {count} unparsable lines in the stream from {url}", count=self._garbage, url=url)
            return Completion(
                text="".join(self._text),
                tool_calls=self._tools.calls(),
                finish_reason=self._finish_reason,
                usage=self._usage,
                model=self._model,
            )
        finally:
            self._disarm()
            if self._reader is not None and not self._reader.finished.called:
                self._reader.close()

    async def _read(self, response: Any, limit: int, *, truncate: bool = False, stream: bool = False) -> bytes:
        """Read the body, feeding the event-stream parser when ``stream``; past ``limit`` bytes either stop
        there (``truncate``) or fail."""
        parts: list[bytes] = []

        def on_data(data: bytes) -> None:
            self._received += len(data)
            if self._received > limit:
                if not truncate:
                    raise self._error(f"the model's response exceeded {limit} bytes", code="too_large")
                parts.append(data[: len(data) - (self._received - limit)])
                assert self._reader is not None
                self._reader.succeed()
                return
            if stream and not self._done:
                try:
                    events = self._decoder.feed(data)
                except SSETooLargeError as error:
                    raise self._error(str(error), code="too_large") from None
                for event in events:
                    self._event(event)
                    if self._done:
                        break
            elif not stream:
                parts.append(data)
            # After [DONE] only the end of the body is awaited, briefly; a server that keeps the
            # connection open past it is cut off without failing the completion.
            self._arm(AFTER_DONE_GRACE if self._done else self._provider.idle_timeout, self._idle_why)

        self._reader = _BodyReader(on_data)
        response.deliverBody(self._reader)
        try:
            await self._reader.finished
        except Exception as error:
            if not (self._done and isinstance(error, NETWORK_ERRORS) and not self._expired):
                self._reraise(error, "reading the model's response")
            # [DONE] came first: the answer is whole, only the end of the body was lost.
            log.debug(
                "The model's server closed the connection after [DONE]: {error}",
                error=self._provider._scrub(str(error)),
            )
        return b"".join(parts)

    def _answered(self) -> bool:
        """Whether any part of an answer arrived: text, a tool call or a finish reason."""
        return bool(self._text) or bool(self._tools) or self._finish_reason is not None

    # Parsing

    def _event(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data:
            return
        if data == "[DONE]":
            self._done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self._garbage += 1
            return
        if not isinstance(chunk, dict):
            self._garbage += 1
            return
        if "error" in chunk or event.event == "error":
            message, code = _error_fields(chunk)
            text = self._provider._scrub(message or data)
            raise self._error(
                f"the model failed mid-stream: {_reason(text)}",
                detail=f"the model failed mid-stream: {text}",
                code=code,
            )
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

    def _whole(self, raw: bytes) -> None:
        """A server that ignored ``stream: true`` and sent one ``chat.completion`` object."""
        if not raw.strip():
            raise self._error("the model returned an empty answer: a 200 with an empty body", status=200, code="empty")
        try:
            document = json.loads(raw)
        except ValueError:
            text = self._upstream_text(raw)
            raise self._error(
                f"the model sent invalid JSON: {_reason(text)}",
                detail=f"the model sent invalid JSON: {text}",
                code="protocol",
            ) from None
        if not isinstance(document, dict):
            text = self._upstream_text(raw)
            raise self._error(
                f"the model sent unexpected JSON: {_reason(text)}",
                detail=f"the model sent unexpected JSON: {text}",
                code="protocol",
            )
        if "error" in document:
            failure, code = _error_fields(document)
            failure = self._provider._scrub(failure)
            raise self._error(
                f"the model failed: {_reason(failure)}", detail=f"the model failed: {failure}", code=code
            )
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
        self._done = True

    def _emit(self, text: str) -> None:
        self._text.append(text)
        self.started = True
        if self._on_text is not None:
            self._on_text(text)

    # Errors

    def _reraise(self, error: Exception, during: str) -> NoReturn:
        """Raise what a failure of the exchange means: our timeout, a cancellation, a connection error, or
        the error itself (an :class:`LLMError`, or one raised by the caller's ``on_text``)."""
        if self._expired:
            raise self._error(self._expired, code="timeout") from None
        if isinstance(error, LLMError | CancelledError):
            raise error
        if _is_cancellation(error):
            # The agent reports a cancellation as ResponseNeverReceived([CancelledError]).
            raise CancelledError() from error
        if not isinstance(error, NETWORK_ERRORS):
            raise error
        raise self._connection_error(error, during=during) from None

    def _connection_error(self, error: BaseException, during: str = "connecting to the model") -> LLMError:
        reasons = getattr(error, "reasons", None)
        if reasons:
            detail = "; ".join(r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons)
        else:
            detail = str(error) or type(error).__name__
        return self._error(
            f"connection error while {during} at {self._provider.base_url}: {detail}",
            code="connection",
            retryable=True,
        )

    def _status_error(self, response: Any, raw: bytes) -> LLMError:
        message, code = _error_fields(_json_or_none(raw))
        if message:
            message = self._provider._scrub(message)
        else:
            message = self._upstream_text(raw, truncated=self._received > ERROR_BODY_LIMIT).strip()
            message = message or response.phrase.decode("latin-1", "replace")
        retry_after = _retry_after(response.headers, self._reactor.seconds())
        return self._error(
            f"the model's server answered HTTP {response.code}: {_reason(message)}",
            detail=f"the model's server answered HTTP {response.code}: {message}",
            status=response.code,
            code=code,
            retryable=response.code in RETRYABLE_STATUSES and code not in PERMANENT_CODES,
            retry_after=retry_after,
        )


class OpenAIProvider:
    """A :class:`~aichat.llm.provider.Provider` for any OpenAI-compatible Chat Completions endpoint.

    ``http`` is a treq-like client (see :func:`make_http_client`; tests pass ``StubTreq``); without it
    one is made from ``reactor`` with ``connect_timeout`` and a persistent pool that :meth:`close` empties.
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
    ) -> None:
        self.name = name
        self.model = model
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._reactor = reactor
        self._api_key = api_key
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = make_pool(reactor, max_idle_connections)
            http = make_http_client(reactor, connect_timeout=connect_timeout, pool=self._pool)
        self._http: HTTPClient = http
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self.include_usage = include_usage
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.max_response_bytes = max_response_bytes
        self.max_attempts = max(1, max_attempts)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max

    def __repr__(self) -> str:
        return f"OpenAIProvider(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    @property
    def url(self) -> str:
        """The Chat Completions endpoint."""
        return f"{self.base_url}/chat/completions"

    def request_body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The JSON body sent for one completion."""
        body: dict[str, Any] = {
            key: value
            for key, value in self.extra_body.items()
            if key not in OWN_FIELDS and (tools or key not in TOOL_OPTIONS)
        }
        body.update(model=self.model, messages=messages, stream=True)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = tools
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

    def _scrub(self, text: str, *, truncated: bool = False) -> str:
        """``text`` without the API key or any bearer token; ``truncated`` text (cut at a read limit) also
        loses a trailing beginning of the key."""
        key = self._api_key
        if key:
            text = text.replace(key, "[redacted]")
            if truncated:
                for length in range(min(len(key) - 1, len(text)), MIN_KEY_PREFIX - 1, -1):
                    if text.endswith(key[:length]):
                        text = text[:-length] + "[redacted]"
                        break
        return _BEARER.sub("Bearer [redacted]", text)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_max))
        return float(min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1)))

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Stream one completion; see the module docstring. Raises :class:`LLMError`."""
        check_messages(messages)
        body = json.dumps(self.request_body(messages, tools), ensure_ascii=False).encode()
        headers = self._headers()
        attempt = 1
        while True:
            exchange = _Exchange(self, on_text)
            try:
                return await exchange.run(self.url, headers, body)
            except LLMError as error:
                if error.started or not error.retryable or attempt >= self.max_attempts:
                    log.warn(
                        "Model call to {url} failed (attempt {attempt} of {attempts}): {message}",
                        url=self.url,
                        attempt=attempt,
                        attempts=self.max_attempts,
                        message=error.detail,
                        status=error.status,
                    )
                    raise
                delay = self.backoff(attempt, error.retry_after)
                log.info(
                    "Model call to {url} failed (attempt {attempt} of {attempts}), "
                    "retrying in {delay:.2f} s: {message}",
                    url=self.url,
                    attempt=attempt,
                    attempts=self.max_attempts,
                    delay=delay,
                    message=error.detail,
                    status=error.status,
                )
            await deferLater(self._reactor, delay)
            attempt += 1

    async def close(self) -> None:
        """Close the pooled connections this provider made (not those of an injected client)."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()


_BEARER = re.compile(r"Bearer\s+[^\s\"',]+")
#: The shortest beginning of the key redacted at the end of a truncated text ("sk-" alone says nothing).
MIN_KEY_PREFIX = 4
_TRACEBACK_LINE = re.compile(r'^\s*(?:Traceback \(most recent call last\)|File "[^"]*", line \d+)')
#: An absolute path of two or more segments, not part of a URL or of a relative path.
_PATH = re.compile(r"(?<![\w:/.~-])(?:/[\w.+@~-]+){2,}/?")


def _is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is, or wraps (as the agent's ``ResponseNeverReceived`` does), a cancellation.

    A cancelled connection attempt fails with ``ConnectingCancelledError`` (a connect timeout is a
    ``TimeoutError``), so that too is a cancellation."""
    if isinstance(error, CancelledError | ConnectingCancelledError):
        return True
    reasons = getattr(error, "reasons", None) or ()
    return any(isinstance(reason, Failure) and reason.check(CancelledError) for reason in reasons)


def _content_type(headers: Headers) -> str:
    values = headers.getRawHeaders(b"content-type") or [b""]
    return values[-1].split(b";", 1)[0].strip().lower().decode("latin-1")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_fields(document: Any) -> tuple[str, str | None]:
    """The message and code of an error body in OpenAI's shape or the common variants of it."""
    if not isinstance(document, dict):
        return "", None
    error = document.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code") or error.get("type")
        return (str(message) if message is not None else ""), (str(code) if code is not None else None)
    if isinstance(error, str):
        return error, None
    for key in ("message", "detail"):
        if isinstance(document.get(key), str):
            return document[key], None
    return "", None


def _reason(text: str, limit: int = REASON_LIMIT) -> str:
    """A short reason for a user: ``text`` (already scrubbed) without traceback lines or the paths of files
    on the server, in one line of at most ``limit`` characters."""
    lines = [line for line in text.splitlines() if line.strip() and not _TRACEBACK_LINE.match(line)]
    reason = _PATH.sub(_hide_path, " ".join(" ".join(lines).split()))
    if len(reason) <= limit:
        return reason
    cut = reason[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"


def _hide_path(match: re.Match[str]) -> str:
    """A file on the server (its name has an extension, or it lies three folders deep) becomes ``…``; an
    API path such as ``/v1/chat/completions`` stays."""
    path = match.group(0).rstrip("/")
    last = path.rsplit("/", 1)[-1]
    return "…" if "." in last.strip(".") or path.count("/") >= 4 else match.group(0)


def _retry_after(headers: Headers, now: float) -> float | None:
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    value = values[0].decode("latin-1").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


__all__ = ["DEFAULT_BASE_URL", "HTTPClient", "OpenAIProvider", "ToolCall", "make_http_client"]
