"""The HTTP site: a channel and a ``Request`` that bound what a client may send, and the edge resource.

Twisted buffers a whole request body before dispatching it, so the size limit must be enforced while
the body arrives: a declared ``Content-Length`` over the limit is answered 413 at once and the
connection closed without reading the body; a chunked body is cut off as soon as it passes the limit.
The limit is the one the request's route declares (``@body_limit``, else ``limits.max_body_bytes``), found
by the site's ``limit_for`` from :attr:`APIChannel.request_target` once the headers are in.

Twisted's idle timeout restarts on every byte, so a client sending one byte every few seconds would hold a
connection for ever: :class:`APIChannel` also bounds the time from a request's first byte until its head
and body are in (408), and answers a request line or headers over Twisted's limits with 414 or 431 JSON
instead of a bare 400 or a closed connection.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aichat import content_type
from aichat.logs import REQUEST_ID
from aichat.metrics import UNMATCHED_ROUTE, Metrics

#: The body limit of a request target (:meth:`APIChannel.request_target`).
LimitFor = Callable[[bytes], int]


class _Discard(io.BytesIO):
    def write(self, data: Any) -> int:
        return len(data)


#: A client's ``X-Request-ID`` is kept when it is 1-128 of these characters; otherwise one is generated.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
#: Methods counted by name in the metrics; others are ``_OTHER``, as OpenTelemetry names them.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def request_id_for(values: Sequence[bytes] | None) -> str:
    """The client's ``X-Request-ID`` when it is a plain token, else a new random one."""
    if values and _CLIENT_REQUEST_ID.fullmatch(values[0]):
        return values[0].decode("ascii")
    return uuid.uuid4().hex


class LimitedRequest(Request):
    """A request whose body may not exceed ``site.limit_for(channel.request_target)`` bytes (the limit its
    route declares, see :class:`~aichat.api.routing.BodyLimits`), served under its request id.

    The id (the client's ``X-Request-ID`` or a new one) is the response's ``X-Request-ID``, ``REQUEST_ID``
    while it is handled (so log lines and error bodies carry it), and ``request_id``; once the response
    is finished its duration is counted by route template, method and status.
    """

    _rejected = False
    _received = 0
    _multipart_type: Sequence[bytes] | None = None
    request_id = ""

    def process(self) -> None:
        if self._multipart_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._multipart_type)
        self.request_id = request_id_for(self.requestHeaders.getRawHeaders(b"x-request-id"))
        self.setHeader(b"X-Request-ID", self.request_id.encode("ascii"))
        site = getattr(self.channel, "site", None)
        if isinstance(site, APISite) and site.metrics is not None:
            started = site.clock.seconds()
            self.notifyFinish().addBoth(self._count, site, started)
        token = REQUEST_ID.set(self.request_id)
        try:
            super().process()
        finally:
            REQUEST_ID.reset(token)

    def _count(self, result: object, site: APISite, started: float) -> None:
        assert site.metrics is not None
        method = self.method.decode("latin-1")
        route = site.route_of(self) if site.route_of is not None else UNMATCHED_ROUTE
        site.metrics.http_duration.labels(
            method if method in _METHODS else "_OTHER", route, str(self.code)
        ).observe(site.clock.seconds() - started)

    def _limit(self) -> int:
        limit_for: LimitFor | None = getattr(getattr(self.channel, "site", None), "limit_for", None)
        if limit_for is None or not isinstance(self.channel, APIChannel):
            return 1 << 62
        return limit_for(self.channel.request_target)

    def gotLength(self, length: int | None) -> None:
        set_no_delay = getattr(self.channel.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # SSE events are small writes that must leave at once, not wait for the previous one's ACK.
            set_no_delay(True)
        self._max_body = self._limit()
        if length is not None and length > self._max_body:
            self._reject()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._max_body:
            self._reject()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        declared = self.requestHeaders.getRawHeaders(b"content-type")
        if content_type.of_headers(self.requestHeaders).media == content_type.FORM_DATA:
            # Twisted would parse the form itself and answer a malformed one with a bare 400; the route parses
            # it (keeping file names and types) and reports problems as JSON.
            self.requestHeaders.removeHeader(b"content-type")
            self._multipart_type = declared
        active: set[Request] | None = getattr(getattr(self.channel, "site", None), "active", None)
        if active is not None:
            active.add(self)
            self.notifyFinish().addBoth(lambda _: active.discard(self))
        super().requestReceived(command, path, version)

    def _reject(self) -> None:
        self._rejected = True
        self.content = _Discard()
        transport = self.channel.transport
        assert transport is not None
        request_id = request_id_for(self.requestHeaders.getRawHeaders(b"x-request-id"))
        transport.write(_raw_json_error(413, b"Request Entity Too Large",
                                        f"Request body too large: the limit is {self._max_body} bytes", request_id))
        transport.loseConnection()


def _raw_json_error(status: int, reason: bytes, message: str, request_id: str = "") -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for answers given outside a request
    (with the request's id once its headers were read)."""
    fields: dict[str, str] = {"error": message}
    extra = b""
    if request_id:
        fields["request_id"] = request_id
        extra = b"X-Request-ID: %s\r\n" % request_id.encode("ascii")
    body = json.dumps(fields).encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (status, reason, extra, len(body), body)
    )


class APIChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with a deadline on receiving each request and JSON answers to oversized heads.

    This is the one place that relies on ``HTTPChannel`` internals (``_handlingRequest``, ``_path``,
    ``_receivedHeaderSize``, ``_receivedHeaderCount`` and the ``_respondToBadRequestAndDisconnect`` hook),
    and ``tests/test_site.py`` and ``tests/test_routing.py`` hold each of them to its behaviour.
    """

    #: Seconds from a request's first byte until its head and body are in; set by :class:`APISite`.
    request_timeout: float = 30.0
    _deadline: IDelayedCall | None = None

    @property
    def request_target(self) -> bytes:
        """The request target (path and query, as sent) of the request whose head was read last.

        The body limit is chosen from it once the headers are in, before any of the body is read; it is
        ``b""`` before the first request line.
        """
        target: bytes = getattr(self, "_path", None) or b""
        return target

    def connectionMade(self) -> None:
        super().connectionMade()
        channels: set[APIChannel] | None = getattr(getattr(self, "site", None), "channels", None)
        if channels is not None:
            channels.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._handlingRequest and data:
            self._deadline = self.callLater(self.request_timeout, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if isinstance(site, APISite):
            site.channel_closed(self)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, b"Request Timeout",
                     f"Request not received within {self.request_timeout:g} seconds")

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self.requests:
            self._refuse(414, b"URI Too Long", f"Request line too long: the limit is {self.MAX_LENGTH} bytes")
        else:
            self._headers_too_large()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize or self._receivedHeaderCount > self.maxHeaders:
            self._headers_too_large()
        else:
            self._refuse(400, b"Bad Request", "Malformed HTTP request")

    def _headers_too_large(self) -> None:
        self._refuse(431, b"Request Header Fields Too Large",
                     f"Request headers too large: the limit is {self.totalHeadersSize} bytes "
                     f"and {self.maxHeaders} headers")

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        self._cancel_deadline()
        transport = self.transport
        if transport is None:
            return
        # Nothing more of this connection is parsed: its remaining bytes may be anything.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        transport.write(_raw_json_error(status, reason, message))
        self.loseConnection()


def _json_error(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    body = {"error": message}
    request_id = getattr(request, "request_id", "")
    if request_id:
        body["request_id"] = request_id
    return json.dumps(body).encode()


class EdgeResource(Resource):
    """The API's outermost resource: refuses what Klein cannot route, and applies the CORS policy.

    A path or ``Host`` that is not UTF-8 is a JSON 400 here (Klein would answer an HTML 400 and log a
    traceback). CORS, for browsers only:

    - no ``origins`` (the default): no CORS headers, so no other web origin can read a response;
    - ``*``: any origin may read responses, without credentials (``Access-Control-Allow-Origin: *`` and no
      ``Allow-Credentials``, as the CORS rules require), so a page elsewhere never reads a logged-in user's
      chats through the browser's cookies;
    - listed origins: each is echoed with credentials allowed, for a UI on another origin behind the same
      cookie-authenticated proxy.
    """

    isLeaf = True
    METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
    HEADERS = (
        b"Origin, Content-Type, Accept, Authorization, X-Requested-With, X-User-ID, Last-Event-ID, X-Request-ID"
    )

    def __init__(self, wrapped: IResource, origins: Sequence[str]) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._any = "*" in origins
        self._origins = {o.encode() for o in origins if o != "*"}

    def render(self, request: Request) -> bytes | int:
        try:
            b"/".join(request.postpath or [request.path]).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _json_error(request, http.BAD_REQUEST, "Invalid request: the path or host is not UTF-8")
        origin = request.getHeader(b"origin")
        if origin is not None and self._allow(request, origin) and request.method == b"OPTIONS":
            request.setHeader(b"Access-Control-Allow-Methods", self.METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", self.HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"600")
            request.setResponseCode(http.NO_CONTENT)
            return b""
        result: bytes | int = self._wrapped.render(request)
        return result

    def _allow(self, request: Request, origin: bytes) -> bool:
        """Set the CORS headers that ``origin`` gets; whether it may make cross-origin requests at all."""
        if origin in self._origins:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
            request.setHeader(b"Vary", b"Origin")
            return True
        if self._any:
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
            return True
        if self._origins:
            request.setHeader(b"Vary", b"Origin")
        return False


class APISite(Site):
    """A ``Site`` with per-route body limits (``limit_for``) and a request deadline that knows its in-flight
    requests."""

    displayTracebacks = False
    noisy = False
    # A plain HTTP/1.1 channel: HTTP/2 is only negotiated over TLS, which this site never serves.
    protocol = APIChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        limit_for: LimitFor,
        *,
        reactor: IReactorTime | None = None,
        request_timeout: float = 30.0,
        metrics: Metrics | None = None,
        route_of: Callable[[Request], str] | None = None,
    ) -> None:
        super().__init__(resource, requestFactory=LimitedRequest, reactor=reactor)
        self.limit_for = limit_for
        #: Where request durations are counted, and the route template a request matched.
        self.metrics = metrics
        self.route_of = route_of
        self.clock: IReactorTime = self.reactor
        self.request_timeout = request_timeout
        self.active: set[Request] = set()
        self.channels: set[APIChannel] = set()
        self._all_closed: list[Deferred[None]] = []

    def log(self, request: http.Request) -> None:
        """The access log line, with the request's id."""
        token = REQUEST_ID.set(getattr(request, "request_id", "") or None)
        try:
            super().log(request)
        finally:
            REQUEST_ID.reset(token)

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.request_timeout = self.request_timeout
        return channel

    def drain(self, clock: IReactorTime, grace: float) -> Deferred[bool]:
        """Fire ``True`` once no request is in flight, or ``False`` after ``grace`` seconds."""
        done: Deferred[bool] = Deferred()

        def check() -> None:
            if not self.active:
                finish(True)

        def finish(idle: bool) -> None:
            if poll.running:
                poll.stop()
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(idle)

        poll = LoopingCall(check)
        poll.clock = clock
        timer = clock.callLater(grace, finish, False)
        poll.start(0.05, now=True)
        return done

    def channel_closed(self, channel: APIChannel) -> None:
        """A connection went away; fire the waiters of :meth:`close_connections` once none is left."""
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._all_closed = self._all_closed, []
            for waiter in waiting:
                if not waiter.called:
                    waiter.callback(None)

    async def close_connections(self, clock: IReactorTime, within: float) -> int:
        """Close every connection once its written bytes are sent; abort those still open after ``within`` s.

        Returns how many were aborted. Without this, bytes still buffered when the reactor stops (the last
        event of a stream, the end of its response) would be dropped with the connection.
        """
        if not self.channels:
            return 0
        closed: Deferred[None] = Deferred()
        self._all_closed.append(closed)
        for channel in list(self.channels):
            channel.loseConnection()
        with contextlib.suppress(defer.TimeoutError):
            await closed.addTimeout(within, clock)
        left = list(self.channels)
        for channel in left:
            if channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]
        return len(left)



__all__ = ["NOT_DONE_YET", "APISite", "EdgeResource", "LimitedRequest"]
