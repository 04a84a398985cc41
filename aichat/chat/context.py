"""What the model sees: the system prompt with a current-time block, then the session's stored history.

History is converted to the provider-neutral shapes, those of Chat Completions (assistant ``tool_calls``,
``tool`` messages with ``tool_call_id`` and ``is_error`` when the stored execution reads back as a
:class:`~aichat.llm.tools.Failed`), which every codec in :mod:`aichat.llm` translates to its own wire
format; it is repaired so every server we know accepts it (every tool call answered, no orphan results,
assistant content never ``null``, no empty assistant message), and trimmed to a character budget keeping
the newest messages without splitting a tool call from its results.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aichat import content_type
from aichat.llm.tools import Failed, execution_from_json
from aichat.store.base import Attachment, Message

NOT_EXECUTED = "Tool call was not executed (no result was recorded for it)."
TEXT_LIMIT = 50_000
TEXT_TYPES = (
    "application/json",
    "application/xml",
    "application/yaml",
    "application/x-yaml",
    "application/javascript",
    "application/typescript",
    "application/x-sh",
    "application/sql",
    "application/toml",
    "application/csv",
)


def time_context(now: datetime) -> str:
    """The reference's CURRENT CONTEXT block: UTC and local time and the QAN 12-hour default window."""
    utc = now.astimezone(UTC)
    local = now.astimezone()
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    start = (utc - timedelta(hours=12)).strftime(fmt)
    return (
        "\n\nCURRENT CONTEXT:\n"
        f"- Current time (UTC): {utc.strftime(fmt)}\n"
        f"- Local time: {local.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        "- When the user asks about Query Analytics (QAN) without a time range, use the last 12 hours: "
        f"from {start} to {utc.strftime(fmt)} (UTC, format YYYY-MM-DDTHH:MM:SSZ).\n"
        "- Timestamps passed to QAN tools use RFC3339."
    )


def is_text(mime_type: str) -> bool:
    """Whether an attachment of this type is given to the model as text."""
    mime = content_type.parse(mime_type).media
    return mime.startswith("text/") or mime in TEXT_TYPES or mime.endswith(("+json", "+xml"))


def user_content(text: str, attachments: Sequence[Attachment]) -> str | list[dict[str, Any]]:
    """A user message's content: text files inlined, images as ``image_url`` parts, others described."""
    if not attachments:
        return text
    inline = [text, "\n\nAttached files:\n"]
    images: list[dict[str, Any]] = []
    for attachment in attachments:
        header = f"--- File: {attachment.filename} (Size: {attachment.size} bytes, Type: {attachment.mime_type}) ---"
        inline.append(header + "\n")
        mime = content_type.parse(attachment.mime_type).media
        if mime.startswith("image/"):
            inline.append("[Image file - attached as an image]\n")
            images.append(
                {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{attachment.content}"}}
            )
        elif is_text(mime):
            try:
                decoded = base64.b64decode(attachment.content).decode("utf-8", errors="replace")
            except (binascii.Error, ValueError):
                decoded = "[unreadable content]"
            if len(decoded) > TEXT_LIMIT:
                decoded = decoded[:TEXT_LIMIT] + "\n... (content truncated)"
            inline.append(decoded + "\n")
        else:
            inline.append("[Binary file - content not displayed]\n")
        inline.append("--- End of file ---\n")
    joined = "".join(inline)
    if not images:
        return joined
    return [{"type": "text", "text": joined}, *images]


def to_openai(message: Message) -> dict[str, Any] | None:
    """One stored message in Chat Completions form; what a server may reject is left out.

    An assistant message's ``content`` is always a string, ``""`` beside tool calls (llama.cpp answers 500
    to ``null``); an assistant message with neither text nor tool calls is invalid everywhere, so one
    stored by an older version (from an empty answer) is skipped rather than sent.
    """
    if message.role == "user":
        return {"role": "user", "content": user_content(message.content, message.attachments)}
    if message.role == "assistant":
        if not message.tool_calls and not message.content.strip():
            return None
        out: dict[str, Any] = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            out["tool_calls"] = message.tool_calls
        return out
    if message.role == "tool" and message.tool_call_id:
        out = {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
        if any(isinstance(execution_from_json(row), Failed) for row in message.tool_executions or ()):
            # Claude and Gemini are told a result is a failure; the Chat Completions codec leaves it out.
            out["is_error"] = True
        return out
    return None


def _groups(history: Sequence[Message]) -> list[list[dict[str, Any]]]:
    """Consistent units: a single message, or an assistant tool-call message with one result per call."""
    groups: list[list[dict[str, Any]]] = []
    open_calls: dict[str, dict[str, Any]] = {}
    current: list[dict[str, Any]] | None = None

    def close() -> None:
        nonlocal current
        if current is not None:
            for call_id in list(open_calls):
                current.append({"role": "tool", "tool_call_id": call_id, "content": NOT_EXECUTED})
            open_calls.clear()
            groups.append(current)
            current = None

    for message in history:
        converted = to_openai(message)
        if converted is None:
            continue
        if converted["role"] == "tool":
            if current is not None and converted["tool_call_id"] in open_calls:
                del open_calls[converted["tool_call_id"]]
                current.append(converted)
            continue
        close()
        if converted.get("tool_calls"):
            current = [converted]
            open_calls.update({call["id"]: call for call in converted["tool_calls"]})
        else:
            groups.append([converted])
    close()
    return groups


def _size(group: list[dict[str, Any]]) -> int:
    total = 0
    for message in group:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text", "")) + len(str(part.get("image_url", ""))) for part in content)
        for call in message.get("tool_calls") or ():
            total += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return total


def build_messages(
    system_prompt: str, history: Sequence[Message], budget_chars: int, now: datetime
) -> list[dict[str, Any]]:
    """System message plus the newest history that fits ``budget_chars`` (the newest unit always fits)."""
    groups = _groups(history)
    kept: list[list[dict[str, Any]]] = []
    used = 0
    for group in reversed(groups):
        size = _size(group)
        if kept and used + size > budget_chars:
            break
        kept.append(group)
        used += size
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt + time_context(now)})
    for group in reversed(kept):
        messages.extend(group)
    return messages
