"""Flow control for SSE responses: the transport's push producer, a bound on what piles up unsent, and how a
response that falls too far behind ends.

A :class:`PacedResponse` is its request's push producer: the transport pauses it when its send buffer fills
(the client stopped reading) and resumes it when the buffer drains. While paused it writes nothing and
counts the bytes that arrive for it; past ``max_lag_bytes`` it is dropped: its last write is an error in its
face's own format (:meth:`PacedResponse._last_words`), then the connection is closed the way Twisted times
out a client (after the buffered bytes, aborted after the channel's ``abortTimeout`` if they stay unsent).
What produces the events (a turn) never waits for a reader, so a client that does not read slows nobody.
Subclasses say where unsent events wait (:meth:`PacedResponse._pump` writes them once resumed).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

log = Logger(namespace="aichat.api")


@implementer(IPushProducer)
class PacedResponse:
    """One SSE response paced by its client; ``over`` once it ended (done, dropped, or the client left)."""

    #: What the log calls a response of this kind when it is dropped.
    kind = "an SSE response"

    def __init__(self, request: IRequest, max_lag_bytes: int) -> None:
        self._request = request
        self._max_lag = max_lag_bytes
        self._paused = False
        self._lag = 0
        self.over = False
        self._registered = False

    def _start(self) -> None:
        """Answer 200 as an event stream (never buffered by a proxy) and become the request's producer."""
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        # twisted.web's Request is the transport's consumer proxy.
        cast(IConsumer, request).registerProducer(self, True)
        self._registered = True

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            cast(IConsumer, self._request).unregisterProducer()

    # -- IPushProducer ------------------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._lag = 0
        self._pump()

    def stopProducing(self) -> None:
        self._end()

    # -- what subclasses provide --------------------------------------------------------------------

    def _pump(self) -> None:
        """Write what waits, in order, while the client takes it."""
        raise NotImplementedError

    def _last_words(self, message: str) -> bytes:
        """The error frame, in this response's format, that ends a dropped response."""
        raise NotImplementedError

    def _log_fields(self) -> dict[str, Any]:
        """Fields naming this response in the log."""
        return {}

    def _end(self) -> None:
        self.over = True

    # -- lag ----------------------------------------------------------------------------------------

    def _behind(self, size: int) -> bool:
        """Count ``size`` bytes that arrived while paused; past the limit, drop the response (``True``)."""
        self._lag += size
        if self._lag <= self._max_lag:
            return False
        self._drop()
        return True

    def _drop(self) -> None:
        """End a response that fell too far behind: its error frame as its last write, then close."""
        log.warn(
            "Dropping " + self.kind + " {behind} bytes behind (limit {limit})",
            behind=self._lag,
            limit=self._max_lag,
            **self._log_fields(),
        )
        message = f"This reader fell more than {self._max_lag} bytes behind the stream and was dropped"
        self._request.write(self._last_words(message))
        channel = getattr(self._request, "channel", None)
        if channel is not None:
            # Close after the buffered bytes, and abort if they are still unsent after abortTimeout.
            channel.timeoutConnection()
        self._end()
