"""Text deltas merged into batches of a few tens of milliseconds, to bound a turn's rows and notifications.

The first delta after a quiet spell goes out at once (no added time to first token); deltas arriving
within ``window`` seconds of the last one sent are held and sent together when the window closes. Any
other event first sends the held text, so order is kept and every character arrives.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from aichat.chat.streams import Event


class DeltaCoalescer:
    """Passes events to ``emit``, merging consecutive real text deltas (``message``, not synthetic)."""

    def __init__(self, clock: IReactorTime, window: float, emit: Callable[[Event], None]) -> None:
        self._clock = clock
        self._window = window
        self._emit = emit
        self._held: list[Event] = []
        self._timer: IDelayedCall | None = None

    def __call__(self, event: Event) -> None:
        if event.type == "message" and not event.synthetic:
            if self._timer is None:
                self._emit(event)
                self._timer = self._clock.callLater(self._window, self._close_window)
            else:
                self._held.append(event)
            return
        self.flush()
        self._emit(event)

    def flush(self) -> None:
        """Send held text now and forget the window."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._send_held()

    def _send_held(self) -> None:
        if self._held:
            held, self._held = self._held, []
            first = held[0]
            self._emit(Event("message", first.session_id, content="".join(e.content for e in held)))

    def _close_window(self) -> None:
        self._timer = None
        if self._held:
            self._send_held()
            self._timer = self._clock.callLater(self._window, self._close_window)
