"""What the non-OpenAI codecs share: reading the provider-neutral history.

The history a turn sends is Chat Completions messages (see :mod:`aichat.llm.provider`): ``system``,
``user`` (text, or parts of ``text`` and ``image_url``), ``assistant`` (text and ``tool_calls``) and
``tool`` (``tool_call_id``, text, ``is_error`` when the call failed). Other wire formats need it grouped:
the system text apart, tool results with the name of the call they answer, images as bytes. The tools
offered come as :class:`~aichat.llm.tools.ToolSpec` records, which each codec writes in its own shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aichat.llm.tools import ToolCall, calls_from_openai

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+);base64,(.*)$", re.S)


@dataclass(frozen=True)
class Image:
    """An image part: base64 ``data`` of ``mime_type``, or a ``url`` to fetch."""

    mime_type: str = ""
    data: str = ""
    url: str = ""


def system_text(messages: list[dict[str, Any]]) -> str:
    """The ``system`` and ``developer`` messages' text, joined."""
    texts = [text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    return "\n\n".join(text for text in texts if text)


def text_of(content: Any) -> str:
    """The text of a message's ``content`` (a string, or the ``text`` parts of a list)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def parts_of(content: Any) -> list[str | Image]:
    """A user message's content as text pieces and images, in order."""
    if isinstance(content, str):
        return [content] if content else []
    parts: list[str | Image] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and part.get("text"):
            parts.append(str(part["text"]))
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                continue
            match = _DATA_URL.match(url)
            parts.append(Image(match.group(1), match.group(2)) if match else Image(url=url))
    return parts


def tool_calls_of(message: dict[str, Any]) -> list[ToolCall]:
    """The calls of an assistant message."""
    return calls_from_openai(message.get("tool_calls"))


def call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Function name by call id, over the whole history (a tool result names only its call's id)."""
    return {call.id: call.name for m in messages if m.get("role") == "assistant" for call in tool_calls_of(m)}


FINISH_REASONS = {
    # Anthropic stop_reason
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "pause_turn": "stop",
    "refusal": "content_filter",
    # Gemini finishReason
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "MALFORMED_FUNCTION_CALL": "malformed_function_call",
}


def finish_reason(native: str, has_calls: bool) -> str:
    """A provider's stop reason in Chat Completions terms (``stop``, ``tool_calls``, ``length``,
    ``content_filter``); an unknown one lower-cased. Calls make ``stop`` into ``tool_calls``."""
    reason = FINISH_REASONS.get(native, native.lower())
    return "tool_calls" if has_calls and reason == "stop" else reason
