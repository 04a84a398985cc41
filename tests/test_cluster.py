"""The pieces of many instances on a ``Clock``: delta coalescing, the coordinator's leases, publishing,
mirrors and takeover over an in-memory turn log; and the PostgreSQL turn log itself on the test cluster
(claims, order, exactly-once takeover keeping the partial reply)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from aichat.chat.coalesce import DeltaCoalescer
from aichat.chat.streams import Event, StreamRegistry
from aichat.cluster.coordinator import Coordinator
from aichat.cluster.log import LEASE_LOST, READ, LoggedEvent, PostgresTurnLog, TurnRecord, partial_reply
from aichat.store.base import Message, new_id
from tests.support import inline_pg_store
from tests.test_store import run

# -- coalescing ------------------------------------------------------------------------------------


def test_first_delta_goes_at_once_and_later_ones_share_a_window() -> None:
    """The first delta is not delayed; deltas inside the window go out together when it closes; any other
    event sends the held text first; every character arrives in order and no timer is left."""
    clock = Clock()
    out: list[Event] = []
    batch = DeltaCoalescer(clock, 0.02, out.append)
    for text in ("He", "l", "lo"):
        batch(Event("message", "s", content=text))
    assert [e.content for e in out] == ["He"]
    clock.advance(0.02)
    assert [e.content for e in out] == ["He", "llo"]
    batch(Event("message", "s", content=" wor"))
    batch(Event("message", "s", content="ld"))
    batch(Event("message", "s", content="…", synthetic=True))
    batch(Event("done", "s"))
    assert [(e.type, e.content) for e in out] == [
        ("message", "He"), ("message", "llo"), ("message", " world"), ("message", "…"), ("done", ""),
    ]
    assert clock.getDelayedCalls() == []


def test_a_quiet_spell_reopens_the_window() -> None:
    """After a window closes with nothing held, the next delta again goes at once."""
    clock = Clock()
    out: list[Event] = []
    batch = DeltaCoalescer(clock, 0.02, out.append)
    batch(Event("message", "s", content="a"))
    clock.advance(0.05)
    batch(Event("message", "s", content="b"))
    assert [e.content for e in out] == ["a", "b"]
    batch.flush()
    assert clock.getDelayedCalls() == []


# -- the coordinator over an in-memory log ----------------------------------------------------------


class MemoryLog:
    """A :class:`~aichat.cluster.log.TurnLog` in memory, shared by coordinators like a database; calls
    are held (``hold``) to test what happens while one is under way."""

    def __init__(self, shared: dict[str, Any] | None = None, instance: str = "i1") -> None:
        self.instance = instance
        self.shared: dict[str, Any] = shared if shared is not None else {"turns": {}, "events": {}, "now": 0.0}
        self.reads = 0
        self.renewals: list[list[str]] = []
        self.stolen: set[str] = set()
        self.fail_appends = 0

    @property
    def turns(self) -> dict[str, dict[str, Any]]:
        turns: dict[str, dict[str, Any]] = self.shared["turns"]
        return turns

    @property
    def events(self) -> dict[str, list[Event]]:
        events: dict[str, list[Event]] = self.shared["events"]
        return events

    async def claim(self, turn_id: str, session_id: str, user_id: str, lease_seconds: float) -> bool:
        if any(t["session"] == session_id and t["ended"] is None for t in self.turns.values()):
            return False
        self.turns[turn_id] = {"session": session_id, "user": user_id, "owner": self.instance, "ended": None}
        self.events[turn_id] = []
        return True

    async def append(self, batches: Sequence[tuple[str, int, Sequence[Event], bool]]) -> None:
        if self.fail_appends:
            self.fail_appends -= 1
            raise RuntimeError("database down")
        for turn_id, first_seq, events, final in batches:
            log = self.events[turn_id]
            for n, event in enumerate(events):
                if first_seq + n == len(log) + 1:
                    log.append(event)
            if final and self.turns[turn_id]["ended"] is None:
                self.turns[turn_id]["ended"] = self.shared["now"]

    async def read(self, after: dict[str, int]) -> list[LoggedEvent]:
        self.reads += 1
        return [
            LoggedEvent(turn_id, n + 1, event)
            for turn_id, last in after.items()
            for n, event in enumerate(self.events.get(turn_id, []))
            if n + 1 > last
        ]

    async def lookup(self, turn_id: str) -> TurnRecord | None:
        turn = self.turns.get(turn_id)
        if turn is None:
            return None
        ended = None if turn["ended"] is None else self.shared["now"] - turn["ended"]
        return TurnRecord(turn_id, turn["user"], turn["session"], ended)

    async def renew(self, turn_ids: Sequence[str], lease_seconds: float) -> set[str]:
        self.renewals.append(list(turn_ids))
        return {t for t in turn_ids if t not in self.stolen}

    async def take_over(self) -> list[str]:
        taken = [t for t, turn in self.turns.items() if turn["ended"] is None and turn.get("expired")]
        for turn_id in taken:
            self.turns[turn_id]["ended"] = self.shared["now"]
            self.events[turn_id].append(Event("error", self.turns[turn_id]["session"], error=LEASE_LOST))
        return taken

    async def sweep(self, keep_seconds: float) -> int:
        return 0


def coordinator(clock: Clock, log: MemoryLog, lease: float = 9.0) -> tuple[Coordinator, StreamRegistry]:
    streams = StreamRegistry(clock, 60)
    running = Coordinator(clock, log, streams, lease_seconds=lease, keep_seconds=60)
    running.start()
    return running, streams


def test_a_claimed_turn_publishes_in_order_and_its_lease_is_renewed_until_it_ends() -> None:
    """Claiming refuses a second live turn of the session; the stream's events reach the log in order
    (a failed write is tried again), the lease is renewed every third of it while the turn runs and no
    longer once it ended; after stop no timer is left."""
    clock = Clock()
    log = MemoryLog()
    running, streams = coordinator(clock, log)
    cancelled: list[str] = []
    assert run(running.claim("t1", "s1", "u", lambda: cancelled.append("t1")))
    assert not run(running.claim("t2", "s1", "u", lambda: None))
    stream = streams.create("t1", "u", "s1")
    emit = running.emitter("t1", stream)
    log.fail_appends = 1
    emit(Event("message", "s1", content="a"))
    assert log.events["t1"] == [] and [e.content for e in stream.events] == ["a"]
    clock.advance(0.5)
    emit(Event("message", "s1", content="b"))
    assert [e.content for e in log.events["t1"]] == ["a", "b"]
    clock.advance(3.0)
    assert log.renewals == [["t1"]]
    ended = running.settled("t1")
    log.fail_appends = 1
    emit(Event("done", "s1"))
    assert not stream.ended  # this instance's readers see the end only once it is in the log
    clock.advance(0.5)
    assert ended.called and stream.ended
    assert [e.type for e in log.events["t1"]] == ["message", "message", "done"]
    assert log.turns["t1"]["ended"] is not None
    clock.advance(6.0)
    assert log.renewals == [["t1"]]
    assert run(running.claim("t3", "s1", "u", lambda: None))
    assert cancelled == []
    run(running.stop())
    streams.close()
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_a_turn_whose_lease_was_taken_is_stopped_here() -> None:
    """When a renewal finds the lease gone (another instance took the turn), the turn is cancelled here."""
    clock = Clock()
    log = MemoryLog()
    running, _ = coordinator(clock, log, lease=3.0)
    cancelled: list[str] = []
    assert run(running.claim("t1", "s1", "u", lambda: cancelled.append("t1")))
    log.stolen.add("t1")
    clock.advance(1.0)
    assert cancelled == ["t1"]
    run(running.stop())


def test_a_mirror_follows_another_instance_by_notification_or_catch_up() -> None:
    """A stream run by another instance is mirrored here: a notification delivers new events at once; a
    lost notification is made up by the catch-up tick; the end of the turn ends the mirror; another user or
    an unknown stream gets nothing."""
    clock = Clock()
    shared: dict[str, Any] = {"turns": {}, "events": {}, "now": 0.0}
    owner_log, reader_log = MemoryLog(shared, "owner"), MemoryLog(shared, "reader")
    owner, owner_streams = coordinator(clock, owner_log)
    reader, _ = coordinator(clock, reader_log)
    run(owner.claim("t1", "s1", "u", lambda: None))
    stream = owner_streams.create("t1", "u", "s1")
    emit = owner.emitter("t1", stream)
    emit(Event("message", "s1", content="a"))
    assert run(reader.follow("t1", "other")) is None
    assert run(reader.follow("nope", "u")) is None
    mirror = run(reader.follow("t1", "u"))
    assert mirror is not None and [e.content for e in mirror.events] == ["a"]
    emit(Event("message", "s1", content="b"))
    reader.notified("aichat_turn_events", "t0 t1")
    assert [e.content for e in mirror.events] == ["a", "b"]
    emit(Event("message", "s1", content="c"))  # its notification is lost
    assert len(mirror.events) == 2
    clock.advance(1.0)
    assert [e.content for e in mirror.events] == ["a", "b", "c"]
    emit(Event("done", "s1"))
    clock.advance(1.0)
    assert mirror.ended and mirror.events[-1].type == "done"
    reads = reader_log.reads
    clock.advance(5.0)
    assert reader_log.reads == reads  # an ended mirror is not read again
    run(owner.stop())
    run(reader.stop())


def test_an_expired_turn_is_ended_for_the_readers_of_its_mirror() -> None:
    """The catch-up tick takes over an expired turn and its mirror here gets the ``error`` at once."""
    clock = Clock()
    log = MemoryLog()
    running, _ = coordinator(clock, log)
    log.turns["t9"] = {"session": "s9", "user": "u", "owner": "dead", "ended": None}
    log.events["t9"] = [Event("message", "s9", content="half")]
    mirror = run(running.follow("t9", "u"))
    assert mirror is not None and [e.type for e in mirror.events] == ["message"]
    log.turns["t9"]["expired"] = True
    clock.advance(1.0)
    assert [e.type for e in mirror.events] == ["message", "error"]
    assert mirror.events[-1].error == LEASE_LOST
    run(running.stop())


def test_partial_reply_is_the_text_of_the_round_under_way() -> None:
    """The partial reply is the real text after the last tool event, without our own notices."""
    events = [
        Event("message", "s", content="Let me look. "),
        Event("tool_execution", "s", synthetic=True),
        Event("message", "s", content="\n🤖 Processing results...\n\n", synthetic=True),
        Event("message", "s", content="Found "),
        Event("message", "s", content="it"),
    ]
    assert partial_reply(events) == "Found it"
    assert partial_reply(events[:2]) == ""


# -- the PostgreSQL turn log -------------------------------------------------------------------------


@pytest.fixture
def pg_log(pg_url: str) -> Any:
    store: Any = inline_pg_store(pg_url, cache_bytes=0)  # as the daemon runs on PostgreSQL
    yield store, PostgresTurnLog(store.transact, "instance-1")
    run(store.close())


def test_postgres_log_claims_orders_and_resumes(pg_log: Any) -> None:
    """One live turn per session; events come back in order after any place, a repeated append is harmless,
    the final one ends the turn (then the session takes a new one); renewals hold only this instance's
    unended turns; ended turns are swept after the keep time."""
    store, log = pg_log
    assert run(log.claim("t1", "s1", "u1", 5))
    assert not run(log.claim("t2", "s1", "u1", 5))
    assert run(log.claim("t3", "s2", "u1", 5))
    events = [Event("message", "s1", content=str(n)) for n in range(5)]
    run(log.append([("t1", 1, events[:2], False)]))
    run(log.append([("t1", 1, events[:2], False), ("t3", 1, [Event("message", "s2", content="x")], False)]))
    run(log.append([("t1", 3, [*events[2:], Event("done", "s1")], True)]))
    found = run(log.read({"t1": 0, "t3": 0}))
    assert [(e.turn_id, e.seq, e.event.type, e.event.content) for e in found] == [
        ("t1", n + 1, "message", str(n)) for n in range(5)
    ] + [("t1", 6, "done", ""), ("t3", 1, "message", "x")]
    assert [e.seq for e in run(log.read({"t1": 4}))] == [5, 6]
    record = run(log.lookup("t1"))
    assert record.user_id == "u1" and record.session_id == "s1" and record.ended_seconds_ago is not None
    assert run(log.lookup("t3")).ended_seconds_ago is None
    assert run(log.claim("t4", "s1", "u1", 5))
    other = PostgresTurnLog(store.transact, "instance-2")
    assert run(other.renew(["t3", "t4"], 5)) == set()
    assert run(log.renew(["t1", "t3", "t4"], 5)) == {"t3", "t4"}
    assert run(log.sweep(3600)) == 0
    assert run(log.sweep(0)) == 1
    assert run(log.lookup("t1")) is None


def test_postgres_takeover_is_exactly_once_and_keeps_the_partial_reply(pg_log: Any, pg_url: str) -> None:
    """Two instances taking over at the same moment: one ends the expired turn (an ``error`` event after
    the others, the partial reply stored as an assistant message after the user's), the other gets nothing;
    a live lease is left alone."""
    store, log = pg_log
    session = run(store.create_session("u1", "t"))
    run(store.add_message(Message(new_id("user"), session.id, "user", "tell me")))
    assert run(log.claim("dying", session.id, "u1", 0.001))
    run(log.append([("dying", 1, [Event("message", session.id, content="Once upon "),
                                  Event("message", session.id, content="a time")], False)]))
    assert run(log.claim("alive", "elsewhere", "u1", 60))
    others: list[Any] = [inline_pg_store(pg_url) for _ in range(2)]
    logs = [PostgresTurnLog(s.transact, f"taker-{n}") for n, s in enumerate(others)]
    taken: list[list[str]] = []
    barrier = threading.Barrier(2)

    def take(turn_log: PostgresTurnLog) -> None:
        barrier.wait()
        taken.append(run(turn_log.take_over()))

    threads = [threading.Thread(target=take, args=(turn_log,)) for turn_log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(taken) == [[], ["dying"]]
    found = run(log.read({"dying": 0, "alive": 0}))
    assert [(e.seq, e.event.type) for e in found] == [(1, "message"), (2, "message"), (3, "error")]
    assert found[-1].event.error == LEASE_LOST
    history = run(store.history(session.id))
    assert [(m.role, m.content) for m in history] == [("user", "tell me"), ("assistant", "Once upon a time")]
    assert run(logs[0].take_over()) == []
    with psycopg.connect(pg_url) as connection:
        rows = connection.execute("SELECT id FROM chat_turns WHERE ended_at IS NULL").fetchall()
    assert rows == [("alive",)]
    for other in others:
        run(other.close())


def test_reading_new_events_does_not_scan_the_whole_log(pg_log: Any) -> None:
    """With many turns kept (as for ``stream_keep_seconds``) and the table's statistics current, reading
    the new events of a hundred mirrors is a range scan per turn, never a scan of every turn's events."""
    store, log = pg_log
    turns = [f"t{n}" for n in range(400)]
    for first in range(0, len(turns), 100):
        chunk = turns[first : first + 100]
        for turn_id in chunk:
            assert run(log.claim(turn_id, f"s-{turn_id}", "u1", 60))
        events = [Event("message", "s", content=str(n)) for n in range(40)]
        run(log.append([(turn_id, 1, events, False) for turn_id in chunk]))

    def plan(txn: Any, sql: str, params: Any) -> str:
        txn.execute("ANALYZE turn_events")
        txn.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in txn.fetchall())

    reading = turns[::4]
    shown = run(store.transact(plan, READ, (reading, [38] * len(reading))))
    assert "turn_events" in shown and "Seq Scan on turn_events" not in shown, shown
    found = run(log.read(dict.fromkeys(reading, 38)))
    assert [(e.turn_id, e.seq) for e in found] == sorted((t, seq) for t in reading for seq in (39, 40))


def test_a_turn_waits_for_its_end_to_be_written() -> None:
    """``settled`` fires when the final write lands, or gives up after its bound if it never does."""
    clock = Clock()
    log = MemoryLog()
    running, streams = coordinator(clock, log)
    run(running.claim("t1", "s1", "u", lambda: None))
    log.fail_appends = 100
    stream = streams.create("t1", "u", "s1")
    emit = running.emitter("t1", stream)
    waiting: Deferred[None] = running.settled("t1")
    emit(Event("done", "s1"))
    assert not waiting.called and not stream.ended
    clock.advance(5.0)
    assert waiting.called and stream.ended
    log.fail_appends = 0
    clock.advance(0.5)
    assert log.turns["t1"]["ended"] is not None
    run(running.stop())


def test_stop_waits_a_bounded_time_for_unwritten_events() -> None:
    """Stopping waits for events still being written; if the log never takes them it stops after its bound,
    the local readers still get the end, and no timer is left."""
    clock = Clock()
    log = MemoryLog()
    running, streams = coordinator(clock, log)
    run(running.claim("t1", "s1", "u", lambda: None))
    stream = streams.create("t1", "u", "s1")
    log.fail_appends = 100
    running.emitter("t1", stream)(Event("error", "s1", error="stopping"))
    stopped = Deferred.fromCoroutine(running.stop())
    assert not stopped.called
    clock.advance(2.0)
    assert stopped.called and stream.ended
    streams.close()
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


class HeldLog(MemoryLog):
    """A memory log whose appends wait until the test releases them, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[list[tuple[str, int, int]], Deferred[None]]] = []

    async def append(self, batches: Sequence[tuple[str, int, Sequence[Event], bool]]) -> None:
        gate: Deferred[None] = Deferred()
        self.held.append(([(turn_id, first, len(events)) for turn_id, first, events, _ in batches], gate))
        await gate
        await super().append(batches)


def test_writes_overlap_across_turns_but_never_within_one() -> None:
    """While one write is under way, another turn's event goes in a second write at once; a turn already
    being written waits for its write to end, so its events commit in order; no third write starts."""
    clock = Clock()
    log = HeldLog()
    running, streams = coordinator(clock, log)
    emits = {}
    for turn in ("t1", "t2", "t3"):
        assert run(running.claim(turn, f"s-{turn}", "u", lambda: None))
        emits[turn] = running.emitter(turn, streams.create(turn, "u", f"s-{turn}"))
    emits["t1"](Event("message", "s-t1", content="a"))
    emits["t1"](Event("message", "s-t1", content="b"))
    emits["t2"](Event("message", "s-t2", content="c"))
    emits["t3"](Event("message", "s-t3", content="d"))
    assert [batches for batches, _ in log.held] == [[("t1", 1, 1)], [("t2", 1, 1)]]  # t3 waits: two in flight
    log.held[1][1].callback(None)  # the second write commits first: t3 goes next, t1 is still being written
    assert [batches for batches, _ in log.held[2:]] == [[("t3", 1, 1)]]
    log.held[0][1].callback(None)
    assert [batches for batches, _ in log.held[3:]] == [[("t1", 2, 1)]]
    for _, gate in log.held[2:]:
        gate.callback(None)
    assert len(log.held) == 4
    assert [e.content for e in log.events["t1"]] == ["a", "b"]
    assert [e.content for e in log.events["t2"]] == ["c"]
    assert [e.content for e in log.events["t3"]] == ["d"]
    run(running.stop())
    streams.close()


class HeldReads(MemoryLog):
    """A memory log whose reads wait until the test releases them."""

    def __init__(self, shared: dict[str, Any], instance: str) -> None:
        super().__init__(shared, instance)
        self.holding = False
        self.held: list[tuple[list[str], Deferred[None]]] = []

    async def read(self, after: dict[str, int]) -> list[LoggedEvent]:
        if self.holding:
            gate: Deferred[None] = Deferred()
            self.held.append((sorted(after), gate))
            await gate
        return await super().read(after)


def test_reads_overlap_across_mirrors_but_never_within_one() -> None:
    """While one mirror is being read, a notification for another starts a second read at once; the mirror
    already being read is read again only after its read ends, and gets every event once, in order."""
    clock = Clock()
    shared: dict[str, Any] = {"turns": {}, "events": {}, "now": 0.0}
    owner, owner_streams = coordinator(clock, MemoryLog(shared, "owner"))
    reader_log = HeldReads(shared, "reader")
    reader, _ = coordinator(clock, reader_log)
    emits, mirrors = {}, {}
    for turn in ("t1", "t2"):
        run(owner.claim(turn, f"s-{turn}", "u", lambda: None))
        emits[turn] = owner.emitter(turn, owner_streams.create(turn, "u", f"s-{turn}"))
        mirror = run(reader.follow(turn, "u"))
        assert mirror is not None
        mirrors[turn] = mirror
    reader_log.holding = True
    emits["t1"](Event("message", "s-t1", content="a"))
    reader.notified("aichat_turn_events", "t1")
    emits["t1"](Event("message", "s-t1", content="b"))
    reader.notified("aichat_turn_events", "t1")  # t1 is being read: it waits
    emits["t2"](Event("message", "s-t2", content="c"))
    reader.notified("aichat_turn_events", "t2")
    assert [turns for turns, _ in reader_log.held] == [["t1"], ["t2"]]
    reader_log.held[1][1].callback(None)
    assert [e.content for e in mirrors["t2"].events] == ["c"]
    reader_log.held[0][1].callback(None)  # the read of t1 ends: t1 is read again for what came meanwhile
    assert [turns for turns, _ in reader_log.held[2:]] == [["t1"]]
    reader_log.held[2][1].callback(None)
    assert [e.content for e in mirrors["t1"].events] == ["a", "b"]
    reader_log.holding = False
    run(owner.stop())
    run(reader.stop())
