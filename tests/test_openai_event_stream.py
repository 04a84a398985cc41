"""The OpenAI faces' SSE writer on a Clock: it honours the transport's flow control (a paused stream writes
nothing, not even pings, and catches up in order), ends a stream whose client falls too far behind with the
face's own error frame, and lets the route finish only once what waited was written."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest

from aichat.api.openai_chat import lagged
from aichat.api.openai_wire import EventStream
from tests.test_stream_reader import Client


class Request(Client):
    """A request the writer can also watch for the client going away."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: Deferred[None] = Deferred()

    def notifyFinish(self) -> Deferred[None]:
        return self.finished


def open_stream(max_lag: int = 1000) -> tuple[Request, EventStream, Clock]:
    request, clock = Request(), Clock()
    out = EventStream(cast(IRequest, request), clock, 15, max_lag, lagged)
    return request, out, clock


def data_frames(body: bytes) -> list[Any]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]


def test_a_paused_stream_writes_nothing_then_catches_up_in_order() -> None:
    """Frames sent while the transport is paused wait (no ping either) and go out in order on resume."""
    request, out, clock = open_stream()
    assert request.producer is out
    out.send({"n": 0})
    out.pauseProducing()
    for n in range(1, 4):
        out.send({"n": n})
    clock.advance(30)
    assert data_frames(request.body) == [{"n": 0}] and b": ping" not in request.body
    out.resumeProducing()
    assert data_frames(request.body) == [{"n": n} for n in range(4)]
    flushed = Deferred.fromCoroutine(out.flushed())
    assert flushed.called and request.producer is None and not clock.getDelayedCalls()


def test_the_route_waits_for_what_a_paused_client_has_not_taken() -> None:
    """``flushed`` fires only when the waiting frames are written: the response is not finished under them."""
    request, out, _ = open_stream()
    out.pauseProducing()
    out.send({"n": 1})
    out.send("[DONE]")
    flushed = Deferred.fromCoroutine(out.flushed())
    assert not flushed.called and request.producer is out
    out.resumeProducing()
    assert flushed.called and request.body.endswith(b"data: [DONE]\n\n")


def test_a_client_too_far_behind_gets_the_faces_error_and_is_closed() -> None:
    """Past ``max_lag_bytes`` of waiting frames the stream's last write is the face's error chunk (OpenAI's
    error shape), the connection is closed, and later frames are dropped, not queued."""
    request, out, _ = open_stream(max_lag=200)
    out.send({"n": 0})
    out.pauseProducing()
    for n in range(1, 20):
        out.send({"n": n, "pad": "x" * 20})
    assert out.gone and request.channel.timed_out == 1
    frames = data_frames(request.body)
    assert frames[0] == {"n": 0}
    error = frames[-1]["error"]
    assert error["code"] == "reader_lag" and "fell more than 200 bytes behind" in error["message"]
    assert len(frames) == 2
    out.resumeProducing()
    out.send({"n": 99})
    assert len(data_frames(request.body)) == 2
    assert Deferred.fromCoroutine(out.flushed()).called


def test_a_client_that_goes_away_stops_the_writes() -> None:
    """Once the connection is gone nothing more is written or kept, and the route is not held."""
    request, out, _ = open_stream()
    out.pauseProducing()
    out.send({"n": 1})
    request.finished.callback(None)
    out.send({"n": 2})
    assert out.gone and data_frames(request.body) == []
    assert Deferred.fromCoroutine(out.flushed()).called
