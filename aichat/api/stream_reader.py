"""SSE readers of chat streams: one object per reader, paced by its client, bounded in number and lag.

A :class:`StreamReader` writes a stream's events from the first, but only while the connection takes
them: it is a :class:`~aichat.api.sse_flow.PacedResponse`, the request's push producer, so the transport
pauses it when its send buffer fills and resumes it when the buffer drains. A paused reader keeps only its
place in the stream (the stream holds the events anyway), so a client that does not read costs one
transport buffer, not a copy of every event. A reader that falls behind the live stream by more than
``max_lag_bytes`` is dropped: its last write is an ``error`` event, then its connection is closed.

:class:`ReaderSlots` caps the readers one stream may have at once; one more is answered 429.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.iweb import IRequest

from aichat.api.errors import APIError
from aichat.api.sse_flow import PacedResponse
from aichat.chat.streams import TERMINAL, Event, Stream
from aichat.sse import encode_comment, encode_event


def frame(event: Event, event_id: int | None = None) -> bytes:
    """One chat event as the reference's SSE frame; ``event_id`` is its place in the stream (1, 2, ...),
    which a client sends back as ``Last-Event-ID`` to resume after it."""
    return encode_event("message", event.to_json(), event_id=None if event_id is None else str(event_id))


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


class StreamReader(PacedResponse):
    """One client reading one stream as SSE, from its first event until ``done`` or ``error``."""

    kind = "a stream reader"

    def __init__(
        self,
        request: IRequest,
        stream: Stream,
        clock: IReactorTime,
        *,
        keepalive_seconds: float,
        max_lag_bytes: int,
        after: int = 0,
        open_streams: Any = None,
    ) -> None:
        super().__init__(request, max_lag_bytes)
        #: The gauge of open SSE responses this reader counts in while it runs.
        self._open_streams = open_streams
        self._stream = stream
        self._clock = clock
        self._keepalive = keepalive_seconds
        #: Events before this place were sent already (``Last-Event-ID``).
        self._cursor = after
        self._done: Deferred[None] = Deferred()

    async def run(self) -> None:
        """Write the stream until it ends, the client goes away, or the reader is dropped."""
        self._request.setHeader(b"Connection", b"keep-alive")
        self._start()
        self._request.write(b"")
        ping = LoopingCall(self._ping)
        ping.clock = self._clock
        unsubscribe = self._stream.subscribe(self._on_event)
        if self._open_streams is not None:
            self._open_streams.inc()
        if self._stream.ended and self._cursor >= len(self._stream.events):
            self._end()  # resumed after the last event: nothing more will come
        try:
            if not self.over:
                ping.start(self._keepalive, now=False)
                await self._done
        finally:
            self.over = True
            unsubscribe()
            if ping.running:
                ping.stop()
            self._unregister()
            if self._open_streams is not None:
                self._open_streams.dec()

    # -- writing ------------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if self.over:
            return
        if self._paused:
            self._behind(len(frame(event)))
            return
        self._pump()

    def _pump(self) -> None:
        events = self._stream.events
        while not self.over and not self._paused and self._cursor < len(events):
            event = events[self._cursor]
            self._cursor += 1
            self._request.write(frame(event, self._cursor))
            if event.type in TERMINAL:
                self._end()

    def _ping(self) -> None:
        if not self._paused and not self.over:
            self._request.write(encode_comment("ping"))

    def _last_words(self, message: str) -> bytes:
        return frame(Event("error", self._stream.session_id, error=message))

    def _log_fields(self) -> dict[str, Any]:
        return {"session_id": self._stream.session_id}

    def _end(self) -> None:
        super()._end()
        if not self._done.called:
            self._done.callback(None)
