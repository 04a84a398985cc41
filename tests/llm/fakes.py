"""In-memory stand-ins for treq's client and responses, so the OpenAI client can be driven byte by byte
with a :class:`~twisted.internet.task.Clock` and no network."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from tests.upstream import chunk

HANG = "hang"


@dataclass(frozen=True)
class Hang:
    """A request that never gets its headers and, when cancelled, fails with ``error`` as agents do."""

    error: BaseException


def sse(*events: Any, done: bool = True, newline: str = "\n", space: str = " ") -> bytes:
    """An event stream of ``events`` (dicts as JSON, strings as they are), then ``data: [DONE]``."""
    lines = []
    for event in events:
        text = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        lines.append(f"data:{space}{text}{newline}{newline}")
    if done:
        lines.append(f"data:{space}[DONE]{newline}{newline}")
    return "".join(lines).encode()


def text_events(*parts: str, usage: bool = True) -> list[dict[str, Any]]:
    """The chunks of a streamed text answer."""
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": part}) for part in parts]
    events.append(chunk({}, finish_reason="stop"))
    if usage:
        events.append(
            chunk(usage={"prompt_tokens": 3, "completion_tokens": len(parts), "total_tokens": 3 + len(parts)})
        )
    return events


class FakeTransport:
    """The body transport: records a close and ends the body the way a dropped connection does."""

    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True
        self.response.end(Failure(ResponseFailed([Failure(ConnectionLost("closed by client"))])))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeResponse:
    """A response whose body is ``pieces``, then ``end``: True for a clean end, a Failure, or None to stay
    open (use :meth:`send` and :meth:`end` later)."""

    def __init__(
        self,
        code: int = 200,
        pieces: list[bytes] | bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        end: bool | Failure | None = True,
        phrase: bytes = b"Status",
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.length = None
        self.headers = Headers()
        for name, value in (headers or {"Content-Type": "text/event-stream"}).items():
            self.headers.addRawHeader(name, value)
        self.pieces = [p for p in ([pieces] if isinstance(pieces, bytes) else pieces) if p]
        self._end = end
        self.protocol: IProtocol | None = None
        self.transport = FakeTransport(self)
        self.ended = False

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        for piece in self.pieces:
            if self.ended:
                return
            self.send(piece)
        if self._end is True:
            self.end()
        elif isinstance(self._end, Failure):
            self.end(self._end)

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        if not self.ended:
            self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        if self.ended or self.protocol is None:
            return
        self.ended = True
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


@dataclass
class SentRequest:
    """One request the client made."""

    method: str
    url: str
    headers: Headers
    data: bytes
    deferred: Deferred[Any]

    @property
    def body(self) -> Any:
        return json.loads(self.data)


@dataclass
class FakeHTTP:
    """A treq-like client answering from a queue of outcomes: a FakeResponse, an exception, HANG (a
    request that never gets its headers, cancellable) or a :class:`Hang`."""

    outcomes: deque[Any] = field(default_factory=deque)
    sent: list[SentRequest] = field(default_factory=list)
    cancelled: int = 0

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = deque(outcomes)
        self.sent = []
        self.cancelled = 0

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers | None = None,
        data: bytes | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]:
        assert unbuffered, "the client must stream the body"
        outcome = self.outcomes.popleft()
        if isinstance(outcome, Hang) or outcome == HANG:
            error = outcome.error if isinstance(outcome, Hang) else None

            def cancel(pending: Deferred[Any]) -> None:
                self.cancelled += 1
                if error is not None:
                    pending.errback(error)

            deferred: Deferred[Any] = Deferred(cancel)
        elif isinstance(outcome, BaseException):
            deferred = fail(outcome)
        else:
            deferred = succeed(outcome)
        self.sent.append(SentRequest(method, url, headers or Headers(), data or b"", deferred))
        return deferred
