"""Reading a response body as it arrives: each chunk handed on, the read abortable, the size capped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss


class BodyTooLarge(Exception):
    """A response body grew past the configured cap."""


class BodyReader(Protocol):
    """Hand each chunk of a response body to ``on_data``; fire ``finished`` when the body ends or fails.

    An exception raised by ``on_data`` fails the read and drops the connection. Cancelling ``finished``
    fails it with :class:`CancelledError` and drops the connection.
    """

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.finished: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, finished: Deferred[None]) -> None:
        # Fail first: closing may report the lost connection synchronously.
        finished.errback(Failure(CancelledError()))
        self.close()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        try:
            self._on_data(data)
        except Exception:
            self.fail(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def close(self) -> None:
        """Drop the connection (it cannot go back to the pool half read)."""
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def abort(self) -> None:
        """Stop reading without settling ``finished`` otherwise than as the lost connection says."""
        if not self.finished.called:
            self.finished.errback(Failure(CancelledError()))
        self.close()

    def succeed(self) -> None:
        """End the read early with success, closing the connection."""
        if not self.finished.called:
            self.finished.callback(None)
        self.close()

    def fail(self, failure: Failure | BaseException) -> None:
        """End the read with ``failure``, closing the connection."""
        if not self.finished.called:
            self.finished.errback(failure if isinstance(failure, Failure) else Failure(failure))
        self.close()


def read_stream(response: Any, on_data: Callable[[bytes], None]) -> BodyReader:
    """Start delivering ``response``'s body to ``on_data``; the reader's ``finished`` says how it ended."""
    reader = BodyReader(on_data)
    response.deliverBody(reader)
    return reader


async def read_body(response: Any, limit: int) -> bytes:
    """The whole body of ``response``; :class:`BodyTooLarge` (and the connection dropped) past ``limit``."""
    parts: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge(f"response body exceeds {limit} bytes")
        parts.append(data)

    await read_stream(response, collect).finished
    return b"".join(parts)
