"""The history cache: it never keeps a history a write may have overtaken, follows committed writes, and
stays within its byte budget."""

from __future__ import annotations

from aichat.store.base import Attachment, History, Message, Session
from aichat.store.history_cache import SESSION_OVERHEAD, HistoryCache, message_size

MB = 1024 * 1024
#: The context budget entries are read with.
BUDGET = 100_000


def session(session_id: str = "s1", user: str = "1", title: str = "t") -> Session:
    return Session(session_id, user, title, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z")


def message(text: str, session_id: str = "s1") -> Message:
    return Message(f"m-{text}", session_id, "user", text)


def test_clean_read_fills_and_later_reads_hit() -> None:
    """A read with no write around it is kept; the cached history is a copy callers may extend."""
    cache = HistoryCache(MB)
    read = cache.begin_read("s1")
    cache.fill(read, session(), History([message("a")]), BUDGET)
    found = cache.history("s1", BUDGET)
    assert found is not None
    found[1].messages.append(message("not stored"))
    again = cache.history("s1", BUDGET)
    assert again is not None and [m.content for m in again[1].messages] == ["a"]


def test_read_overtaken_by_a_write_is_not_kept() -> None:
    """A write queued while a read runs may be missing from what the read returns: nothing is kept."""
    cache = HistoryCache(MB)
    read = cache.begin_read("s1")
    cache.begin_write("s1")
    cache.appended(message("b"), "later")
    cache.end_write("s1")
    cache.fill(read, session(), History([message("a")]), BUDGET)
    assert cache.history("s1", BUDGET) is None


def test_read_started_during_a_write_is_not_kept() -> None:
    """A read that starts while a write is committing may see the database before it: nothing is kept."""
    cache = HistoryCache(MB)
    cache.begin_write("s1")
    read = cache.begin_read("s1")
    cache.fill(read, session(), History([message("a")]), BUDGET)
    cache.end_write("s1")
    assert cache.history("s1", BUDGET) is None
    fresh = cache.begin_read("s1")
    cache.fill(fresh, session(), History([message("a")]), BUDGET)
    assert cache.history("s1", BUDGET) is not None


def test_writes_to_other_sessions_do_not_spoil_a_read() -> None:
    """Staleness is per session: a busy neighbour does not stop a session from being cached."""
    cache = HistoryCache(MB)
    read = cache.begin_read("s1")
    cache.begin_write("s2")
    cache.fill(read, session(), History([]), BUDGET)
    assert "s1" in cache


def test_committed_writes_update_the_entry() -> None:
    """Appends, renames and clears change the cached session as the database changed it."""
    cache = HistoryCache(MB)
    cache.created(session())
    cache.appended(message("a"), "2026-01-02T00:00:00.000000Z")
    cache.renamed("s1", "new title", "2026-01-03T00:00:00.000000Z")
    found = cache.history("s1", BUDGET)
    assert found is not None
    assert found[0].title == "new title" and found[0].updated_at == "2026-01-03T00:00:00.000000Z"
    assert [m.content for m in found[1].messages] == ["a"]
    cache.cleared("s1", "2026-01-04T00:00:00.000000Z")
    cleared = cache.history("s1", BUDGET)
    assert cleared is not None and cleared[1].messages == [] and cleared[0].updated_at == "2026-01-04T00:00:00.000000Z"
    assert cache.size == SESSION_OVERHEAD
    cache.drop("s1")
    assert cache.history("s1", BUDGET) is None and cache.size == 0


def test_least_recently_used_sessions_go_first() -> None:
    """Over budget, the session used longest ago is dropped; a hit counts as a use."""
    one = message_size(message("x" * 1000))
    cache = HistoryCache(4 * (SESSION_OVERHEAD + one))
    for name in ("s1", "s2", "s3"):
        cache.fill(cache.begin_read(name), session(name), History([message("x" * 1000, name)]), BUDGET)
    assert cache.history("s1", BUDGET) is not None
    cache.fill(cache.begin_read("s4"), session("s4"), History([message("x" * 1000, "s4")]), BUDGET)
    cache.fill(cache.begin_read("s5"), session("s5"), History([message("x" * 1000, "s5")]), BUDGET)
    assert [name for name in ("s1", "s2", "s3", "s4", "s5") if name in cache] == ["s1", "s3", "s4", "s5"]
    assert cache.size <= cache.max_bytes


def test_large_sessions_and_empty_sessions_stay_bounded() -> None:
    """A session over a quarter of the budget is not kept (nor kept growing), and empty sessions count."""
    cache = HistoryCache(100_000)
    attachment = Attachment("a1", "big.png", "image/png", 30_000, "A" * 30_000)
    big = Message("m1", "s1", "user", "look", attachments=(attachment,))
    cache.fill(cache.begin_read("s1"), session(), History([big]), BUDGET)
    assert "s1" not in cache
    cache.created(session("s2"))
    cache.appended(Message("m2", "s2", "user", "x" * 30_000), "later")
    assert "s2" not in cache and cache.size == 0
    for n in range(1000):
        cache.created(session(f"e{n}"))
    assert cache.size <= cache.max_bytes and len(cache) == cache.max_bytes // SESSION_OVERHEAD


def test_zero_budget_keeps_nothing() -> None:
    """``max_bytes`` 0 turns the cache off."""
    cache = HistoryCache(0)
    cache.created(session())
    cache.fill(cache.begin_read("s2"), session("s2"), History([]), BUDGET)
    assert len(cache) == 0 and cache.history("s1", BUDGET) is None
