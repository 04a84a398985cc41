"""SSE readers on a Clock: keep-alive pings, flow control (a paused reader writes nothing and keeps only its
place), dropping a reader that falls too far behind, and the cap on readers per stream."""

from __future__ import annotations

from typing import cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest

from aichat.api.errors import APIError
from aichat.api.stream_reader import ReaderSlots, StreamReader
from aichat.chat.streams import Event, Stream, StreamRegistry


class Channel:
    """Records how the reader asked for its connection to be closed."""

    def __init__(self) -> None:
        self.timed_out = 0

    def timeoutConnection(self) -> None:
        self.timed_out += 1


class Client:
    """The request side of one SSE connection: what was written, and the producer it must pace."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.code = 0
        self.producer: IPushProducer | None = None
        self.channel = Channel()

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


def start(stream: Stream, clock: Clock, max_lag: int = 10_000) -> tuple[Client, Deferred[None]]:
    """A reader of ``stream`` running for a new client."""
    client = Client()
    reader = StreamReader(cast(IRequest, client), stream, clock, keepalive_seconds=15, max_lag_bytes=max_lag)
    return client, Deferred.fromCoroutine(reader.run())


def new_stream(clock: Clock) -> Stream:
    return StreamRegistry(clock, 60).create("s", "7", "sess")


def test_pings_while_quiet_and_timers_cancelled_at_the_end() -> None:
    """While a turn is quiet, ': ping' comments go out every keepalive interval; no timer is left after."""
    clock = Clock()
    stream = new_stream(clock)
    stream.emit(Event("message", "sess", content="early"))
    client, running = start(stream, clock)
    assert client.code == 200 and client.headers[b"Content-Type"].startswith(b"text/event-stream")
    assert client.body.count(b"event: message") == 1
    clock.advance(15)
    clock.advance(15)
    assert client.body.count(b": ping\n\n") == 2
    assert not running.called
    stream.emit(Event("done", "sess"))
    assert running.called
    assert client.body.endswith(b'data: {"type":"done","session_id":"sess"}\n\n')
    assert client.producer is None, "the producer is unregistered"
    pending = [getattr(c.func, "__name__", "") for c in clock.getDelayedCalls() if c.active()]
    assert pending == ["_remove"], "only the stream's own removal timer is left"


def test_a_paused_reader_writes_nothing_then_catches_up_in_order() -> None:
    """Paused by its transport, a reader writes no events and no pings; resumed, it sends what it missed."""
    clock = Clock()
    stream = new_stream(clock)
    client, running = start(stream, clock)
    assert client.producer is not None
    client.producer.pauseProducing()
    before = len(client.written)
    for i in range(5):
        stream.emit(Event("message", "sess", content=f"part{i} "))
    clock.advance(60)
    assert len(client.written) == before
    client.producer.resumeProducing()
    text = client.body.decode()
    assert [text.index(f"part{i} ") for i in range(5)] == sorted(text.index(f"part{i} ") for i in range(5))
    stream.emit(Event("done", "sess"))
    assert running.called


def test_a_late_reader_is_paced_during_replay() -> None:
    """A reader that joins a long stream writes the replay only while its transport takes it."""
    clock = Clock()
    stream = new_stream(clock)
    for i in range(100):
        stream.emit(Event("message", "sess", content=f"{i} "))
    client = Client()
    original_write = client.write

    def write_then_fill(data: bytes) -> None:
        original_write(data)
        if len(client.written) == 10 and client.producer is not None:
            client.producer.pauseProducing()

    client.write = write_then_fill  # type: ignore[method-assign]
    reader = StreamReader(cast(IRequest, client), stream, clock, keepalive_seconds=15, max_lag_bytes=10_000)
    running = Deferred.fromCoroutine(reader.run())
    assert len(client.written) == 10, "replay stops as soon as the transport pauses the reader"
    assert client.producer is not None
    client.producer.resumeProducing()
    assert client.body.count(b"event: message") == 100
    stream.emit(Event("done", "sess"))
    assert running.called


def test_a_reader_that_falls_too_far_behind_is_dropped_with_an_error_event() -> None:
    """Past ``max_lag_bytes`` of live events while paused: an error event, then the connection is closed."""
    clock = Clock()
    stream = new_stream(clock)
    client, running = start(stream, clock, max_lag=4096)
    assert client.producer is not None
    client.producer.pauseProducing()
    for _ in range(40):
        stream.emit(Event("message", "sess", content="x" * 200))
    assert running.called
    assert b"fell more than 4096 bytes behind" in client.written[-1]
    assert client.channel.timed_out == 1
    assert client.body.count(b'"type":"message"') == 0
    stream.emit(Event("done", "sess"))
    assert client.channel.timed_out == 1
    assert stream.ended and not stream.subscribers, "the turn is unaffected and the reader unsubscribed"


def test_a_reader_going_away_unsubscribes() -> None:
    """The transport stopping the producer ends the reader without touching the stream."""
    clock = Clock()
    stream = new_stream(clock)
    client, running = start(stream, clock)
    assert client.producer is not None
    client.producer.stopProducing()
    assert running.called
    stream.emit(Event("message", "sess", content="later"))
    assert b"later" not in client.body


def test_reader_slots_cap_each_stream() -> None:
    """At most ``limit`` readers per stream; a released slot can be taken again; streams are independent."""
    slots = ReaderSlots(2)
    slots.acquire("a")
    slots.acquire("a")
    with pytest.raises(APIError) as raised:
        slots.acquire("a")
    assert raised.value.status == 429
    slots.acquire("b")
    slots.release("a")
    slots.acquire("a")
    assert (slots.count("a"), slots.count("b")) == (2, 1)
    slots.release("a")
    slots.release("a")
    assert slots.count("a") == 0
