"""The turn log: live turns (each row is the lease of the instance that runs it) and their events.

:class:`TurnLog` is the small interface the coordinator uses, so another bus could replace it;
:class:`PostgresTurnLog` keeps it in PostgreSQL (``chat_turns`` and ``turn_events``, migration 0003) on the
store's connection pool, with ``pg_notify`` sent in the same transaction as the rows it announces (so it
is delivered only after their commit). A notification carries only turn ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aichat.chat.streams import Event
from aichat.store.base import Message, new_id, utc_now
from aichat.store.engines import Txn, dump_json
from aichat.store.sql import insert_message

#: The channel that announces new events of turns (payload: their ids, separated by spaces).
EVENTS_CHANNEL = "aichat_turn_events"

#: The ``error`` of a turn whose instance stopped renewing its lease.
LEASE_LOST = "The instance running this turn stopped responding (its lease expired); the turn was ended"


@dataclass(frozen=True)
class TurnRecord:
    """A turn as another instance sees it: whose it is, its session, and how long ago it ended."""

    id: str
    user_id: str
    session_id: str
    ended_seconds_ago: float | None


@dataclass(frozen=True)
class LoggedEvent:
    """One event of a turn with its place (``seq``, 1-based: the SSE ``id``)."""

    turn_id: str
    seq: int
    event: Event


def event_payload(event: Event) -> dict[str, Any]:
    """An event as stored: its wire JSON plus our ``synthetic`` mark."""
    payload = event.to_json()
    if event.synthetic:
        payload["synthetic"] = True
    return payload


def event_from_payload(payload: dict[str, Any]) -> Event:
    """The :class:`Event` a stored payload holds."""
    return Event(
        type=str(payload["type"]),
        session_id=str(payload.get("session_id", "")),
        content=str(payload.get("content", "")),
        error=str(payload.get("error", "")),
        tool_calls=payload.get("tool_calls"),
        tool_executions=payload.get("tool_executions"),
        request_id=str(payload.get("request_id", "")),
        synthetic=bool(payload.get("synthetic", False)),
    )


def partial_reply(events: Sequence[Event]) -> str:
    """The model's text of the round under way: real text deltas after the last tool event."""
    said: list[str] = []
    for event in events:
        if event.type in ("tool_execution", "tool_approval_request"):
            said = []
        elif event.type == "message" and not event.synthetic:
            said.append(event.content)
    return "".join(said)


class TurnLog(Protocol):
    """Where live turns and their events are kept for every instance. Every method is a coroutine."""

    instance: str

    async def claim(self, turn_id: str, session_id: str, user_id: str, lease_seconds: float) -> bool:
        """Record a new turn owned by this instance; ``False`` if its session has a live turn already."""

    async def append(self, batches: Sequence[Appended]) -> None:
        """For each (turn, first_seq, events, final): add its events as ``first_seq``, ``first_seq + 1``, ...
        (again is harmless), ending the turn if ``final``; all at once, then announce the turns."""

    async def read(self, after: dict[str, int]) -> list[LoggedEvent]:
        """Events of each turn in ``after`` with a ``seq`` above the given one, in order."""

    async def lookup(self, turn_id: str) -> TurnRecord | None:
        """The turn, if it is still known."""

    async def renew(self, turn_ids: Sequence[str], lease_seconds: float) -> set[str]:
        """Extend this instance's leases on ``turn_ids``; returns those it still holds."""

    async def take_over(self) -> list[str]:
        """End every turn whose lease expired with an ``error`` event (its partial reply stored);
        exactly one instance takes each. Returns their ids."""

    async def sweep(self, keep_seconds: float) -> int:
        """Forget turns that ended more than ``keep_seconds`` ago; returns how many."""


Transact = Callable[..., Any]

APPEND = (
    "WITH settings AS (SELECT set_config('synchronous_commit', 'off', true)), "
    "added AS (INSERT INTO turn_events (turn_id, seq, kind, payload) "
    "SELECT * FROM unnest(?::text[], ?::int[], ?::text[], ?::jsonb[]) ON CONFLICT DO NOTHING), "
    "ended AS (UPDATE chat_turns SET ended_at = now() WHERE id = ANY(?::text[]) AND ended_at IS NULL) "
    "SELECT pg_notify(?, turns) FROM settings, unnest(?::text[]) AS turns"
)
#: The new events of some turns: a range scan of the primary key per turn (as a plain join, the planner
#: may choose to scan the whole table, which holds every turn of the last ``stream_keep_seconds``).
READ = (
    "SELECT m.id, e.seq, e.payload FROM unnest(?::text[], ?::int[]) AS m(id, last) "
    "CROSS JOIN LATERAL (SELECT seq, payload FROM turn_events WHERE turn_id = m.id AND seq > m.last ORDER BY seq) "
    "AS e ORDER BY m.id, e.seq"
)
#: Events of one turn to append: its id, the seq of the first, the events, whether they end it.
Appended = tuple[str, int, Sequence[Event], bool]
#: Room for turn ids in one notification (PostgreSQL caps a payload at 8000 bytes).
NOTIFY_BYTES = 7900


def _notify_chunks(ids: Sequence[str]) -> list[str]:
    """Turn ids joined by spaces, in as few payloads as fit."""
    chunks: list[str] = []
    current = ""
    for turn_id in ids:
        if current and len(current) + 1 + len(turn_id) > NOTIFY_BYTES:
            chunks.append(current)
            current = ""
        current = f"{current} {turn_id}" if current else turn_id
    if current:
        chunks.append(current)
    return chunks


class PostgresTurnLog:
    """:class:`TurnLog` in PostgreSQL; ``transact(work, *args, write=...)`` runs ``work(txn, *args)`` on
    the store's pool (a thread, never the reactor)."""

    def __init__(self, transact: Transact, instance: str | None = None) -> None:
        self._transact = transact
        self.instance = instance or new_id("instance")

    async def claim(self, turn_id: str, session_id: str, user_id: str, lease_seconds: float) -> bool:
        def insert(txn: Txn) -> bool:
            # On the way to the first token: one statement (one round trip), committed asynchronously
            # (a live turn's row is worth nothing after a crash of the database server).
            txn.execute(
                "WITH settings AS (SELECT set_config('synchronous_commit', 'off', true)) "
                "INSERT INTO chat_turns (id, session_id, user_id, owner, lease_until) "
                "SELECT ?, ?, ?, ?, now() + ? * interval '1 second' FROM settings "
                "ON CONFLICT (session_id) WHERE ended_at IS NULL DO NOTHING RETURNING id",
                (turn_id, session_id, user_id, self.instance, lease_seconds),
            )
            return txn.fetchone() is not None

        return bool(await self._transact(insert, write=False))

    async def append(self, batches: Sequence[Appended]) -> None:
        rows = [
            (turn_id, first_seq + n, event.type, dump_json(event_payload(event)))
            for turn_id, first_seq, events, _ in batches
            for n, event in enumerate(events)
        ]
        ended = [turn_id for turn_id, _, _, final in batches if final]
        chunks = _notify_chunks(sorted({turn_id for turn_id, _, _, _ in batches}))
        params = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], ended,
                  EVENTS_CHANNEL, chunks)

        def insert(txn: Txn) -> None:
            # One statement, so one round trip (it is its own transaction). Asynchronous commit: the rows
            # are visible to every session at commit; only a crash of the database server itself could
            # lose the last few milliseconds of events (never messages).
            txn.execute(APPEND, params)
            txn.fetchall()

        await self._transact(insert, write=False)

    async def read(self, after: dict[str, int]) -> list[LoggedEvent]:
        ids = list(after)
        lasts = [after[i] for i in ids]

        def select(txn: Txn) -> list[LoggedEvent]:
            txn.execute(READ, (ids, lasts))
            return [LoggedEvent(row[0], row[1], event_from_payload(row[2])) for row in txn.fetchall()]

        if not ids:
            return []
        found: list[LoggedEvent] = await self._transact(select, write=False)
        return found

    async def lookup(self, turn_id: str) -> TurnRecord | None:
        def select(txn: Txn) -> TurnRecord | None:
            txn.execute(
                "SELECT id, user_id, session_id, extract(epoch FROM now() - ended_at) FROM chat_turns WHERE id = ?",
                (turn_id,),
            )
            row = txn.fetchone()
            if row is None:
                return None
            return TurnRecord(row[0], row[1], row[2], None if row[3] is None else float(row[3]))

        found: TurnRecord | None = await self._transact(select, write=False)
        return found

    async def renew(self, turn_ids: Sequence[str], lease_seconds: float) -> set[str]:
        def update(txn: Txn) -> set[str]:
            txn.execute(
                "UPDATE chat_turns SET lease_until = now() + ? * interval '1 second' "
                "WHERE id = ANY(?) AND owner = ? AND ended_at IS NULL RETURNING id",
                (lease_seconds, list(turn_ids), self.instance),
            )
            return {row[0] for row in txn.fetchall()}

        if not turn_ids:
            return set()
        held: set[str] = await self._transact(update)
        return held

    async def take_over(self) -> list[str]:
        def end_expired(txn: Txn) -> list[str]:
            # Row locks make this a compare-and-set: a second instance running it at once skips rows ended here.
            txn.execute(
                "UPDATE chat_turns SET ended_at = now(), owner = ? "
                "WHERE ended_at IS NULL AND lease_until < now() RETURNING id, session_id",
                (self.instance,),
            )
            taken = txn.fetchall()
            for turn_id, session_id in taken:
                txn.execute("SELECT payload FROM turn_events WHERE turn_id = ? ORDER BY seq", (turn_id,))
                events = [event_from_payload(row[0]) for row in txn.fetchall()]
                _keep_partial_reply(txn, session_id, partial_reply(events))
                error = Event("error", session_id, error=LEASE_LOST)
                txn.execute(
                    "INSERT INTO turn_events (turn_id, seq, kind, payload) VALUES (?, ?, ?, ?)",
                    (turn_id, len(events) + 1, "error", dump_json(event_payload(error))),
                )
                txn.execute("SELECT pg_notify(?, ?)", (EVENTS_CHANNEL, turn_id))
            return [row[0] for row in taken]

        ended: list[str] = await self._transact(end_expired)
        return ended

    async def sweep(self, keep_seconds: float) -> int:
        def delete(txn: Txn) -> int:
            txn.execute(
                "DELETE FROM chat_turns WHERE ended_at < now() - ? * interval '1 second'", (keep_seconds,)
            )
            return txn.rowcount

        return int(await self._transact(delete))


def _keep_partial_reply(txn: Txn, session_id: str, partial: str) -> None:
    """Store what the model had said in a turn cut short, unless its instance stored it already."""
    if not partial.strip():
        return
    txn.execute("SELECT role, content FROM chat_messages WHERE session_id = ? ORDER BY seq DESC LIMIT 1", (session_id,))
    last = txn.fetchone()
    if last is not None and last[0] == "assistant" and last[1] == partial:
        return
    txn.execute("SELECT 1 FROM chat_sessions WHERE id = ?", (session_id,))
    if txn.fetchone() is None:
        return
    insert_message(txn, Message(new_id("assistant"), session_id, "assistant", partial), utc_now())
