"""A write-through cache of sessions and the tails of their histories, kept by the store that owns the writes.

Every turn reads its session's budgeted tail (:mod:`aichat.store.tail`) to build the model's context, and
that read is on the path to the first token. The store keeps recently used sessions here, updated by its
own committed writes, so a turn finds its history without a database round trip. An entry holds only the
tail for the context budget it was read with: each append trims the messages older than the tail needs, so
an entry's size follows the budget, not the session's length. The database stays the truth: the cache only holds
what a read returned or a commit wrote, and drops an entry whenever it cannot be sure.

A read that misses fills the cache only if no write to that session was queued or committing while it
ran: the read might otherwise have seen the database before that write and store a history that is
already stale. Writes update an entry when they commit, in commit order. A write that fails drops the entry.

Size is bounded by an approximate byte budget (text, tool calls and attachments of the messages held);
the least recently used sessions go first, and a tail larger than a quarter of the budget is not kept.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from aichat.store.base import History, Message, Session
from aichat.store.tail import tail_start

#: Rough overheads of the objects themselves, beyond their text.
MESSAGE_OVERHEAD = 400
SESSION_OVERHEAD = 600


def message_size(message: Message) -> int:
    """About how many bytes ``message`` keeps alive."""
    size = MESSAGE_OVERHEAD + len(message.content)
    if message.tool_calls:
        size += len(json.dumps(message.tool_calls))
    if message.tool_executions:
        size += len(json.dumps(message.tool_executions))
    for attachment in message.attachments:
        size += len(attachment.content) + len(attachment.filename)
    return size


@dataclass
class _Entry:
    """A session and its newest messages: every one when ``complete``, else the tail for ``budget``
    (0 until a read names one)."""

    session: Session
    messages: list[Message]
    size: int
    complete: bool = True
    budget: int = 0

    def serves(self, budget: int) -> bool:
        return self.complete or self.budget >= budget

    def trim(self) -> int:
        """Drop the messages older than the tail for ``budget`` needs; the bytes freed."""
        start = tail_start(self.messages, self.budget) if self.budget else None
        if not start:
            return 0
        freed = sum(message_size(m) for m in self.messages[:start])
        del self.messages[:start]
        self.complete = False
        self.size -= freed
        return freed


@dataclass
class Read:
    """A history read in progress; ``stale`` once a write to its session was queued."""

    session_id: str
    stale: bool = False


@dataclass
class HistoryCache:
    """Sessions and histories by session id, least recently used first; ``max_bytes`` 0 keeps nothing."""

    max_bytes: int
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _bytes: int = 0
    _writing: dict[str, int] = field(default_factory=dict)
    _reads: dict[str, list[Read]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes held, by :func:`message_size`."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    # -- reads ----------------------------------------------------------------------------------------

    def session(self, session_id: str) -> Session | None:
        """The cached session, or ``None`` when it is not cached."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        self._entries.move_to_end(session_id)
        return entry.session

    def history(self, session_id: str, budget: int) -> tuple[Session, History] | None:
        """The cached session and a copy of its tail for ``budget``, or ``None`` when that is not cached."""
        entry = self._entries.get(session_id)
        if entry is None or not entry.serves(budget):
            return None
        self._entries.move_to_end(session_id)
        if budget > entry.budget:
            entry.budget = budget
            self._bytes -= entry.trim()
        return entry.session, History(list(entry.messages), entry.complete)

    def begin_read(self, session_id: str) -> Read:
        """Note a database read of ``session_id``'s history; pass it to :meth:`fill` or :meth:`abandon`."""
        read = Read(session_id, stale=self._writing.get(session_id, 0) > 0)
        self._reads.setdefault(session_id, []).append(read)
        return read

    def fill(self, read: Read, session: Session, history: History, budget: int) -> None:
        """Keep the tail for ``budget`` that ``read`` returned, unless a write to the session may have
        overtaken it."""
        self.abandon(read)
        held = self._entries.get(read.session_id)
        if read.stale or not self.max_bytes or (held is not None and held.serves(budget)):
            return
        size = SESSION_OVERHEAD + sum(message_size(m) for m in history.messages)
        if size > self.max_bytes // 4:
            return
        self.drop(read.session_id)
        self._entries[read.session_id] = _Entry(session, list(history.messages), size, history.complete, budget)
        self._bytes += size
        self._evict()

    def abandon(self, read: Read) -> None:
        """Forget ``read`` without keeping anything (it failed, or found no session)."""
        reads = self._reads.get(read.session_id)
        if reads is not None and read in reads:
            reads.remove(read)
            if not reads:
                del self._reads[read.session_id]

    # -- writes ---------------------------------------------------------------------------------------

    def begin_write(self, session_id: str) -> None:
        """A write to ``session_id`` was queued: reads running now may miss it."""
        self._writing[session_id] = self._writing.get(session_id, 0) + 1
        for read in self._reads.get(session_id, ()):
            read.stale = True

    def end_write(self, session_id: str) -> None:
        """A write to ``session_id`` committed or failed (after its effect was applied)."""
        left = self._writing.get(session_id, 0) - 1
        if left > 0:
            self._writing[session_id] = left
        else:
            self._writing.pop(session_id, None)

    def created(self, session: Session) -> None:
        """``session`` was committed, with no messages yet."""
        if self.max_bytes and session.id not in self._entries:
            self._entries[session.id] = _Entry(session, [], SESSION_OVERHEAD)
            self._bytes += SESSION_OVERHEAD
            self._evict()

    def appended(self, message: Message, updated_at: str) -> None:
        """``message`` was committed to its session, whose ``updated_at`` became ``updated_at``."""
        entry = self._entries.get(message.session_id)
        if entry is None:
            return
        size = message_size(message)
        entry.messages.append(message)
        entry.session = replace(entry.session, updated_at=updated_at)
        entry.size += size
        self._bytes += size - entry.trim()
        if entry.size > self.max_bytes // 4:
            self.drop(message.session_id)
        else:
            self._evict()

    def renamed(self, session_id: str, title: str, updated_at: str) -> None:
        """The session's title was committed."""
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.session = replace(entry.session, title=title, updated_at=updated_at)

    def cleared(self, session_id: str, updated_at: str) -> None:
        """Every message of the session was deleted."""
        entry = self._entries.get(session_id)
        if entry is not None:
            self._bytes -= entry.size - SESSION_OVERHEAD
            entry.messages = []
            entry.size = SESSION_OVERHEAD
            entry.complete = True
            entry.session = replace(entry.session, updated_at=updated_at)

    def drop(self, session_id: str) -> None:
        """Forget the session (deleted, or its state is unknown after a failed write)."""
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._bytes = 0

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
