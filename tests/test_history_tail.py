"""The budgeted tail of a history: the model's context built from it is the one built from the whole session,
for sessions within the budget and beyond it (trimmed as before), and the tool-round count and the "first
turn" knowledge the turn needs survive the cut."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aichat.chat.context import _groups, _size, build_messages
from aichat.chat.turn import _rounds_since_last_user
from aichat.store.base import Attachment, Message
from aichat.store.tail import context_chars, tail_start

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CALL_IDS = ("c0", "c1", "c2", "c3")


def call(call_id: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "echo", "arguments": arguments}}


@st.composite
def histories(draw: st.DrawFn) -> list[Message]:
    """Any stored history: user messages (some with text or image files), answers (some blank), tool-call
    rounds whose results may be missing, duplicated or orphaned, approvals and system rows."""
    out: list[Message] = []
    text = st.text(alphabet="ab ", max_size=120)
    for n in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["user", "user", "answer", "calls", "result", "approval", "system"]))
        mid = f"m{n}"
        if kind == "user":
            files: tuple[Attachment, ...] = ()
            if draw(st.booleans()):
                body = base64.b64encode(draw(text).encode()).decode()
                mime = draw(st.sampled_from(["text/plain", "image/png", "application/octet-stream"]))
                files = (Attachment(f"a{n}", "f", mime, len(body), body),)
            out.append(Message(mid, "s", "user", draw(text), attachments=files))
        elif kind == "answer":
            out.append(Message(mid, "s", "assistant", draw(st.sampled_from(["", "  ", "ok"])) + draw(text)))
        elif kind == "calls":
            ids = draw(st.lists(st.sampled_from(CALL_IDS), min_size=1, max_size=3, unique=True))
            out.append(Message(mid, "s", "assistant", draw(text), tool_calls=[call(i, draw(text)) for i in ids]))
        elif kind == "result":
            out.append(Message(mid, "s", "tool", draw(text), tool_call_id=draw(st.sampled_from((*CALL_IDS, None)))))
        else:
            out.append(Message(mid, "s", "tool_approval" if kind == "approval" else "system", draw(text)))
    return out


@settings(max_examples=600, deadline=None)
@given(histories(), st.integers(0, 1500))
def test_the_context_from_the_tail_is_the_context_from_the_whole_history(
    history: list[Message], budget: int
) -> None:
    """Whatever the history and budget, the tail starts at a user message, holds the last one, and gives the
    model the same messages (trimmed the same way) and the turn the same tool-round count."""
    start = tail_start(history, budget)
    tail = history[start:] if start is not None else history
    assert build_messages("sys", tail, budget, NOW) == build_messages("sys", history, budget, NOW)
    assert _rounds_since_last_user(tail) == _rounds_since_last_user(history)
    users = [n for n, m in enumerate(history) if m.role == "user"]
    if start is not None:
        assert history[start].role == "user" and start <= users[-1]
        assert sum(context_chars(history)[start:]) > budget


@settings(max_examples=600, deadline=None)
@given(histories(), st.integers(0, 40), st.integers(-3, 30))
def test_budgets_at_the_edge_of_a_unit_trim_the_same(history: list[Message], units: int, delta: int) -> None:
    """Budgets that end exactly at (or next to) the boundary of a unit of the context, where a measure
    that counted a character too many would cut a unit the model is sent."""
    sizes = [_size(group) for group in _groups(history)]
    budget = max(0, sum(sizes[len(sizes) - min(units, len(sizes)):]) + delta)
    start = tail_start(history, budget)
    tail = history[start:] if start is not None else history
    assert build_messages("", tail, budget, NOW) == build_messages("", history, budget, NOW)


def test_a_session_within_the_budget_is_read_whole() -> None:
    """No user message has more than the budget after it: nothing is cut."""
    history = [Message("u1", "s", "user", "hello"), Message("a1", "s", "assistant", "hi there")]
    assert tail_start(history, 13) is None
    assert tail_start(history, 12) == 0


def test_the_tail_starts_at_the_newest_user_message_that_is_enough() -> None:
    """Older turns beyond the budget are left out; a long last turn is kept whole back to its user message."""
    history = []
    for n in range(10):
        history += [Message(f"u{n}", "s", "user", "q" * 10), Message(f"a{n}", "s", "assistant", "r" * 10)]
    assert tail_start(history, 35) == 16
    rounds = [Message("u", "s", "user", "go")]
    for n in range(5):
        rounds += [Message(f"c{n}", "s", "assistant", "", tool_calls=[call(f"x{n}", "{}")]),
                   Message(f"t{n}", "s", "tool", "z" * 100, tool_call_id=f"x{n}")]
    assert tail_start(history + rounds, 35) == len(history)
    assert _rounds_since_last_user((history + rounds)[len(history):]) == 5


def test_results_count_only_where_the_context_keeps_them() -> None:
    """An orphaned or repeated tool result adds nothing to the measure, as the context builder drops it."""
    history = [
        Message("u", "s", "user", "go"),
        Message("c", "s", "assistant", "", tool_calls=[call("x", "ab")]),
        Message("t1", "s", "tool", "12345", tool_call_id="x"),
        Message("t2", "s", "tool", "again", tool_call_id="x"),
        Message("t3", "s", "tool", "orphan", tool_call_id="y"),
    ]
    assert context_chars(history) == [2, 6, 5, 0, 0]
