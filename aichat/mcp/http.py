"""Remote MCP transports over treq: Streamable HTTP (MCP 2025-06-18) and the legacy HTTP+SSE transport.

Streamable HTTP: every message is a POST to the server's URL with ``Accept: application/json,
text/event-stream``; a request is answered by a JSON body or an event stream carrying the response (and
maybe server requests and notifications before it). The ``Mcp-Session-Id`` the server gives at
``initialize`` is echoed on every later message, with ``MCP-Protocol-Version``; a 404 on a session is a
lost session (the supervisor reconnects and initializes again); closing sends DELETE. After the handshake
a GET stream is opened for the server's own requests and notifications (``tools/list_changed``), if the
server offers one.

Legacy HTTP+SSE (protocol 2024-11-05, what the reference used): GET the URL as an event stream, wait for
the ``endpoint`` event, POST every message there; answers arrive as ``message`` events on the stream.

Both take any treq-like client (the ``treq`` module, an ``HTTPClient``, or ``StubTreq`` in tests).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from aichat.mcp.config import ServerConfig
from aichat.mcp.jsonrpc import JSONRPCPeer, PeerGone
from aichat.sse import SSEDecoder, SSETooLargeError

log = Logger()

ACCEPT_BOTH = "application/json, text/event-stream"
CLOSE_TIMEOUT = 5.0
POST_GRACE = 5.0


class BodyTooLarge(Exception):
    """A response body grew past the configured cap."""


class _BodyReader(Protocol):
    """Deliver a response body chunk by chunk; can be aborted, unlike ``treq.collect``."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data
        self.finished: Deferred[None] = Deferred(lambda _: self.abort())
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        try:
            self.on_data(data)
        except Exception:
            self._finish(Failure())
            self.abort()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finish(None)
        else:
            self._finish(reason)

    def abort(self) -> None:
        """Stop reading and drop the connection."""
        self._done = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _finish(self, result: Failure | None) -> None:
        if self._done:
            return
        self._done = True
        if result is None:
            self.finished.callback(None)
        else:
            self.finished.errback(result)


def _read_stream(response: Any, on_data: Callable[[bytes], None]) -> _BodyReader:
    reader = _BodyReader(on_data)
    response.deliverBody(reader)
    return reader


async def _read_body(response: Any, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge(f"response body exceeds {limit} bytes")
        parts.append(data)

    await _read_stream(response, collect).finished
    return b"".join(parts)


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _media_type(response: Any) -> str:
    return (_header(response, "content-type") or "").split(";", 1)[0].strip().lower()


class _RemoteConnection:
    """What both remote transports share: the peer, POSTing messages, and failing when the link is lost."""

    pid: int | None = None

    def __init__(self, clock: IReactorTime, config: ServerConfig, client: Any, max_bytes: int) -> None:
        assert config.url is not None
        self.config = config
        self.url = config.url
        self.peer = JSONRPCPeer(clock, self._send, name=config.name)
        self.on_lost: Callable[[str], None] | None = None
        self.protocol_version: str | None = None
        self._clock = clock
        self._client = client
        self._max_bytes = max_bytes
        self._closed = False
        self._lost = False
        self._posts: set[Deferred[None]] = set()

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        headers.update(self.config.headers)
        return headers

    def _send(self, message: dict[str, Any]) -> None:
        if self._closed or self._lost:
            raise PeerGone(f"MCP server {self.config.name!r} is not connected")
        post = Deferred.fromCoroutine(self._post(message))
        self._posts.add(post)
        # No POST outlives the longest wait the protocol allows for an answer.
        limit = max(self.config.timeout, self.config.init_timeout) + POST_GRACE
        watchdog = self._clock.callLater(limit, post.cancel)

        def done(result: object) -> None:
            if watchdog.active():
                watchdog.cancel()
            self._posts.discard(post)
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.failure("{server}: POST failed unexpectedly", result, server=self.config.name)

        post.addBoth(done)

    async def _post(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _request_id(self, message: dict[str, Any]) -> Any:
        """The id of a request we sent (responses we send to the server also have ids, but no method)."""
        return message.get("id") if "method" in message else None

    def _message_failed(self, message: dict[str, Any], reason: str) -> None:
        request_id = self._request_id(message)
        log.warn(
            "{server}: {method} failed: {reason}",
            server=self.config.name,
            method=message.get("method", "response"),
            reason=reason,
        )
        if request_id is not None:
            self.peer.fail_request(request_id, PeerGone(f"MCP server {self.config.name!r}: {reason}"))

    def _dispatch_json(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warn("{server}: skipped a body that is not JSON: {data!r}", server=self.config.name, data=data[:200])
            return
        self.peer.message_received(message)

    def _lose(self, reason: str) -> None:
        if self._lost or self._closed:
            return
        self._lost = True
        log.error("{server}: connection lost: {reason}", server=self.config.name, reason=reason)
        if self.on_lost is not None:
            self.on_lost(reason)
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
        self._listen_timer: IDelayedCall | None = None

    def _listen(self) -> None:
        """Open the optional GET stream on which the server sends requests and notifications."""
        self._listen_timer = None
        if self._closed or self._lost or self._listener is not None:
            return
        listener = Deferred.fromCoroutine(self._get_stream())
        self._listener = listener

        def ended(result: object) -> None:
            self._listener = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.info("{server}: GET stream failed: {error}", server=self.config.name, error=str(result.value))

        listener.addBoth(ended)

    async def _get_stream(self) -> None:
        headers = self._headers("text/event-stream")
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        response = await self._client.request("GET", self.url, headers=headers, unbuffered=True)
        if response.code == 404 and self.session_id is not None:
            await _read_body(response, 4096)
            self._lose("session expired (HTTP 404); reconnecting")
            return
        if response.code != 200 or _media_type(response) != "text/event-stream":
            # 405: this server offers no GET stream, which the specification allows.
            await _read_body(response, 65536)
            return
        await self._read_events(response)
        if not (self._closed or self._lost):
            self._listen_timer = self._clock.callLater(1.0, self._listen)

    async def _read_events(self, response: Any) -> None:
        """Dispatch every JSON-RPC message of an SSE response body until it ends."""
        decoder = SSEDecoder(max_event_size=self._max_bytes)

        def on_data(data: bytes) -> None:
            for event in decoder.feed(data):
                if event.event == "message" and event.data:
                    self._dispatch_json(event.data)

        await _read_stream(response, on_data).finished

    def _post_headers(self) -> dict[str, str]:
        headers = self._headers(ACCEPT_BOTH)
        headers["Content-Type"] = "application/json"
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    async def _post(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        try:
            response = await self._client.request(
                "POST", self.url, headers=self._post_headers(), data=body, unbuffered=True
            )
        except CancelledError:
            raise
        except Exception as e:
            self._message_failed(message, f"POST {self.url} failed: {e}")
            self._lose(f"POST {self.url} failed: {e}")
            return
        if message.get("method") == "initialize":
            self.session_id = _header(response, "mcp-session-id")
        if response.code == 404 and self.session_id is not None and message.get("method") != "initialize":
            await _read_body(response, 4096)
            self._lose("session expired (HTTP 404); reconnecting")
            return
        if response.code in (202, 204):
            await _read_body(response, self._max_bytes)
            if message.get("method") == "notifications/initialized":
                self._listen()
            return
        if response.code >= 300:
            text = (await _read_body(response, self._max_bytes)).decode("utf-8", "replace")
            self._message_failed(message, f"HTTP {response.code} from {self.url}: {text[:200]}")
            return
        kind = _media_type(response)
        try:
            if kind == "text/event-stream":
                await self._read_events(response)
            elif kind == "application/json":
                self._dispatch_json(await _read_body(response, self._max_bytes))
            else:
                await _read_body(response, self._max_bytes)
                self._message_failed(message, f"unexpected content type {kind!r} from {self.url}")
                return
        except CancelledError:
            raise
        except (BodyTooLarge, SSETooLargeError) as e:
            self._message_failed(message, str(e))
            return
        except Exception as e:
            self._message_failed(message, f"response stream from {self.url} broke: {e}")
            return
        request_id = self._request_id(message)
        if request_id is not None:
            self.peer.fail_request(request_id, PeerGone(f"MCP server {self.config.name!r} sent no response"))

    def close(self) -> Deferred[None]:
        """Fail what is pending and end the session with DELETE; fires when done (bounded)."""
        if self._closing is not None:
            waiter: Deferred[None] = Deferred()
            self._closing.addBoth(lambda _: waiter.callback(None))
            return waiter
        self._shut()
        if self._listen_timer is not None and self._listen_timer.active():
            self._listen_timer.cancel()
        if self._listener is not None:
            self._listener.cancel()
        if self.session_id is None:
            self._closing = succeed(None)
            return succeed(None)
        self._closing = Deferred.fromCoroutine(self._delete())
        done: Deferred[None] = Deferred()
        self._closing.addBoth(lambda _: done.callback(None))
        return done

    async def _delete(self) -> None:
        headers = self._headers("application/json")
        headers["Mcp-Session-Id"] = self.session_id or ""
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        request: Deferred[Any] = self._client.request("DELETE", self.url, headers=headers)
        timer: IDelayedCall = self._clock.callLater(CLOSE_TIMEOUT, request.cancel)
        try:
            response = await request
            await _read_body(response, 65536)
        except Exception as e:
            log.info("{server}: DELETE of the session failed: {error}", server=self.config.name, error=str(e))
        finally:
            if timer.active():
                timer.cancel()


class LegacySSEConnection(_RemoteConnection):
    """MCP over the 2024-11-05 HTTP+SSE transport."""

    def __init__(self, clock: IReactorTime, config: ServerConfig, client: Any, max_bytes: int) -> None:
        super().__init__(clock, config, client, max_bytes)
        self.endpoint: str | None = None
        self._reader: _BodyReader | None = None
        self._endpoint_known: Deferred[None] = Deferred()
        self._decoder = SSEDecoder(max_event_size=max_bytes)

    async def open(self) -> None:
        """GET the event stream and wait for the ``endpoint`` event."""
        headers = self._headers("text/event-stream")
        response = await self._client.request("GET", self.url, headers=headers, unbuffered=True)
        if response.code != 200:
            text = (await _read_body(response, 65536)).decode("utf-8", "replace")
            raise ConnectionError(f"GET {self.url}: HTTP {response.code}: {text[:200]}")
        if _media_type(response) != "text/event-stream":
            await _read_body(response, 65536)
            raise ConnectionError(f"GET {self.url}: not an event stream ({_media_type(response)!r})")
        self._reader = _read_stream(response, self._on_data)
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
        reason = "event stream ended" if not isinstance(result, Failure) else f"event stream broke: {result.value}"
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
            text = await _read_body(response, 65536)
        except CancelledError:
            raise
        except Exception as e:
            self._message_failed(message, f"POST {self.endpoint} failed: {e}")
            return
        if response.code >= 300:
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
