"""Remote MCP transports over treq: Streamable HTTP (MCP 2025-06-18) and the legacy HTTP+SSE transport.

Streamable HTTP: every message is a POST to the server's URL with ``Accept: application/json,
text/event-stream``; a request is answered by a JSON body or an event stream carrying the response (and
maybe server requests and notifications before it). The ``Mcp-Session-Id`` the server gives at
``initialize`` is echoed on every later message, with ``MCP-Protocol-Version``; closing sends DELETE.
After the handshake a GET stream is opened for the server's own requests and notifications
(``tools/list_changed``), if the server offers one.

A server that restarts forgets its sessions. The transport reports the session lost (``on_lost``, with
``reachable`` set when the server still answers) on any of: a 404 to a message carrying the session id,
a 400 whose JSON-RPC error names the session (what the official TypeScript SDK answers), or a GET stream
that ends and cannot be reopened (the reopen is answered that way, or the connection is refused). A
request refused that way never reached a tool, so it fails with :class:`NotDelivered` (the supervisor
sends it again on the next session); a request whose connection broke after it was sent fails with
:class:`PeerGone`, since it may have run. Event streams are resumed as the specification describes: a GET
stream, or a POST's response stream that ends before its response, is reopened by GET with
``Last-Event-ID`` when the server numbered its events.

Legacy HTTP+SSE (protocol 2024-11-05, what the reference used): GET the URL as an event stream, wait for
the ``endpoint`` event, POST every message there; answers arrive as ``message`` events on the stream.

Both take any treq-like client: the daemon's shared one (:mod:`aichat.transport`, the model providers'
pool), the ``treq`` module, or ``StubTreq`` in tests. Bodies are read by the transport's reader, with the
size cap; the event streams have no idle timer (a GET stream may rightly be silent for hours), each POST
and its resumption are bounded by a watchdog instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestNotSent

from aichat import content_type
from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import JSONRPCPeer, NotDelivered, PeerGone
from aichat.sse import SSEDecoder, SSETooLargeError
from aichat.transport.body import BodyReader, BodyTooLarge, read_body, read_stream

log = Logger()

ACCEPT_BOTH = "application/json, text/event-stream"
CLOSE_TIMEOUT = 5.0
POST_GRACE = 5.0
STABLE_STREAM = 10.0
REOPEN_FIRST_DELAY = 0.5
REOPEN_MAX_DELAY = 30.0
MAX_IDLE_RESUMES = 3
# Errors that mean a POST never left: the server cannot have acted on it.
NEVER_SENT = (ConnectError, RequestNotSent)


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _media_type(response: Any) -> str:
    return content_type.parse(_header(response, "content-type")).media


def _session_rejected(code: int, body: bytes) -> bool:
    """Whether an answer to a message carrying our session id says the server does not know that session.

    The specification says 404; the official TypeScript SDK's example servers (server-everything among
    them) answer 400 with the JSON-RPC error "Bad Request: No valid session ID provided".
    """
    if code == 404:
        return True
    if code != 400:
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and "session" in message.lower()


def _why(error: BaseException | None) -> str:
    """A readable reason for a failed request: treq's ResponseFailed & co. carry a list of Failures."""
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        parts = [str(r.value) or type(r.value).__name__ if isinstance(r, Failure) else str(r) for r in reasons]
        return "; ".join(dict.fromkeys(parts))
    return str(error) or type(error).__name__


def _answer_text(body: bytes) -> str:
    """The JSON-RPC error message of an error answer, else the start of its body."""
    try:
        document = json.loads(body)
        message = document["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace")


@dataclass
class _StreamCursor:
    """Where an event stream got to: the last event id the server gave, and its ``retry`` advice."""

    last_event_id: str | None = None
    retry: float | None = None
    messages: int = 0


class _RemoteConnection:
    """What both remote transports share: the peer, POSTing messages, and failing when the link is lost.

    ``reachable`` is True when the link was lost although the server still answers (only the session is
    gone), so a new session is worth asking for at once.
    """

    pid: int | None = None

    def __init__(self, clock: IReactorTime, config: ServerConfig, client: Any, max_bytes: int) -> None:
        assert config.url is not None
        self.config = config
        self.url = config.url
        self.peer = JSONRPCPeer(clock, self._send, name=config.name)
        self.on_lost: Callable[[str], None] | None = None
        self.protocol_version: str | None = None
        self.reachable = False
        self._clock = clock
        self._client = client
        self._max_bytes = max_bytes
        self._closed = False
        self._lost = False
        self._posts: set[Deferred[None]] = set()
        self._in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        headers.update(self.config.headers)
        return headers

    def _send(self, message: dict[str, Any]) -> None:
        if self._closed or self._lost:
            if self._request_id(message) is None:
                # An answer or notification to a server we have left: nobody is waiting for it.
                return
            raise PeerGone(f"MCP server {self.config.name!r} is not connected")
        # Counted before it starts: a POST may run to its end (and close us) before fromCoroutine returns.
        self._in_flight += 1
        post = Deferred.fromCoroutine(self._post(message))
        self._posts.add(post)
        # No POST (resumption included) outlives the longest wait the protocol allows for an answer.
        limit = max(self.config.timeout, self.config.init_timeout) + POST_GRACE
        watchdog = self._clock.callLater(limit, post.cancel)

        def done(result: object) -> None:
            if watchdog.active():
                watchdog.cancel()
            self._posts.discard(post)
            self._in_flight -= 1
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.failure("{server}: POST failed unexpectedly", result, server=self.config.name)
            if not self._in_flight:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        post.addBoth(done)

    def _posts_settled(self) -> Deferred[None]:
        """Fires once no POST is in flight."""
        if not self._in_flight:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    async def _post(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _request_id(self, message: dict[str, Any]) -> Any:
        """The id of a request we sent (responses we send to the server also have ids, but no method)."""
        return message.get("id") if "method" in message else None

    def _message_failed(self, message: dict[str, Any], reason: str, *, delivered: bool = True) -> None:
        """Fail the request of ``message``; ``delivered=False``: the server refused it unread (safe to resend)."""
        request_id = self._request_id(message)
        log.warn(
            "{server}: {method} failed: {reason}",
            server=self.config.name,
            method=message.get("method", "response"),
            reason=reason,
        )
        if request_id is not None:
            error = NotDelivered if not delivered else PeerGone
            self.peer.fail_request(request_id, error(f"MCP server {self.config.name!r}: {reason}"))

    def _dispatch_json(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warn("{server}: skipped a body that is not JSON: {data!r}", server=self.config.name, data=data[:200])
            return
        self.peer.message_received(message)

    def _lose(self, reason: str, *, reachable: bool = False) -> None:
        """The link is gone: tell the supervisor at once, then fail what waits for it."""
        if self._lost or self._closed:
            return
        self._lost = True
        self.reachable = reachable
        log.error("{server}: connection lost: {reason}", server=self.config.name, reason=reason)
        if self.on_lost is not None:
            self.on_lost(reason)
        self._fail_waiting(reason)

    def _fail_waiting(self, reason: str) -> None:
        self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r}: {reason}"))

    def _shut(self) -> None:
        self._closed = True
        if not self._lost:
            self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r} is stopping"))
        for post in list(self._posts):
            post.cancel()


class StreamableHTTPConnection(_RemoteConnection):
    """MCP over Streamable HTTP."""

    def __init__(self, clock: IReactorTime, config: ServerConfig, client: Any, max_bytes: int) -> None:
        super().__init__(clock, config, client, max_bytes)
        self.session_id: str | None = None
        self._closing: Deferred[None] | None = None
        self._listener: Deferred[None] | None = None
        self._get_cursor = _StreamCursor()

    def _fail_waiting(self, reason: str) -> None:
        # Every request we send waits on its own POST, which settles it (answer, refusal or break) soon:
        # failing them all here would turn a refused, resendable request into one of unknown fate.
        pass

    def _session_lost(self, reason: str) -> None:
        self._lose(f"session {self.session_id} is gone ({reason}); starting a new one", reachable=True)

    def _session_headers(self, accept: str) -> dict[str, str]:
        headers = self._headers(accept)
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    def _listen(self) -> None:
        """Open the optional GET stream on which the server sends requests and notifications."""
        if self._closed or self._lost or self._listener is not None:
            return
        listener = Deferred.fromCoroutine(self._get_stream())
        self._listener = listener

        def ended(result: object) -> None:
            self._listener = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.failure("{server}: GET stream failed unexpectedly", result, server=self.config.name)

        listener.addBoth(ended)

    async def _get_stream(self) -> None:
        """Keep the GET stream open: reopen it (resuming after its last event) whenever it ends.

        The first reopen is immediate, so a server that went away is noticed at once; a stream that keeps
        ending at once without a message is reopened with a growing delay (or after the server's ``retry``).
        """
        quick_ends = 0
        opened = False
        while not (self._closed or self._lost):
            headers = self._session_headers("text/event-stream")
            if self._get_cursor.last_event_id is not None:
                headers["Last-Event-ID"] = self._get_cursor.last_event_id
            began = self._clock.seconds()
            messages = self._get_cursor.messages
            try:
                response = await self._client.request("GET", self.url, headers=headers, unbuffered=True)
            except CancelledError:
                raise
            except Exception as e:
                self._lose(f"GET {self.url} failed: {_why(e)}")
                return
            try:
                if response.code == 200 and _media_type(response) == "text/event-stream":
                    opened = True
                    await self._read_events(response, self._get_cursor)
                    log.info("{server}: GET stream ended", server=self.config.name)
                else:
                    body = await read_body(response, 65536)
                    if self.session_id is not None and _session_rejected(response.code, body):
                        self._session_lost(f"GET answered HTTP {response.code}: {_answer_text(body)}")
                        return
                    if response.code != 409:
                        # 405: this server offers no GET stream, which the specification allows.
                        if opened:
                            log.info("{server}: GET stream not reopened: HTTP {code}", server=self.config.name,
                                     code=response.code)
                        return
                    # 409: the server still holds our previous stream; try again shortly.
            except CancelledError:
                raise
            except Exception as e:
                log.info("{server}: GET stream broke: {error}", server=self.config.name, error=_why(e))
            if self._get_cursor.messages > messages or self._clock.seconds() - began >= STABLE_STREAM:
                quick_ends = 0
            delay = _reopen_delay(self._get_cursor.retry, quick_ends)
            quick_ends += 1
            if delay > 0:
                await deferLater(self._clock, delay)

    async def _read_events(self, response: Any, cursor: _StreamCursor) -> None:
        """Dispatch every JSON-RPC message of an SSE response body until it ends, advancing ``cursor``."""
        decoder = SSEDecoder(max_event_size=self._max_bytes)

        def on_data(data: bytes) -> None:
            for event in decoder.feed(data):
                if event.id is not None:
                    cursor.last_event_id = event.id or None
                if event.retry is not None:
                    cursor.retry = event.retry / 1000
                if event.event == "message" and event.data:
                    cursor.messages += 1
                    self._dispatch_json(event.data)

        await read_stream(response, on_data).finished

    async def _post(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        try:
            response = await self._client.request(
                "POST", self.url, headers=self._post_headers(), data=body, unbuffered=True
            )
        except CancelledError:
            raise
        except Exception as e:
            reason = f"POST {self.url} failed: {_why(e)}"
            self._lose(reason)
            self._message_failed(message, reason, delivered=not isinstance(e, NEVER_SENT))
            return
        try:
            await self._answered(message, response)
        except CancelledError:
            raise
        except Exception as e:
            self._message_failed(message, f"answer from {self.url} broke: {_why(e)}")

    async def _answered(self, message: dict[str, Any], response: Any) -> None:
        """Settle ``message`` from the POST's answer: its response, a refusal, or a stream to resume."""
        if message.get("method") == "initialize":
            self.session_id = _header(response, "mcp-session-id")
        if response.code in (202, 204):
            await read_body(response, self._max_bytes)
            if message.get("method") == "notifications/initialized":
                self._listen()
            return
        if response.code >= 300:
            text = await read_body(response, self._max_bytes)
            carried_session = self.session_id is not None and message.get("method") != "initialize"
            if carried_session and _session_rejected(response.code, text):
                reason = f"HTTP {response.code}: {_answer_text(text)}"
                self._session_lost(reason)
                self._message_failed(message, f"session unknown to the server ({reason})", delivered=False)
                return
            detail = text.decode("utf-8", "replace")[:200]
            self._message_failed(message, f"HTTP {response.code} from {self.url}: {detail}")
            return
        kind = _media_type(response)
        if kind == "application/json":
            self._dispatch_json(await read_body(response, self._max_bytes))
        elif kind == "text/event-stream":
            cursor = _StreamCursor()
            try:
                await self._read_events(response, cursor)
            except CancelledError:
                raise
            except (BodyTooLarge, SSETooLargeError) as e:
                self._message_failed(message, str(e))
                return
            except Exception as e:
                if not await self._resume(message, cursor, f"response stream from {self.url} broke: {_why(e)}"):
                    return
            else:
                if not await self._resume(message, cursor, "response stream ended without the response"):
                    return
        else:
            await read_body(response, self._max_bytes)
            self._message_failed(message, f"unexpected content type {kind!r} from {self.url}")
            return
        request_id = self._request_id(message)
        if request_id is not None:
            self.peer.fail_request(request_id, PeerGone(f"MCP server {self.config.name!r} sent no response"))

    async def _resume(self, message: dict[str, Any], cursor: _StreamCursor, why: str) -> bool:
        """Reopen a POST's response stream by GET with ``Last-Event-ID`` until the response has come.

        Returns False when the request was failed here, True when it is settled (or was not a request).
        A request that cannot be resumed fails as of unknown fate: the server had it.
        """
        request_id = self._request_id(message)
        idle_tries = 0
        while request_id is not None and self.peer.is_pending(request_id):
            if cursor.last_event_id is None or self._closed:
                self._message_failed(message, why)
                return False
            if idle_tries >= MAX_IDLE_RESUMES:
                self._message_failed(message, f"{why}; {idle_tries} resumptions brought nothing")
                return False
            delay = _reopen_delay(cursor.retry, idle_tries)
            if delay > 0:
                await deferLater(self._clock, delay)
            headers = self._session_headers("text/event-stream")
            headers["Last-Event-ID"] = cursor.last_event_id
            log.info(
                "{server}: resuming the response stream of {method} after event {event}",
                server=self.config.name,
                method=message.get("method"),
                event=cursor.last_event_id,
            )
            try:
                response = await self._client.request("GET", self.url, headers=headers, unbuffered=True)
            except CancelledError:
                raise
            except Exception as e:
                self._lose(f"GET {self.url} failed: {_why(e)}")
                self._message_failed(message, f"{why}; resuming failed: {_why(e)}")
                return False
            if response.code != 200 or _media_type(response) != "text/event-stream":
                body = await read_body(response, 65536)  # a failure here fails the request in _post
                if self.session_id is not None and _session_rejected(response.code, body):
                    self._session_lost(f"GET answered HTTP {response.code}: {_answer_text(body)}")
                self._message_failed(message, f"{why}; resuming it was answered HTTP {response.code}")
                return False
            before = (cursor.last_event_id, cursor.messages)
            try:
                await self._read_events(response, cursor)
            except CancelledError:
                raise
            except (BodyTooLarge, SSETooLargeError) as e:
                self._message_failed(message, str(e))
                return False
            except Exception as e:
                why = f"resumed response stream from {self.url} broke: {_why(e)}"
            idle_tries = idle_tries + 1 if (cursor.last_event_id, cursor.messages) == before else 0
        return True

    def _post_headers(self) -> dict[str, str]:
        headers = self._session_headers(ACCEPT_BOTH)
        headers["Content-Type"] = "application/json"
        return headers

    def close(self) -> Deferred[None]:
        """Fail what is pending and end the session with DELETE; fires when done (bounded).

        A connection whose session is already lost sends no DELETE and lets the POSTs still in flight
        settle their requests (each is bounded by its watchdog); closing it again cuts them off.
        """
        if self._closing is not None:
            waiter: Deferred[None] = Deferred()
            self._closing.addBoth(lambda _: waiter.callback(None))
            if self._lost:
                self._shut()
            return waiter
        if self._listener is not None:
            self._listener.cancel()
        if self._lost:
            self._closed = True
            settled = self._posts_settled()
            settled.addCallback(lambda _: self.peer.fail_all(PeerGone(f"MCP server {self.config.name!r} is gone")))
            self._closing = settled
        else:
            self._shut()
            self._closing = Deferred.fromCoroutine(self._delete()) if self.session_id is not None else succeed(None)
        done: Deferred[None] = Deferred()
        self._closing.addBoth(lambda _: done.callback(None))
        return done

    async def _delete(self) -> None:
        headers = self._session_headers("application/json")
        request: Deferred[Any] = self._client.request("DELETE", self.url, headers=headers)
        timer: IDelayedCall = self._clock.callLater(CLOSE_TIMEOUT, request.cancel)
        try:
            response = await request
            await read_body(response, 65536)
        except Exception as e:
            log.info("{server}: DELETE of the session failed: {error}", server=self.config.name, error=str(e))
        finally:
            if timer.active():
                timer.cancel()


def _reopen_delay(retry: float | None, quick_ends: int) -> float:
    """Seconds before reopening an event stream: the server's ``retry`` advice (none: at once), and a delay
    growing from 0.5 s to 30 s while the stream keeps ending at once, whatever the advice."""
    growing = 0.0 if quick_ends <= 0 else float(min(REOPEN_FIRST_DELAY * 2 ** (quick_ends - 1), REOPEN_MAX_DELAY))
    return max(retry or 0.0, growing)


class LegacySSEConnection(_RemoteConnection):
    """MCP over the 2024-11-05 HTTP+SSE transport."""

    def __init__(self, clock: IReactorTime, config: ServerConfig, client: Any, max_bytes: int) -> None:
        super().__init__(clock, config, client, max_bytes)
        self.endpoint: str | None = None
        self._reader: BodyReader | None = None
        self._endpoint_known: Deferred[None] = Deferred()
        self._decoder = SSEDecoder(max_event_size=max_bytes)

    async def open(self) -> None:
        """GET the event stream and wait for the ``endpoint`` event."""
        headers = self._headers("text/event-stream")
        response = await self._client.request("GET", self.url, headers=headers, unbuffered=True)
        if response.code != 200:
            text = (await read_body(response, 65536)).decode("utf-8", "replace")
            raise ConnectionError(f"GET {self.url}: HTTP {response.code}: {text[:200]}")
        if _media_type(response) != "text/event-stream":
            await read_body(response, 65536)
            raise ConnectionError(f"GET {self.url}: not an event stream ({_media_type(response)!r})")
        self._reader = read_stream(response, self._on_data)
        self._reader.finished.addBoth(self._stream_ended)
        try:
            await self._endpoint_known
        except BaseException:
            self.close()
            raise

    def _on_data(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if event.event == "endpoint":
                self._set_endpoint(event.data.strip())
            elif event.event == "message" and event.data:
                self._dispatch_json(event.data)

    def _set_endpoint(self, value: str) -> None:
        endpoint = urljoin(self.url, value)
        if urlsplit(endpoint)[:2] != urlsplit(self.url)[:2]:
            error = ConnectionError(f"endpoint {endpoint!r} is not on the origin of {self.url!r}")
            if not self._endpoint_known.called:
                self._endpoint_known.errback(Failure(error))
            return
        self.endpoint = endpoint
        if not self._endpoint_known.called:
            self._endpoint_known.callback(None)

    def _stream_ended(self, result: object) -> None:
        reason = f"event stream broke: {_why(result.value)}" if isinstance(result, Failure) else "event stream ended"
        if not self._endpoint_known.called:
            self._endpoint_known.errback(Failure(ConnectionError(f"{reason} before the endpoint event")))
        elif not self._closed:
            self._lose(reason)

    def _send(self, message: dict[str, Any]) -> None:
        if self.endpoint is None:
            raise PeerGone(f"MCP server {self.config.name!r} has not sent its endpoint yet")
        super()._send(message)

    async def _post(self, message: dict[str, Any]) -> None:
        assert self.endpoint is not None
        headers = self._headers("application/json, text/event-stream")
        headers["Content-Type"] = "application/json"
        body = json.dumps(message, separators=(",", ":")).encode()
        try:
            response = await self._client.request("POST", self.endpoint, headers=headers, data=body, unbuffered=True)
        except CancelledError:
            raise
        except Exception as e:
            reason = f"POST {self.endpoint} failed: {_why(e)}"
            # Answers come on the event stream, so a request refused here must be failed before the loss
            # fails everything pending as of unknown fate.
            self._message_failed(message, reason, delivered=not isinstance(e, NEVER_SENT))
            self._lose(reason)
            return
        try:
            text = await read_body(response, 65536)
        except CancelledError:
            raise
        except Exception as e:
            self._message_failed(message, f"POST {self.endpoint} failed: {_why(e)}")
            return
        if response.code == 404:
            # The endpoint's session is unknown: the server restarted (the stream's end says so too).
            reason = f"HTTP 404 from {self.endpoint}: {_answer_text(text)}"
            self._message_failed(message, f"session unknown to the server ({reason})", delivered=False)
            self._lose(f"session is gone ({reason})", reachable=True)
        elif response.code >= 300:
            self._message_failed(message, f"HTTP {response.code} from {self.endpoint}: {text[:200]!r}")

    def close(self) -> Deferred[None]:
        """Fail what is pending and drop the event stream."""
        if not self._closed:
            self._shut()
            if self._reader is not None:
                self._reader.abort()
        return succeed(None)


async def connect_remote(clock: IReactorTime, config: ServerConfig, client: Any, *, max_bytes: int) -> Any:
    """A connected transport for an ``http`` or ``sse`` server (``client`` None: the ``treq`` module)."""
    if client is None:
        import treq

        client = treq
    if config.transport == "http":
        return StreamableHTTPConnection(clock, config, client, max_bytes)
    connection = LegacySSEConnection(clock, config, client, max_bytes)
    await connection.open()
    return connection
