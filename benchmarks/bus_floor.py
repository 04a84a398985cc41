"""The floor under cross-instance delivery: the database path alone, with no daemon and no HTTP.

The traffic of ``multi_instance``'s delivery run (``turns`` turns started evenly over one answer's time,
each ``events`` events ``interval`` apart) goes through PostgreSQL the way the cluster sends it: one
connection writes in group commits (what is produced during a write goes in the next) with the same kind
of statement (rows and ``pg_notify`` in one asynchronously committed statement); a second connection
``LISTEN``\\ s; a third reads the announced turns' new rows back, one read in flight. Per event: the time
its row was read back minus the time it was produced. What the daemons add on top of this is theirs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg

CHANNEL = "bench_floor_events"
TABLE = (
    "CREATE TABLE IF NOT EXISTS floor_events (turn_id text, seq int, kind text, payload jsonb, "
    "PRIMARY KEY (turn_id, seq))"
)
APPEND = (
    "WITH settings AS (SELECT set_config('synchronous_commit', 'off', true)), "
    "added AS (INSERT INTO floor_events (turn_id, seq, kind, payload) "
    "SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::jsonb[])) "
    "SELECT pg_notify(%s, turns) FROM settings, unnest(%s::text[]) AS turns"
)
READ = (
    "SELECT e.turn_id, e.seq FROM floor_events e "
    "JOIN unnest(%s::text[], %s::int[]) AS m(id, last) ON e.turn_id = m.id AND e.seq > m.last"
)
PAYLOAD = '{"type":"message","session_id":"s","content":"word "}'


@dataclass
class _Shared:
    """What the four threads hand each other."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    pending: list[tuple[str, int]] = field(default_factory=list)
    produced: dict[tuple[str, int], float] = field(default_factory=dict)
    arrived: dict[tuple[str, int], float] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    listening: threading.Event = field(default_factory=threading.Event)
    producing: bool = True
    running: bool = True


def _produce(shared: _Shared, turns: int, events: int, interval: float) -> None:
    answer = events * interval
    schedule = sorted(
        (answer * n / turns + k * interval, f"turn-{n}", k + 1) for n in range(turns) for k in range(events)
    )
    began = time.perf_counter()
    for at, turn_id, seq in schedule:
        delay = began + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with shared.lock:
            shared.produced[(turn_id, seq)] = time.perf_counter()
            shared.pending.append((turn_id, seq))
            shared.lock.notify_all()
    with shared.lock:
        shared.producing = False
        shared.lock.notify_all()


def _write(shared: _Shared, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        while True:
            with shared.lock:
                while not shared.pending and shared.producing:
                    shared.lock.wait()
                batch, shared.pending = shared.pending, []
                if not batch and not shared.producing:
                    return
            ids = [turn_id for turn_id, _ in batch]
            connection.execute(
                APPEND,
                (ids, [seq for _, seq in batch], ["message"] * len(batch), [PAYLOAD] * len(batch), CHANNEL,
                 sorted(set(ids))),
            ).fetchall()


def _listen(shared: _Shared, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"LISTEN {CHANNEL}")
        shared.listening.set()
        while shared.running:
            for notice in connection.notifies(timeout=0.2):
                with shared.lock:
                    shared.dirty.update(notice.payload.split())
                    shared.lock.notify_all()


def _read(shared: _Shared, url: str, expected: int) -> None:
    last: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True) as connection:
        while True:
            with shared.lock:
                while not shared.dirty and len(shared.arrived) < expected:
                    if not shared.lock.wait(timeout=5):
                        return
                if len(shared.arrived) >= expected:
                    return
                dirty, shared.dirty = sorted(shared.dirty), set()
            rows = connection.execute(READ, (dirty, [last.get(t, 0) for t in dirty])).fetchall()
            now = time.perf_counter()
            with shared.lock:
                for turn_id, seq in rows:
                    shared.arrived.setdefault((turn_id, seq), now)
                    last[turn_id] = max(last.get(turn_id, 0), seq)
                shared.lock.notify_all()


def delivery_floor(url: str, turns: int, events: int, interval: float) -> list[float]:
    """Per event of the traffic above, read-back time minus production time (seconds)."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(TABLE)
        connection.execute("TRUNCATE floor_events")
    shared = _Shared()
    listener = threading.Thread(target=_listen, args=(shared, url), daemon=True)
    listener.start()
    shared.listening.wait(10)
    threads = [
        threading.Thread(target=_read, args=(shared, url, turns * events), daemon=True),
        threading.Thread(target=_write, args=(shared, url), daemon=True),
        threading.Thread(target=_produce, args=(shared, turns, events, interval), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    shared.running = False
    listener.join(5)
    return [shared.arrived[key] - shared.produced[key] for key in shared.arrived]
