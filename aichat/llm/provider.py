"""The model-provider interface: what a chat turn sends (OpenAI chat messages and the
:class:`~aichat.llm.tools.ToolSpec` records of the tools offered) and what it gets back (a
:class:`Completion` with text, complete :class:`~aichat.llm.tools.ToolCall` records and usage), plus the
one error type.

Every provider streams: ``complete`` calls ``on_text`` with each text delta as it arrives and returns the
assembled :class:`Completion` at the end. Cancelling the Deferred that wraps the coroutine cancels the work.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aichat.llm.tools import ToolCall, ToolSpec
from aichat.transport.exchange import UpstreamError

#: Roles the Chat Completions API accepts in ``messages``.
ALLOWED_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Usage:
    """Token counts reported by the upstream for one completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI ``usage`` object; ``None`` when it is absent or malformed."""
        if not isinstance(usage, dict):
            return None
        try:
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            total = int(usage.get("total_tokens") or prompt + completion)
        except (TypeError, ValueError):
            return None
        return cls(prompt, completion, total)


@dataclass(frozen=True)
class Completion:
    """The outcome of one model call: all of its text, its complete tool calls, why it stopped, its usage."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None


class LLMError(UpstreamError):
    """A model call failed.

    ``status`` is the upstream HTTP status when there was one; ``retryable`` says whether the failure was of
    a kind worth retrying (it stays true on the error raised after the attempts ran out); ``started`` is true
    when text had already been passed to ``on_text``, so the caller holds a partial answer; ``code`` is the
    upstream's error code or one of ours (``timeout``, ``too_large``, ``connection``, ``protocol``, ``empty``,
    ``not_configured``). ``message`` is what a user may be shown (short, cleaned); ``detail`` is the full
    text, for the log only. ``reply_status`` is the HTTP status our own API answers for it when it is not
    the default (:attr:`http_status`).
    """

    def __init__(self, message: str, *, reply_status: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reply_status = reply_status

    @property
    def http_status(self) -> int:
        """What an API client is answered: ``reply_status`` when set, 504 for a timeout, else 502 (the model
        server, our upstream, failed)."""
        if self.reply_status is not None:
            return self.reply_status
        return 504 if self.code == "timeout" else 502


class Provider(Protocol):
    """A chat model: ``name`` is the provider's kind (``openai``, ``ollama``, ``mock``), ``model`` its id."""

    name: str
    model: str

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolSpec] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Stream one completion of ``messages``, offering ``tools``; raise :class:`LLMError` on failure."""
        ...

    async def close(self) -> None:
        """Release connections; the provider is not used afterwards."""
        ...


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Refuse history the Chat Completions API would reject: unknown roles, tool results without the id of
    the call they answer. Raises :class:`ValueError`, a bug in the caller, not an upstream failure."""
    for position, message in enumerate(messages):
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(f"message {position} has role {role!r}, which the Chat Completions API rejects")
        if role == "tool" and not message.get("tool_call_id"):
            raise ValueError(f"message {position} is a tool result without a tool_call_id")


def tool_names(tools: Sequence[ToolSpec] | None) -> list[str]:
    """The function names of the tools offered."""
    return [tool.name for tool in tools or ()]


@dataclass
class _PartialCall:
    """A tool call being assembled from stream fragments."""

    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Build complete tool calls from streamed ``delta.tool_calls`` fragments.

    Fragments are grouped by ``index``. The id and name may come on the first fragment only or be repeated
    on every one (llama.cpp does): the first non-empty value is kept and repeats are not concatenated.
    Arguments arrive in pieces and are concatenated. A fragment without an ``index`` continues the previous
    call unless it carries a new id. A call that never got an id is given one; empty arguments become ``{}``.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}
        self._last: int | None = None

    def feed(self, fragments: Any) -> None:
        """Add the ``tool_calls`` list of one delta; malformed entries are ignored."""
        if not isinstance(fragments, list):
            return
        for fragment in fragments:
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            new_id = fragment.get("id") or None
            if not isinstance(index, int):
                if self._last is None or (new_id and self._calls[self._last].id not in (None, new_id)):
                    index = max(self._calls, default=-1) + 1
                else:
                    index = self._last
            call = self._calls.setdefault(index, _PartialCall())
            self._last = index
            if new_id and not call.id:
                call.id = str(new_id)
            function = fragment.get("function")
            if isinstance(function, dict):
                name = function.get("name")
                if isinstance(name, str) and name and not call.name:
                    call.name = name
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    call.arguments.append(arguments)
                elif isinstance(arguments, dict):
                    call.arguments.append(json.dumps(arguments))

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self) -> list[ToolCall]:
        """The assembled calls in index order."""
        result = []
        for index in sorted(self._calls):
            call = self._calls[index]
            arguments = "".join(call.arguments)
            result.append(
                ToolCall(
                    id=call.id or f"call_{uuid.uuid4().hex[:24]}",
                    name=call.name,
                    arguments=arguments if arguments.strip() else "{}",
                )
            )
        return result


__all__ = [
    "ALLOWED_ROLES",
    "Completion",
    "LLMError",
    "Provider",
    "ToolCall",
    "ToolCallAssembler",
    "ToolSpec",
    "Usage",
    "check_messages",
    "tool_names",
]
