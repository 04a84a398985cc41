"""Event streams of chat turns: kept from the start, read by any number of subscribers, then removed.

A turn writes its events to a :class:`Stream` whether or not anyone listens, so a stream nobody reads never
blocks or leaks the turn. A subscriber that connects late, or reconnects, first gets every event so far.
Once the turn ends the stream stays for ``keep_seconds`` and is then removed from the registry.

:class:`ReferencePresenter` is the reference API's presentation of a turn: its ``StreamMessage`` kinds and
its wording of progress notices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from aichat.chat import events as turn
from aichat.llm.tools import Failed

Subscriber = Callable[["Event"], None]

TERMINAL = frozenset({"done", "error"})


@dataclass(frozen=True)
class Event:
    """One chat event: the reference's ``StreamMessage``.

    ``synthetic`` marks progress notices we add ourselves (never sent as a field): non-streaming responses
    leave them out of the assistant's text.
    """

    type: str
    session_id: str
    content: str = ""
    error: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_executions: list[dict[str, Any]] | None = None
    request_id: str = ""
    synthetic: bool = False

    def to_json(self) -> dict[str, Any]:
        """The wire JSON: ``type`` and ``session_id`` always, everything else only when set."""
        out: dict[str, Any] = {"type": self.type, "session_id": self.session_id}
        if self.content:
            out["content"] = self.content
        if self.error:
            out["error"] = self.error
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_executions:
            out["tool_executions"] = self.tool_executions
        if self.request_id:
            out["request_id"] = self.request_id
        return out


@dataclass
class Stream:
    """The events of one turn so far, and who is listening."""

    id: str
    user_id: str
    session_id: str
    created_at: float
    events: list[Event] = field(default_factory=list)
    subscribers: list[Subscriber] = field(default_factory=list)
    ended: bool = False

    def emit(self, event: Event) -> None:
        """Record ``event`` and pass it to every subscriber; events after a terminal one are ignored."""
        if self.ended:
            return
        self.events.append(event)
        if event.type in TERMINAL:
            self.ended = True
        for subscriber in list(self.subscribers):
            subscriber(event)
        if self.ended:
            self.subscribers.clear()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Replay every event so far to ``subscriber``, then follow; returns an unsubscribe function."""
        for event in list(self.events):
            subscriber(event)
        if not self.ended:
            self.subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self.subscribers:
                self.subscribers.remove(subscriber)

        return unsubscribe


class StreamError(Exception):
    """A stream lookup failed (unknown, expired, or another user's: all look the same)."""


class StreamRegistry:
    """Streams by id; each is removed ``keep_seconds`` after it ends."""

    def __init__(self, clock: IReactorTime, keep_seconds: float) -> None:
        self._clock = clock
        self._keep = keep_seconds
        self._streams: dict[str, Stream] = {}
        self._timers: dict[str, IDelayedCall] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def create(self, stream_id: str, user_id: str, session_id: str) -> Stream:
        """Register a new stream and arrange its removal once it ends."""
        stream = Stream(stream_id, user_id, session_id, self._clock.seconds())
        self._streams[stream_id] = stream

        def on_event(event: Event) -> None:
            if event.type in TERMINAL:
                self._timers[stream_id] = self._clock.callLater(self._keep, self._remove, stream_id)

        stream.subscribers.append(on_event)
        return stream

    def find(self, stream_id: str) -> Stream | None:
        """The stream ``stream_id`` if this registry holds it, whoever it belongs to."""
        return self._streams.get(stream_id)

    def get(self, stream_id: str, user_id: str) -> Stream:
        """The stream if it exists and belongs to ``user_id``."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.user_id != user_id:
            raise StreamError(f"stream not found: {stream_id}")
        return stream

    def _remove(self, stream_id: str) -> None:
        self._timers.pop(stream_id, None)
        self._streams.pop(stream_id, None)

    def close(self) -> None:
        """Cancel every removal timer and forget every stream."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._streams.clear()


PROCESSING = "\n🤖 Processing results...\n\n"
UNDERSTANDING = "\n🤖 Understanding your decision...\n\n"
DENIED = "❌ Tool execution was denied by user."


class ReferencePresenter:
    """Writes a turn's events to a :class:`Stream` as the reference's ``StreamMessage`` events (through
    ``emit``, a :class:`~aichat.chat.coalesce.DeltaCoalescer` say, when given)."""

    def __init__(self, stream: Stream, emit: Callable[[Event], None] | None = None) -> None:
        self.stream = stream
        self._emit = emit or stream.emit

    def __call__(self, event: turn.TurnEvent) -> None:
        emit = self._emit
        session_id = self.stream.session_id
        if isinstance(event, turn.TextDelta):
            emit(Event("message", session_id, content=event.text))
        elif isinstance(event, turn.ToolsFinished):
            executions = event.executions
            failed = sum(1 for e in executions if isinstance(e, Failed))
            outcome = "successful" if not failed else "failed" if failed == len(executions) else "partially failed"
            emit(
                Event(
                    "tool_execution",
                    session_id,
                    content=f"Executed {len(executions)} tool(s) ({outcome})",
                    tool_executions=[e.to_json() for e in executions],
                    synthetic=True,
                )
            )
        elif isinstance(event, turn.Continuing):
            if event.denied:
                emit(Event("message", session_id, content=DENIED, synthetic=True))
                emit(Event("message", session_id, content=UNDERSTANDING, synthetic=True))
            else:
                emit(Event("message", session_id, content=PROCESSING, synthetic=True))
        elif isinstance(event, turn.RoundLimit):
            emit(Event("message", session_id, content=event.notice))
        elif isinstance(event, turn.ApprovalRequested):
            calls = event.approval.tool_calls
            emit(
                Event(
                    "tool_approval_request",
                    session_id,
                    content=f"🔧 The assistant wants to execute {len(calls)} tool(s). Do you approve?",
                    tool_calls=calls,
                    request_id=event.approval.id,
                    synthetic=True,
                )
            )
        elif isinstance(event, turn.Finished):
            emit(Event("done", session_id))
        elif isinstance(event, turn.Failed):
            emit(Event("error", session_id, error=event.result.error or ""))
