"""A stand-in provider for a daemon started without a usable LLM configuration (e.g. no API key).

The daemon still serves health, sessions and tools; each chat turn fails with the configuration problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aichat.llm.provider import Completion, LLMError
from aichat.llm.tools import ToolSpec


class UnconfiguredProvider:
    """Fails every completion with ``reason`` (HTTP 503 to API clients)."""

    def __init__(self, name: str, model: str, reason: str) -> None:
        self.name = name
        self.model = model
        self.reason = reason

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolSpec] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        raise LLMError(self.reason, reply_status=503, code="not_configured")

    async def close(self) -> None:
        """Nothing to release."""
