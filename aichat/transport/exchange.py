"""One streaming HTTP exchange with an upstream, and the retry loop around it.

:class:`StreamingClient` owns the treq client (and the pool it made, if any), the limits and the retry
policy. :meth:`StreamingClient.stream` sends one request and feeds the body to a :class:`StreamSink`, the
codec that decides what the bytes mean: an ``text/event-stream`` body event by event, an
``application/json`` body whole. The exchange bounds every attempt by a deadline to the first byte, an
idle timer reset on every chunk and a cap on the total size; once the sink has seen its stream's terminal
event, the end of the body is awaited only briefly (a server that keeps the connection open is cut off
without failing the answer, and one that drops it then has lost nothing).

Failures are :class:`UpstreamError` (or the subclass given): the upstream's status when there was one,
``retryable``, ``started`` (output had been passed on, so the caller holds a partial answer), ``code`` (the
upstream's error code or ``timeout``, ``too_large``, ``connection``, ``protocol``, ``empty``), and a short
``message`` for users beside the full ``detail`` for the log, both scrubbed of the key before any cut.
Retryable failures before any output are retried after ``retry-after-ms`` / ``Retry-After`` (capped) or
an exponential backoff. A cancellation is never turned into an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from aichat import content_type
from aichat.metrics import Metrics, ModelCall
from aichat.sse import SSEDecoder, SSEEvent, SSETooLargeError
from aichat.transport.body import BodyReader
from aichat.transport.client import DEFAULT_MAX_IDLE_CONNECTIONS, HTTPClient, make_http_client, make_pool
from aichat.transport.scrub import Scrubber, short_reason

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

#: Statuses worth another attempt: rate limits, overload (Anthropic's 529) and server trouble.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
#: Upstream error codes that a retry cannot fix even when the status says "try again".
PERMANENT_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
ERROR_BODY_LIMIT = 64 * 1024
AFTER_DONE_GRACE = 2.0
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

log = Logger()


class UpstreamError(Exception):
    """An exchange with an upstream failed; see the module docstring for the fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        started: bool = False,
        code: str | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or message
        self.status = status
        self.retryable = retryable
        self.started = started
        self.code = code
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status!r}, retryable={self.retryable!r}, "
            f"started={self.started!r}, code={self.code!r})"
        )


class Errors:
    """How a sink makes its errors: scrubbed, marked ``started`` when it had passed output on."""

    def __init__(self, scrub: Scrubber, error_type: type[UpstreamError], started: Callable[[], bool]) -> None:
        self.scrub = scrub
        self._type = error_type
        self._started = started

    def __call__(self, message: str, *, detail: str | None = None, **kwargs: Any) -> UpstreamError:
        scrub = self.scrub
        return self._type(
            scrub(message), detail=scrub(detail) if detail is not None else None, started=self._started(), **kwargs
        )

    def text(self, raw: bytes | str, *, truncated: bool = False) -> str:
        """Text the upstream sent, decoded and scrubbed of the key before anything cuts it."""
        decoded = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return self.scrub(decoded, truncated=truncated)

    def failed(self, prefix: str, text: str, **kwargs: Any) -> UpstreamError:
        """``prefix: <short reason>`` for users, ``prefix: <text>`` for the log; ``text`` already scrubbed."""
        return self(f"{prefix}: {short_reason(text)}", detail=f"{prefix}: {text}", **kwargs)


class StreamSink(Protocol):
    """A codec reading one response: ``started`` once it passed output on, ``done`` once its stream's
    terminal event came; ``garbage`` counts what it could not parse."""

    started: bool
    done: bool
    garbage: int

    def event(self, event: SSEEvent) -> None:
        """One event of an event-stream body; raise to fail the exchange."""
        ...

    def whole(self, raw: bytes) -> None:
        """A JSON body (a server that did not stream)."""
        ...

    def end(self, status: int) -> None:
        """The event stream ended without the terminal event; raise when that is not an answer."""
        ...


@dataclass(frozen=True)
class Limits:
    """The bounds of one attempt (seconds and bytes)."""

    first_byte_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_response_bytes: int = 8 * 1024 * 1024
    after_done_grace: float = AFTER_DONE_GRACE


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts in all, and the wait between them: the upstream's advice (at most ``retry_after_max``) or
    ``backoff_initial * 2**n`` seconds (at most ``backoff_max``)."""

    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_max))
        return float(min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1)))


class StreamingClient:
    """Streaming requests to one upstream; see the module docstring.

    ``http`` is a treq-like client shared with others (tests pass ``StubTreq``); without it one is made
    from ``reactor`` with ``connect_timeout`` on a pool of its own that :meth:`close` empties.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        http: HTTPClient | None = None,
        secret: str = "",
        limits: Limits | None = None,
        retries: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS,
        error_type: type[UpstreamError] = UpstreamError,
        metrics: Metrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.metrics = metrics
        #: The provider and model named in the metrics (set by the provider that owns this client).
        self.provider_name = ""
        self.model = ""
        self.pool: HTTPConnectionPool | None = None
        if http is None:
            self.pool = make_pool(reactor, max_idle_connections)
            http = make_http_client(reactor, connect_timeout=connect_timeout, pool=self.pool)
        self.http: HTTPClient = http
        self.scrub = Scrubber(secret)
        self.limits = limits or Limits()
        self.retries = retries or RetryPolicy()
        self.connect_timeout = connect_timeout
        self.error_type = error_type

    async def stream(
        self,
        url: str,
        headers: Headers,
        body: bytes,
        make_sink: Callable[[Errors], StreamSink],
        *,
        where: str,
        method: str = "POST",
    ) -> StreamSink:
        """Send the request until one attempt succeeds (retrying before any output) and return its sink.

        ``where`` names the upstream in connection errors (its base URL). Raises ``error_type``."""
        if self.metrics is None:
            return await self._attempts(url, headers, body, make_sink, where, method, None)
        call = self.metrics.model_call(self.provider_name, self.model)
        started = self.reactor.seconds()
        try:
            sink = await self._attempts(url, headers, body, make_sink, where, method, call)
        except CancelledError:
            call.ended(self.reactor.seconds() - started, "cancelled")
            raise
        except UpstreamError as error:
            call.ended(self.reactor.seconds() - started, "error", error_class(error))
            raise
        call.ended(self.reactor.seconds() - started, "ok")
        return sink

    async def _attempts(
        self,
        url: str,
        headers: Headers,
        body: bytes,
        make_sink: Callable[[Errors], StreamSink],
        where: str,
        method: str,
        call: ModelCall | None,
    ) -> StreamSink:
        attempt = 1
        attempts = max(1, self.retries.max_attempts)
        while True:
            exchange = _Exchange(self, make_sink, where)
            try:
                await exchange.run(method, url, headers, body)
                return exchange.sink
            except UpstreamError as error:
                if error.started or not error.retryable or attempt >= attempts:
                    log.warn(
                        "Model call to {url} failed (attempt {attempt} of {attempts}): {message}",
                        url=url,
                        attempt=attempt,
                        attempts=attempts,
                        message=error.detail,
                        status=error.status,
                    )
                    raise
                delay = self.retries.delay(attempt, error.retry_after)
                log.info(
                    "Model call to {url} failed (attempt {attempt} of {attempts}), "
                    "retrying in {delay:.2f} s: {message}",
                    url=url,
                    attempt=attempt,
                    attempts=attempts,
                    delay=delay,
                    message=error.detail,
                    status=error.status,
                )
            if call is not None:
                call.retried()
            await deferLater(self.reactor, delay)
            attempt += 1

    async def close(self) -> None:
        """Close the pooled connections this client made (not those of an injected client)."""
        if self.pool is not None:
            await self.pool.closeCachedConnections()


class _Exchange:
    """One HTTP attempt: the request, the three limits, and the body fed to the sink."""

    def __init__(self, client: StreamingClient, make_sink: Callable[[Errors], StreamSink], where: str) -> None:
        self._client = client
        self._reactor = client.reactor
        self._limits = client.limits
        self._where = where
        self._errors = Errors(client.scrub, client.error_type, lambda: self.sink.started)
        self.sink = make_sink(self._errors)
        self._timer: IDelayedCall | None = None
        self._why = ""
        self._expired: str | None = None
        self._pending: Deferred[Any] | None = None
        self._reader: BodyReader | None = None
        self._decoder = SSEDecoder(max_event_size=self._limits.max_response_bytes)
        self._idle_why = f"the model sent nothing for {self._limits.idle_timeout:g} s"
        self._received = 0

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
        if self.sink.done and self._reader is not None:
            self._reader.succeed()
            return
        self._expired = why
        if self._pending is not None:
            # Not guarded by ``called``: a request waiting on the connection's own Deferred is "called".
            self._pending.cancel()
        if self._reader is not None:
            self._reader.fail(self._errors(why, code="timeout"))

    # The exchange

    async def run(self, method: str, url: str, headers: Headers, body: bytes) -> None:
        limits = self._limits
        sink = self.sink
        self._arm(limits.first_byte_timeout, f"no response from the model within {limits.first_byte_timeout:g} s")
        try:
            self._pending = self._client.http.request(method, url, headers=headers, data=body, unbuffered=True)
            try:
                response = await self._pending
            except Exception as error:
                self._reraise(error, "connecting to the model")
            finally:
                self._pending = None
            if response.code != 200:
                raw = await self._read(response, ERROR_BODY_LIMIT, truncate=True)
                raise self._status_error(response, raw)
            media = content_type.of_headers(response.headers, last=True).media
            if media == content_type.JSON:
                sink.whole(await self._read(response, limits.max_response_bytes))
            elif media in (content_type.EVENT_STREAM, ""):
                await self._read(response, limits.max_response_bytes, stream=True)
                if not sink.done:
                    for event in self._decoder.feed(b"\n\n"):
                        sink.event(event)
                    if not sink.done:
                        sink.end(response.code)
            else:
                raw = await self._read(response, ERROR_BODY_LIMIT, truncate=True)
                text = self._errors.text(raw, truncated=self._received > ERROR_BODY_LIMIT)
                raise self._errors.failed(
                    f"the model answered with content type {media!r}, not an event stream",
                    text,
                    status=response.code,
                    code="protocol",
                )
            if sink.garbage:
                log.warn("Skipped {count} unparsable lines in the stream from {url}", count=sink.garbage, url=url)
        finally:
            self._disarm()
            if self._reader is not None and not self._reader.finished.called:
                self._reader.close()

    async def _read(self, response: Any, limit: int, *, truncate: bool = False, stream: bool = False) -> bytes:
        """Read the body, feeding the sink event by event when ``stream``; past ``limit`` bytes either stop
        there (``truncate``) or fail."""
        parts: list[bytes] = []
        sink = self.sink

        def on_data(data: bytes) -> None:
            self._received += len(data)
            if self._received > limit:
                if not truncate:
                    raise self._errors(f"the model's response exceeded {limit} bytes", code="too_large")
                parts.append(data[: len(data) - (self._received - limit)])
                assert self._reader is not None
                self._reader.succeed()
                return
            if stream and not sink.done:
                try:
                    events = self._decoder.feed(data)
                except SSETooLargeError as error:
                    raise self._errors(str(error), code="too_large") from None
                for event in events:
                    sink.event(event)
                    if sink.done:
                        break
            elif not stream:
                parts.append(data)
            # After the terminal event only the end of the body is awaited, briefly.
            self._arm(self._limits.after_done_grace if sink.done else self._limits.idle_timeout, self._idle_why)

        self._reader = BodyReader(on_data)
        response.deliverBody(self._reader)
        try:
            await self._reader.finished
        except Exception as error:
            if not (sink.done and isinstance(error, NETWORK_ERRORS) and not self._expired):
                self._reraise(error, "reading the model's response")
            # The terminal event came first: the answer is whole, only the end of the body was lost.
            log.debug(
                "The model's server closed the connection after the end of its stream: {error}",
                error=self._client.scrub(str(error)),
            )
        return b"".join(parts)

    # Errors

    def _reraise(self, error: Exception, during: str) -> NoReturn:
        """Raise what a failure of the exchange means: our timeout, a cancellation, a connection error, or
        the error itself (an :class:`UpstreamError`, or one raised by the caller's callbacks)."""
        if self._expired:
            raise self._errors(self._expired, code="timeout") from None
        if isinstance(error, UpstreamError | CancelledError):
            raise error
        if is_cancellation(error):
            # The agent reports a cancellation as ResponseNeverReceived([CancelledError]).
            raise CancelledError() from error
        if not isinstance(error, NETWORK_ERRORS):
            raise error
        raise self._connection_error(error, during=during) from None

    def _connection_error(self, error: BaseException, during: str) -> UpstreamError:
        reasons = getattr(error, "reasons", None)
        if reasons:
            detail = "; ".join(r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons)
        else:
            detail = str(error) or type(error).__name__
        return self._errors(
            f"connection error while {during} at {self._where}: {detail}", code="connection", retryable=True
        )

    def _status_error(self, response: Any, raw: bytes) -> UpstreamError:
        message, code = error_fields(json_or_none(raw))
        if message:
            message = self._client.scrub(message)
        else:
            message = self._errors.text(raw, truncated=self._received > ERROR_BODY_LIMIT).strip()
            message = message or response.phrase.decode("latin-1", "replace")
        return self._errors.failed(
            f"the model's server answered HTTP {response.code}",
            message,
            status=response.code,
            code=code,
            retryable=response.code in RETRYABLE_STATUSES and code not in PERMANENT_CODES,
            retry_after=retry_after(response.headers, self._reactor.seconds()),
        )


def error_class(error: UpstreamError) -> str:
    """The metrics' class of a failed exchange: ``timeout``, ``connection``, ``status`` (the upstream answered
    an error status) or ``other`` (an unreadable, oversized or empty answer)."""
    if error.code in ("timeout", "connection"):
        return error.code
    if error.status is not None and error.status != 200:
        return "status"
    return "other"


def is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is, or wraps (as the agent's ``ResponseNeverReceived`` does), a cancellation.

    A cancelled connection attempt fails with ``ConnectingCancelledError`` (a connect timeout is a
    ``TimeoutError``), so that too is a cancellation."""
    if isinstance(error, CancelledError | ConnectingCancelledError):
        return True
    reasons = getattr(error, "reasons", None) or ()
    return any(isinstance(reason, Failure) and reason.check(CancelledError) for reason in reasons)


def json_or_none(raw: bytes | str) -> Any:
    """``raw`` parsed as JSON, or ``None``."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def error_fields(document: Any) -> tuple[str, str | None]:
    """The message and code of an error body: OpenAI's ``{"error": {"message", "code"|"type"}}``,
    Anthropic's ``{"type": "error", "error": {"type", "message"}}``, Google's ``{"error": {"code": 429,
    "message", "status"}}`` (also inside a one-element list), and the common variants."""
    if isinstance(document, list) and len(document) == 1:
        document = document[0]
    if not isinstance(document, dict):
        return "", None
    error = document.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code")
        if not isinstance(code, str) or not code:
            code = error.get("status") or error.get("type") or code
        return (str(message) if message is not None else ""), (str(code) if code is not None else None)
    if isinstance(error, str):
        return error, None
    for key in ("message", "detail"):
        if isinstance(document.get(key), str):
            return document[key], None
    return "", None


def retry_after(headers: Headers, now: float) -> float | None:
    """The wait the upstream advises: ``retry-after-ms`` (milliseconds), else ``Retry-After`` (seconds or
    an HTTP date); ``None`` when neither is usable."""
    millis = headers.getRawHeaders(b"retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis[0].decode("latin-1").strip()) / 1000)
        except ValueError:
            pass
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
