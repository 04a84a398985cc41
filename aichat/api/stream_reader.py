"""SSE readers of chat streams: one object per reader, paced by its client, bounded in number and lag.

A :class:`StreamReader` writes a stream's events from the first, but only while the connection takes
them: it is the request's push producer, so the transport pauses it when its send buffer fills and resumes
it when the buffer drains. A paused reader keeps only its place in the stream (the stream holds the
events anyway), so a client that does not read costs one transport buffer, not a copy of every event. A
reader that falls behind the live stream by more than ``max_lag_bytes`` is dropped: its last write is an
``error`` event, then its connection is closed the way Twisted times out a client (aborted after the
channel's ``abortTimeout`` if the client still does not read).

:class:`ReaderSlots` caps the readers one stream may have at once; one more is answered 429.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from aichat.api.errors import APIError
from aichat.chat.streams import TERMINAL, Event, Stream
from aichat.sse import encode_comment, encode_event

log = Logger(namespace="aichat.api")

def frame(event: Event) -> bytes:
    """One chat event as the reference's SSE frame."""
    return encode_event("message", event.to_json())


class ReaderSlots:
    """How many SSE readers each stream has; at most ``limit`` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, stream_id: str) -> None:
        """Take a slot for a reader of ``stream_id`` or raise 429."""
        count = self._counts.get(stream_id, 0)
        if count >= self.limit:
            raise APIError(f"Too many readers of this stream (the limit is {self.limit})", 429)
        self._counts[stream_id] = count + 1

    def release(self, stream_id: str) -> None:
        """Give a slot back."""
        count = self._counts.get(stream_id, 0) - 1
        if count > 0:
            self._counts[stream_id] = count
        else:
            self._counts.pop(stream_id, None)

    def count(self, stream_id: str) -> int:
        """Readers of ``stream_id`` now."""
        return self._counts.get(stream_id, 0)


@implementer(IPushProducer)
class StreamReader:
    """One client reading one stream as SSE, from its first event until ``done`` or ``error``."""

    def __init__(
        self,
        request: IRequest,
        stream: Stream,
        clock: IReactorTime,
        *,
        keepalive_seconds: float,
        max_lag_bytes: int,
        open_streams: Any = None,
    ) -> None:
        self._request = request
        #: The gauge of open SSE responses this reader counts in while it runs.
        self._open_streams = open_streams
        self._stream = stream
        self._clock = clock
        self._keepalive = keepalive_seconds
        self._max_lag = max_lag_bytes
        self._cursor = 0
        self._paused = False
        self._lag = 0
        self._over = False
        self._done: Deferred[None] = Deferred()

    async def run(self) -> None:
        """Write the stream until it ends, the client goes away, or the reader is dropped."""
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"Connection", b"keep-alive")
        request.write(b"")
        consumer = cast(IConsumer, request)  # twisted.web's Request is the transport's consumer proxy
        consumer.registerProducer(self, True)
        ping = LoopingCall(self._ping)
        ping.clock = self._clock
        unsubscribe = self._stream.subscribe(self._on_event)
        if self._open_streams is not None:
            self._open_streams.inc()
        try:
            if not self._over:
                ping.start(self._keepalive, now=False)
                await self._done
        finally:
            self._over = True
            unsubscribe()
            if ping.running:
                ping.stop()
            consumer.unregisterProducer()
            if self._open_streams is not None:
                self._open_streams.dec()

    # -- IPushProducer ------------------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._lag = 0
        self._pump()

    def stopProducing(self) -> None:
        self._end()

    # -- writing ------------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if self._over:
            return
        if self._paused:
            self._lag += len(frame(event))
            if self._lag > self._max_lag:
                self._drop()
            return
        self._pump()

    def _pump(self) -> None:
        events = self._stream.events
        while not self._over and not self._paused and self._cursor < len(events):
            event = events[self._cursor]
            self._cursor += 1
            self._request.write(frame(event))
            if event.type in TERMINAL:
                self._end()

    def _ping(self) -> None:
        if not self._paused and not self._over:
            self._request.write(encode_comment("ping"))

    def _drop(self) -> None:
        """End a reader that fell too far behind: an ``error`` event as its last write, then close."""
        log.warn(
            "Dropping a stream reader {behind} bytes behind (limit {limit}) in session {session_id}",
            behind=self._lag,
            limit=self._max_lag,
            session_id=self._stream.session_id,
        )
        message = f"This reader fell more than {self._max_lag} bytes behind the stream and was dropped"
        self._request.write(frame(Event("error", self._stream.session_id, error=message)))
        channel = getattr(self._request, "channel", None)
        if channel is not None:
            # Close after the buffered bytes, and abort if they are still unsent after abortTimeout.
            channel.timeoutConnection()
        self._end()

    def _end(self) -> None:
        self._over = True
        if not self._done.called:
            self._done.callback(None)
