"""The live side of many instances: this instance's turns (claimed, published, their leases renewed),
mirrors of streams run elsewhere, and the takeover of turns whose instance died.

* A turn is *claimed* before it starts: a row in the turn log, refused while its session has a live turn
  on any instance (409). Its instance renews the lease every third of ``lease_seconds``; the row says it
  expires two thirds of ``lease_seconds`` after a renewal, so one missed renewal is forgiven and a dead
  instance's turn is taken over within ``lease_seconds``. A turn whose lease another instance took is
  cancelled here (it never runs twice).
* A claimed turn's stream is *published*: its events are appended to the log in order, the last one
  ending the turn. At most :data:`MAX_WRITES` writes are in flight for the whole instance, and a turn is
  in one of them at most (so its events commit in order): what every turn adds meanwhile goes in the next
  one (group commit), so writes never queue for connections, and a turn's event does not wait behind a
  write that holds only other turns' events.
* A stream read here but run elsewhere is a *mirror*: a local :class:`~aichat.chat.streams.Stream` fed
  from the log when a notification names it, and on every catch-up tick (so a lost notification only
  adds latency). At most :data:`MAX_READS` reads in flight for all mirrors, a mirror in one of them at
  most: under load, reads batch by themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aichat.chat.streams import TERMINAL, Event, Stream, StreamRegistry
from aichat.cluster.log import EVENTS_CHANNEL, LoggedEvent, TurnLog

log = Logger(namespace="aichat.cluster")

#: Longest pause between catch-up reads of mirrors (and checks for expired leases).
CATCH_UP_SECONDS = 1.0
#: Pause before a failed write of events is tried again.
RETRY_SECONDS = 0.5
#: Longest wait of a turn for its last events to be written (the database may be down).
SETTLE_SECONDS = 5.0
#: Writes of events in flight at once for the instance (each holding a turn's events at most once).
MAX_WRITES = 2
#: Reads of other instances' events in flight at once (each reading a mirror at most once).
MAX_READS = 2
#: Catch-up ticks between two sweeps of turns ended more than ``keep_seconds`` ago.
SWEEP_TICKS = 60


@dataclass
class _Owned:
    """A turn this instance runs: what was written of its stream, what waits, how to stop it."""

    turn_id: str
    cancel: Callable[[], None]
    queue: list[Event] = field(default_factory=list)
    written: int = 0
    final: bool = False
    #: The terminal event and its stream, shown here once it is written.
    end: tuple[Stream, Event] | None = None
    #: Waiting for the turn's end to be written.
    waiters: list[Deferred[None]] = field(default_factory=list)


class Coordinator:
    """This instance's part in the cluster, over a :class:`~aichat.cluster.log.TurnLog`."""

    def __init__(
        self,
        clock: IReactorTime,
        turn_log: TurnLog,
        streams: StreamRegistry,
        *,
        lease_seconds: float,
        keep_seconds: float,
    ) -> None:
        self._clock = clock
        self.log = turn_log
        self._streams = streams
        self.lease_seconds = lease_seconds
        self._keep = keep_seconds
        self._owned: dict[str, _Owned] = {}
        self._mirrors: dict[str, Stream] = {}
        self._dirty: set[str] = set()
        #: Reads under way, and the mirrors they read.
        self._reads = 0
        self._being_read: set[str] = set()
        #: Writes under way, and the turns whose events they hold.
        self._in_flight = 0
        self._busy: set[str] = set()
        #: A write failed: the next one waits for the retry timer.
        self._backoff = False
        self._taking_over = False
        self._ticks = 0
        self._timers: set[IDelayedCall] = set()
        self._idle: list[Deferred[None]] = []
        self._renew = LoopingCall(self._renew_leases)
        self._renew.clock = clock
        self._tick = LoopingCall(self._catch_up)
        self._tick.clock = clock

    @property
    def instance(self) -> str:
        return self.log.instance

    def start(self) -> None:
        self._renew.start(self.lease_seconds / 3, now=False)
        self._tick.start(min(CATCH_UP_SECONDS, self.lease_seconds / 6), now=False)

    async def stop(self) -> None:
        """Wait for the events still being written (turns were stopped before), then stop every timer."""
        if self._writing():
            waiter: Deferred[None] = Deferred()
            self._idle.append(waiter)

            def give_up() -> None:
                if waiter in self._idle:
                    self._idle.remove(waiter)
                    log.warn("Stopping with events of {count} turns not written", count=len(self._owned))
                    waiter.callback(None)

            timeout = self._clock.callLater(RETRY_SECONDS * 4, give_up)
            try:
                await waiter
            finally:
                if timeout.active():
                    timeout.cancel()
        for loop in (self._renew, self._tick):
            if loop.running:
                loop.stop()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._mirrors.clear()
        for owned in self._owned.values():
            self._show_end(owned)

    # -- turns run here -----------------------------------------------------------------------------

    async def claim(self, turn_id: str, session_id: str, user_id: str, cancel: Callable[[], None]) -> bool:
        """Record the turn as this instance's; ``False`` when its session is busy on some instance."""
        if not await self.log.claim(turn_id, session_id, user_id, self.lease_seconds * 2 / 3):
            return False
        self._owned[turn_id] = _Owned(turn_id, cancel)
        return True

    def release(self, turn_id: str) -> None:
        """A claimed turn that publishes no stream ended: end its row."""
        owned = self._owned.get(turn_id)
        if owned is not None and not owned.final:
            owned.final = True
            self._write()

    def settled(self, turn_id: str) -> Deferred[None]:
        """Fires once the end of this instance's turn ``turn_id`` is written (at most ``SETTLE_SECONDS``):
        then every instance sees the session free."""
        done: Deferred[None] = Deferred()
        owned = self._owned.get(turn_id)
        if owned is None:
            done.callback(None)
            return done
        owned.waiters.append(done)

        def give_up() -> None:
            if done in owned.waiters:
                owned.waiters.remove(done)
                self._show_end(owned)
                done.callback(None)

        timer = self._clock.callLater(SETTLE_SECONDS, give_up)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        done.addCallback(stop_timer)
        return done

    def emitter(self, turn_id: str, stream: Stream) -> Callable[[Event], None]:
        """Where a turn's presenter sends its events: into ``stream`` and, once the turn is claimed, the log.

        The terminal event reaches this instance's readers only once it is in the log (with the turn's
        end), so a client that starts the next turn as soon as it reads ``done`` finds the session free on
        every instance.
        """

        def emit(event: Event) -> None:
            owned = self._owned.get(turn_id)
            if owned is None or owned.final:
                stream.emit(event)
                return
            owned.queue.append(event)
            if event.type in TERMINAL:
                owned.final = True
                owned.end = (stream, event)
            else:
                stream.emit(event)
            self._write()

        return emit

    def _show_end(self, owned: _Owned) -> None:
        if owned.end is not None:
            (stream, event), owned.end = owned.end, None
            stream.emit(event)

    def _writing(self) -> bool:
        return self._in_flight > 0 or any(owned.queue or owned.final for owned in self._owned.values())

    def _write(self) -> None:
        """Write what every turn not already being written has queued, in one transaction; a few writes in
        flight for the instance, so under load each carries more (group commit) instead of queueing for
        connections."""
        if self._in_flight >= MAX_WRITES or self._backoff:
            return
        batch = [
            (owned, owned.queue, owned.final)
            for owned in self._owned.values()
            if (owned.queue or owned.final) and owned.turn_id not in self._busy
        ]
        if not batch:
            return
        for owned, _, _ in batch:
            owned.queue = []
            self._busy.add(owned.turn_id)
        self._in_flight += 1
        appended = Deferred.fromCoroutine(
            self.log.append([(owned.turn_id, owned.written + 1, events, final) for owned, events, final in batch])
        )

        def written(_: object) -> None:
            for owned, events, final in batch:
                owned.written += len(events)
                if final:
                    self._owned.pop(owned.turn_id, None)
                    self._show_end(owned)
                    waiters, owned.waiters = owned.waiters, []
                    for waiter in waiters:
                        waiter.callback(None)

        def failed(failure: Any) -> None:
            log.warn("Writing turn events failed: {error}; trying again", error=failure.getErrorMessage())
            for owned, events, _ in batch:
                owned.queue[:0] = events
            self._backoff = True
            self._later(RETRY_SECONDS, self._retry)

        def settle(_: object) -> None:
            self._in_flight -= 1
            self._busy.difference_update(owned.turn_id for owned, _, _ in batch)
            self._write()
            if not self._writing():
                idle, self._idle = self._idle, []
                for waiter in idle:
                    waiter.callback(None)

        appended.addCallbacks(written, failed).addBoth(settle)

    def _retry(self) -> None:
        self._backoff = False
        self._write()

    def _later(self, seconds: float, function: Callable[..., None], *args: Any) -> None:
        timer: IDelayedCall | None = None

        def fire() -> None:
            if timer is not None:
                self._timers.discard(timer)
            function(*args)

        timer = self._clock.callLater(seconds, fire)
        self._timers.add(timer)

    async def _renew_leases(self) -> None:
        ids = [turn_id for turn_id, owned in self._owned.items() if not owned.final]
        if not ids:
            return
        try:
            held = await self.log.renew(ids, self.lease_seconds * 2 / 3)
        except Exception as e:
            log.warn("Renewing turn leases failed: {error}", error=str(e))
            return
        for turn_id in ids:
            owned = self._owned.get(turn_id)
            if turn_id not in held and owned is not None and not owned.final:
                log.error("Turn {turn_id} was taken over by another instance: stopping it here", turn_id=turn_id)
                self._owned.pop(turn_id, None)
                owned.cancel()

    # -- turns run elsewhere ------------------------------------------------------------------------

    async def follow(self, stream_id: str, user_id: str) -> Stream | None:
        """A local mirror of the stream ``stream_id`` run on another instance, or ``None`` if there is
        none for ``user_id`` (unknown, another user's, or ended more than ``keep_seconds`` ago)."""
        record = await self.log.lookup(stream_id)
        if record is None or record.user_id != user_id:
            return None
        if record.ended_seconds_ago is not None and record.ended_seconds_ago > self._keep:
            return None
        existing = self._streams.find(stream_id)
        if existing is not None:
            return existing
        stream = self._streams.create(stream_id, user_id, record.session_id)
        self._mirrors[stream_id] = stream
        self.wake(stream_id)
        return stream

    def notified(self, channel: str, payload: str) -> None:
        """A notification from the listener thread (delivered on the reactor)."""
        if channel == EVENTS_CHANNEL:
            for turn_id in payload.split():
                self.wake(turn_id)

    def reconnected(self) -> None:
        """The listener listens (again): read what may have been missed meanwhile."""
        self._dirty.update(self._mirrors)
        self._read()

    def wake(self, turn_id: str) -> None:
        if turn_id in self._mirrors:
            self._dirty.add(turn_id)
            self._read()

    def _read(self) -> None:
        """Read the new events of the dirty mirrors not already being read; a few reads in flight."""
        if self._reads >= MAX_READS:
            return
        after = {
            turn_id: len(self._mirrors[turn_id].events)
            for turn_id in self._dirty
            if turn_id in self._mirrors and turn_id not in self._being_read
        }
        self._dirty.difference_update(after)
        self._dirty.intersection_update(self._mirrors)
        if not after:
            return
        self._reads += 1
        self._being_read.update(after)
        reading = Deferred.fromCoroutine(self.log.read(after))

        def failed(failure: Any) -> None:
            log.warn("Reading other instances' events failed: {error}", error=failure.getErrorMessage())

        def settle(_: object) -> None:
            self._reads -= 1
            self._being_read.difference_update(after)
            if self._dirty:
                self._read()

        reading.addCallbacks(self._deliver, failed).addBoth(settle)

    def _deliver(self, found: list[LoggedEvent]) -> None:
        for logged in found:
            stream = self._mirrors.get(logged.turn_id)
            if stream is None or logged.seq != len(stream.events) + 1:
                continue
            stream.emit(logged.event)
            if stream.ended:
                del self._mirrors[logged.turn_id]

    async def _catch_up(self) -> None:
        self._dirty.update(self._mirrors)
        self._read()
        self._ticks += 1
        if self._taking_over:
            return
        self._taking_over = True
        try:
            taken = await self.log.take_over()
            for turn_id in taken:
                log.warn("Ended turn {turn_id}: its instance stopped renewing its lease", turn_id=turn_id)
                self.wake(turn_id)
            if self._ticks % SWEEP_TICKS == 0:
                await self.log.sweep(self._keep)
        except Exception as e:
            log.warn("Checking for expired turn leases failed: {error}", error=str(e))
        finally:
            self._taking_over = False
