"""Text as every engine can hold it: no NUL (PostgreSQL's text and jsonb refuse it) and no lone surrogates
(no UTF-8 encoder takes them).

What a user sends is checked at the API (a 400 names the problem); what a model or a tool produces is stored
with each such character replaced by U+FFFD, so one odd byte in a tool's output never costs a turn.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from aichat.store.base import Approval, Message

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def unstorable(text: str) -> bool:
    """Whether ``text`` holds a character no engine can store."""
    return _UNSTORABLE.search(text) is not None


def storable(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, text) if _UNSTORABLE.search(text) else text


def storable_json(value: Any) -> Any:
    """A JSON value with :func:`storable` applied to every string in it, keys included."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, list):
        return [storable_json(item) for item in value]
    if isinstance(value, dict):
        return {storable(key): storable_json(item) for key, item in value.items()}
    return value


def storable_message(message: Message) -> Message:
    """``message`` with every text field storable (the same object when nothing needs replacing)."""
    changes: dict[str, Any] = {}
    if unstorable(message.content):
        changes["content"] = storable(message.content)
    for name in ("tool_calls", "tool_executions", "approval_request"):
        value = getattr(message, name)
        if value is not None:
            clean = storable_json(value)
            if clean != value:
                changes[name] = clean
    attachments = tuple(
        replace(a, filename=storable(a.filename), mime_type=storable(a.mime_type)) for a in message.attachments
    )
    if attachments != message.attachments:
        changes["attachments"] = attachments
    return replace(message, **changes) if changes else message


def storable_approval(approval: Approval) -> Approval:
    """``approval`` with storable tool calls."""
    clean = storable_json(approval.tool_calls)
    return approval if clean == approval.tool_calls else replace(approval, tool_calls=clean)
