"""The HTTP site: a ``Request`` that refuses oversized bodies before reading them, and the edge resource.

Twisted buffers a whole request body before dispatching it, so the size limit must be enforced while
the body arrives: a declared ``Content-Length`` over the limit is answered 413 at once and the
connection closed without reading the body; a chunked body is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

LimitFor = Callable[[bytes], int]


class _Discard(io.BytesIO):
    def write(self, data: Any) -> int:
        return len(data)


class LimitedRequest(Request):
    """A request whose body may not exceed ``site.limit_for(path)`` bytes."""

    _rejected = False
    _received = 0
    _multipart_type: Sequence[bytes] | None = None

    def process(self) -> None:
        if self._multipart_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._multipart_type)
        super().process()

    def _limit(self) -> int:
        limit_for: LimitFor | None = getattr(getattr(self.channel, "site", None), "limit_for", None)
        path: bytes = getattr(self.channel, "_path", b"") or b""
        return limit_for(path) if limit_for is not None else 1 << 62

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
        content_type = self.requestHeaders.getRawHeaders(b"content-type")
        if content_type and content_type[0].lower().startswith(b"multipart/form-data"):
            # Twisted would parse the form itself and answer a malformed one with a bare 400; the route parses
            # it (keeping file names and types) and reports problems as JSON.
            self.requestHeaders.removeHeader(b"content-type")
            self._multipart_type = content_type
        active: set[Request] | None = getattr(getattr(self.channel, "site", None), "active", None)
        if active is not None:
            active.add(self)
            self.notifyFinish().addBoth(lambda _: active.discard(self))
        super().requestReceived(command, path, version)

    def _reject(self) -> None:
        self._rejected = True
        self.content = _Discard()
        body = json.dumps(
            {"error": f"Request body too large: the limit is {self._max_body} bytes"}
        ).encode()
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        transport.loseConnection()


def _json_error(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps({"error": message}).encode()


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
    HEADERS = b"Origin, Content-Type, Accept, Authorization, X-Requested-With, X-User-ID, Last-Event-ID"

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
    """A ``Site`` with per-path body limits that knows its in-flight requests, for a graceful stop."""

    displayTracebacks = False
    noisy = False

    def __init__(self, resource: IResource, limit_for: LimitFor) -> None:
        super().__init__(resource, requestFactory=LimitedRequest)
        self.limit_for = limit_for
        self.active: set[Request] = set()

    def drain(self, clock: IReactorTime, grace: float) -> Deferred[None]:
        """Fire when no request is in flight, or after ``grace`` seconds, aborting what is left."""
        done: Deferred[None] = Deferred()

        def check() -> None:
            if not self.active:
                finish()

        def finish() -> None:
            if poll.running:
                poll.stop()
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        def give_up() -> None:
            for request in list(self.active):
                transport = request.channel.transport if request.channel is not None else None
                if transport is not None:
                    transport.abortConnection()  # type: ignore[attr-defined]
            finish()

        poll = LoopingCall(check)
        poll.clock = clock
        timer = clock.callLater(grace, give_up)
        poll.start(0.05, now=True)
        return done


__all__ = ["NOT_DONE_YET", "APISite", "EdgeResource", "LimitedRequest"]
