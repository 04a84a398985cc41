"""An offline, deterministic model for demos, ``make run`` without a key, and tests: no network at all.

It answers from the last message of the history, streaming the answer word by word (``delay`` seconds
between words on the injected reactor; 0 by default):

- The last user message holds lines of the form ``call <tool_name> <json arguments>`` (arguments
  optional, ``{}`` when absent), and every named tool is among ``tools``: it returns those tool calls, in
  order, as parallel calls (ids ``call_mock_<n>``), with no text and ``finish_reason`` ``tool_calls``. The
  arguments are passed through as written, so invalid JSON can be sent on purpose. Other lines of the
  message are ignored. A named tool that is not offered gets the text
  ``Mock cannot call 'x': no such tool. Available tools: N``.
- ``loop <tool_name> <json arguments>`` instead of ``call`` asks for that call again after each tool
  result, for ever: a model that never stops calling tools (for round caps).
- The last message is a ``tool`` result: it answers
  ``Mock summary of N tool result(s): <name>: <result text> | <name>: <result text>``, covering the tool
  results after the last assistant message.
- Anything else: ``Mock response to: '<last user text>'. Available tools: N`` (the reference mock's text,
  without its word ``streaming``). For a one-shot prompt with no tools, N is 0.

Usage counts are words, so they are deterministic too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from aichat.llm.provider import Completion, Usage, check_messages, tool_names
from aichat.llm.tools import ToolCall, ToolSpec

log = Logger()

_COMMAND = re.compile(r"^\s*(call|loop)\s+([A-Za-z0-9_.:\-]+)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Reply:
    """What the mock model says for a history: text, or tool calls."""

    text: str
    tool_calls: list[ToolCall]


def text_of(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a list (images noted)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        images = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "image_url":
                images += 1
        if images:
            texts.append(f"[{images} image(s)]")
        return " ".join(texts)
    return ""


def _commands(text: str) -> list[tuple[str, str, str]]:
    found = []
    for line in text.splitlines():
        match = _COMMAND.match(line)
        if match:
            verb, name, arguments = match.groups()
            found.append((verb, name, arguments or "{}"))
    return found


def plan_reply(messages: list[dict[str, Any]], tools: Sequence[ToolSpec] | None) -> Reply:
    """The mock model's deterministic answer to ``messages`` (see the module docstring)."""
    offered = tool_names(tools)
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    user_text = text_of(last_user.get("content")) if last_user else ""
    commands = _commands(user_text)
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        loops = [c for c in commands if c[0] == "loop"]
        if loops and all(name in offered for _, name, _ in loops):
            return Reply("", _calls(loops, messages))
        return Reply(_summary(messages), [])
    if last.get("role") == "user" and commands:
        missing = [name for _, name, _ in commands if name not in offered]
        if missing:
            return Reply(f"Mock cannot call '{missing[0]}': no such tool. Available tools: {len(offered)}", [])
        return Reply("", _calls(commands, messages))
    return Reply(f"Mock response to: '{user_text}'. Available tools: {len(offered)}", [])


def _calls(commands: list[tuple[str, str, str]], messages: list[dict[str, Any]]) -> list[ToolCall]:
    # Ids must differ between rounds of one turn, so count the calls already in the history.
    earlier = sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")
    return [
        ToolCall(id=f"call_mock_{earlier + n}", name=name, arguments=arguments)
        for n, (_, name, arguments) in enumerate(commands, start=1)
    ]


def _summary(messages: list[dict[str, Any]]) -> str:
    start = max((n for n, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    names: dict[str, str] = {}
    if start >= 0:
        for call in messages[start].get("tool_calls") or ():
            if isinstance(call, dict):
                names[str(call.get("id"))] = str((call.get("function") or {}).get("name", "tool"))
    results = [m for m in messages[start + 1 :] if m.get("role") == "tool"]
    parts = [f"{names.get(str(m.get('tool_call_id')), 'tool')}: {text_of(m.get('content'))}" for m in results]
    return f"Mock summary of {len(results)} tool result(s): " + " | ".join(parts)


def words(text: str) -> list[str]:
    """Split ``text`` into deltas that concatenate back to it: each word with the space after it."""
    return re.findall(r"\S+\s*|\s+", text)


class MockProvider:
    """The offline :class:`~aichat.llm.provider.Provider`; logs a warning when created.

    ``reactor`` is needed only when ``delay`` (seconds between words) is above zero.
    """

    def __init__(
        self,
        reactor: IReactorTime | None = None,
        *,
        model: str = "mock-model",
        name: str = "mock",
        delay: float = 0.0,
    ) -> None:
        if delay > 0 and reactor is None:
            raise ValueError("the mock provider needs a reactor to stream with a delay")
        self.name = name
        self.model = model
        self.delay = delay
        self._reactor = reactor
        log.warn(
            "LLM provider is the offline MOCK provider (model {model}): answers are canned, no model is called",
            model=model,
        )

    def __repr__(self) -> str:
        return f"MockProvider(model={self.model!r}, delay={self.delay!r})"

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolSpec] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Stream the deterministic reply; cancellation stops it between words."""
        check_messages(messages)
        reply = plan_reply(messages, tools)
        for n, word in enumerate(words(reply.text)):
            if self.delay > 0 and n > 0:
                assert self._reactor is not None
                await deferLater(self._reactor, self.delay)
            if on_text is not None:
                on_text(word)
        prompt_tokens = sum(len(text_of(m.get("content")).split()) for m in messages)
        completion_tokens = len(reply.text.split()) + sum(
            len(json.dumps(c.to_openai()).split()) for c in reply.tool_calls
        )
        return Completion(
            text=reply.text,
            tool_calls=reply.tool_calls,
            finish_reason="tool_calls" if reply.tool_calls else "stop",
            usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
            model=self.model,
        )

    async def close(self) -> None:
        """Nothing to release."""
