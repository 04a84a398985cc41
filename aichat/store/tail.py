"""The budgeted tail of a session's history: the newest messages a turn needs, not the whole session.

A turn sends the model the newest history that fits the context budget (``chat.history_budget_chars``,
trimmed by :func:`aichat.chat.context.build_messages` in whole units: a message, or an assistant's tool calls
with their results) and counts its tool rounds back to the last user message. The store therefore reads, and
its cache keeps, only a tail that starts at a user message and holds more than the budget: grouping starts
afresh at every user message, so the units of the tail are the session's own units, and a tail that measures
more than the budget ends the trimming inside it. The context built from the tail is the one built from the
whole session.

:func:`context_chars` is a lower bound of what each message adds to the model's context (attachments and
the placeholders for unanswered calls are not counted), so a tail it measures over the budget holds at least
as much as the trimming keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

from aichat.store.base import Message


def _call_chars(message: Message) -> int:
    total = 0
    for call in message.tool_calls or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            total += len(str(function.get("name") or "")) + len(str(function.get("arguments") or ""))
    return total


def context_chars(messages: Sequence[Message]) -> list[int]:
    """For each message, at most the characters it adds to the model's context.

    Exact for the messages after the first user message of ``messages`` (bar attachments): a tool result
    counts only when it answers a call of the assistant message it follows, as the context builder keeps it.
    """
    sizes: list[int] = []
    open_calls: set[str] = set()
    for message in messages:
        size = 0
        if message.role == "tool":
            if message.tool_call_id and message.tool_call_id in open_calls:
                open_calls.discard(message.tool_call_id)
                size = len(message.content)
        elif message.role == "user" or (
            message.role == "assistant" and (message.tool_calls or message.content.strip())
        ):
            # A message the model sees that is not a tool result closes the calls before it.
            open_calls = {c["id"] for c in message.tool_calls or () if isinstance(c, dict) and "id" in c}
            size = len(message.content) + _call_chars(message)
        sizes.append(size)
    return sizes


def tail_start(messages: Sequence[Message], budget_chars: int) -> int | None:
    """The index of the newest user message from which ``messages`` measure more than ``budget_chars``, or
    ``None`` when no user message does (every message may then be needed)."""
    sizes = context_chars(messages)
    total = 0
    for index in range(len(messages) - 1, -1, -1):
        total += sizes[index]
        if messages[index].role == "user" and total > budget_chars:
            return index
    return None
