"""Claude: the Anthropic Messages API wire format, on the shared streaming transport.

One call of :meth:`ClaudeProvider.complete` is one ``POST {base_url}/v1/messages`` with ``stream: true``,
headers ``x-api-key`` and ``anthropic-version: 2023-06-01``. The request is built from the
provider-neutral history (:mod:`aichat.llm.wire`): system messages become the top-level ``system``;
assistant tool calls become ``tool_use`` blocks; tool results go back in one user message whose content
begins with their ``tool_result`` blocks (``tool_use_id``, ``is_error``); consecutive messages of one
role are merged (the API wants turns to alternate); images are ``image`` blocks. Tools are
``{name, description, input_schema}``; ``max_tokens`` is required, so it always has a value.

The stream is a sequence of named events: ``message_start`` (model, input tokens), ``content_block_start``
(a ``text`` block, or a ``tool_use`` block with the call's id and name), ``content_block_delta``
(``text_delta`` text, passed on at once; ``input_json_delta`` fragments of the call's input, joined),
``content_block_stop``, ``message_delta`` (``stop_reason``, output tokens), ``message_stop`` (the end),
any number of ``ping``, and ``error`` (e.g. ``overloaded_error``), which fails the call and is retried
while nothing has been passed on. 429 and 529 answers are retried before the first token, honouring
``retry-after`` and ``retry-after-ms`` (the transport's rules).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.web.http_headers import Headers

from aichat.llm.provider import Completion, LLMError, Usage
from aichat.llm.streaming import StreamingProvider
from aichat.llm.tools import ToolCall, ToolSpec
from aichat.llm.wire import (
    Image,
    call_names,
    finish_reason,
    parts_of,
    system_text,
    text_of,
    tool_calls_of,
)
from aichat.sse import SSEEvent
from aichat.transport.exchange import Errors, StreamingClient, error_fields

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
#: Request fields the client sets itself; ``llm.options`` cannot override them.
OWN_FIELDS = frozenset({"model", "messages", "system", "tools", "stream"})
#: Mid-stream error types worth another attempt (before any output).
RETRYABLE_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})


def request_body(
    model: str,
    messages: list[dict[str, Any]],
    tools: Sequence[ToolSpec] | None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Messages API body for one streamed completion of the neutral ``messages``."""
    body: dict[str, Any] = {key: value for key, value in (extra or {}).items() if key not in OWN_FIELDS}
    body.setdefault("max_tokens", max_tokens)
    body.update(model=model, messages=wire_messages(messages), stream=True)
    system = system_text(messages)
    if system:
        body["system"] = system
    if tools:
        body["tools"] = [
            {"name": tool.name, "description": tool.description or "", "input_schema": tool.schema}
            for tool in tools
        ]
    if temperature is not None and "temperature" not in body:
        body["temperature"] = temperature
    return body


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The neutral history as Messages API turns (system messages left out: they go in ``system``)."""
    names = call_names(messages)
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]], *, first: bool = False) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            previous = turns[-1]["content"]
            turns[-1]["content"] = blocks + previous if first else previous + blocks
        else:
            turns.append({"role": role, "content": blocks})

    for message in messages:
        role = message.get("role")
        if role == "user":
            add("user", [_user_block(part) for part in parts_of(message.get("content"))])
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = text_of(message.get("content"))
            if text.strip():
                blocks.append({"type": "text", "text": text})
            for call in tool_calls_of(message):
                blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": call.parsed_arguments()})
            add("assistant", blocks)
        elif role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            if call_id not in names:
                continue
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": text_of(message.get("content")) or "(no output)",
            }
            if message.get("is_error"):
                result["is_error"] = True
            _add_result(turns, result)
    return turns


def _add_result(turns: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """A tool result goes into the user turn after the calls, before any text of that turn."""
    if turns and turns[-1]["role"] == "user":
        content = turns[-1]["content"]
        at = next((n for n, block in enumerate(content) if block.get("type") != "tool_result"), len(content))
        content.insert(at, result)
    else:
        turns.append({"role": "user", "content": [result]})


def _user_block(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if part.url:
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    return {"type": "image", "source": {"type": "base64", "media_type": part.mime_type, "data": part.data}}


@dataclass
class _Block:
    """A content block of the answer as it streams: its type and, for a ``tool_use`` block, the call's id,
    name and input (whole in the start event, or in ``input_json_delta`` pieces)."""

    type: object
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None
    pieces: list[str] = field(default_factory=list)
    stopped: bool = False


class EventStream:
    """The sink for one Messages API response: named events (or one ``message`` object) to a Completion."""

    def __init__(self, errors: Errors, on_text: Callable[[str], None] | None) -> None:
        self._errors = errors
        self._on_text = on_text
        self.started = False
        self.done = False
        self.garbage = 0
        self._text: list[str] = []
        self._blocks: dict[int, _Block] = {}
        self._stop_reason: str | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._usage_seen = False
        self._model: str | None = None

    def completion(self) -> Completion:
        calls = self._calls()
        usage = (
            Usage(self._input_tokens, self._output_tokens, self._input_tokens + self._output_tokens)
            if self._usage_seen
            else None
        )
        reason = finish_reason(self._stop_reason, bool(calls)) if self._stop_reason else None
        return Completion("".join(self._text), calls, reason, usage, self._model)

    def _calls(self) -> list[ToolCall]:
        calls = []
        for index in sorted(self._blocks):
            block = self._blocks[index]
            if block.type != "tool_use":
                continue
            arguments = "".join(block.pieces) if block.pieces else json.dumps(block.input or {})
            calls.append(ToolCall(block.id, block.name, arguments if arguments.strip() else "{}"))
        return calls

    def end(self, status: int) -> None:
        open_calls = [b for b in self._blocks.values() if b.type == "tool_use" and not b.stopped]
        if open_calls:
            raise self._errors(
                "the model's stream was cut short inside a tool call (no content_block_stop)",
                code="connection",
                retryable=True,
            )
        if not (self._text or self._blocks or self._stop_reason):
            raise self._errors(
                "the model returned an empty answer: its stream ended without content or message_stop",
                status=status,
                code="empty",
            )

    def event(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data:
            return
        try:
            payload = json.loads(data)
        except ValueError:
            self.garbage += 1
            return
        if not isinstance(payload, dict):
            self.garbage += 1
            return
        kind = payload.get("type") or event.event
        if kind == "error" or event.event == "error":
            self._fail(payload, data)
        elif kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    self._model = message["model"]
                self._read_usage(message.get("usage"))
        elif kind == "content_block_start":
            block = payload.get("content_block")
            index = payload.get("index")
            if isinstance(block, dict) and isinstance(index, int):
                self._start_block(index, block)
        elif kind == "content_block_delta":
            self._delta(payload.get("index"), payload.get("delta"))
        elif kind == "content_block_stop":
            block = self._blocks.get(payload.get("index"))  # type: ignore[arg-type]
            if block is not None:
                block.stopped = True
        elif kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self._stop_reason = delta["stop_reason"]
            self._read_usage(payload.get("usage"))
        elif kind == "message_stop":
            self.done = True
        # ping, and event types added later, carry nothing we use.

    def _start_block(self, index: int, block: dict[str, Any]) -> None:
        kind = block.get("type")
        entry = _Block(kind)
        if kind == "tool_use":
            entry.id, entry.name = str(block.get("id") or ""), str(block.get("name") or "")
            entry.input = block.get("input") if isinstance(block.get("input"), dict) else None
        self._blocks[index] = entry
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            self._emit(block["text"])

    def _delta(self, index: Any, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
            self._emit(delta["text"])
        elif kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            block = self._blocks.get(index)
            if block is not None and block.type == "tool_use":
                block.pieces.append(delta["partial_json"])
        # thinking_delta, signature_delta, citations_delta: not part of the answer's text.

    def _read_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        try:
            if "input_tokens" in usage:
                self._input_tokens = int(usage.get("input_tokens") or 0) + int(
                    usage.get("cache_read_input_tokens") or 0
                ) + int(usage.get("cache_creation_input_tokens") or 0)
            if "output_tokens" in usage:
                self._output_tokens = int(usage.get("output_tokens") or 0)
        except (TypeError, ValueError):
            return
        self._usage_seen = True

    def _fail(self, payload: dict[str, Any], data: str) -> None:
        message, code = error_fields(payload)
        raise self._errors.failed(
            "the model failed mid-stream",
            self._errors.scrub(message or data),
            code=code,
            status=529 if code == "overloaded_error" else None,
            retryable=code in RETRYABLE_ERRORS,
        )

    def whole(self, raw: bytes) -> None:
        """A server that ignored ``stream: true`` and sent one ``message`` object."""
        errors = self._errors
        try:
            document = json.loads(raw)
        except ValueError:
            raise errors.failed("the model sent invalid JSON", errors.text(raw), code="protocol") from None
        if not isinstance(document, dict):
            raise errors.failed("the model sent unexpected JSON", errors.text(raw), code="protocol")
        if document.get("type") == "error":
            self._fail(document, errors.text(raw))
        if isinstance(document.get("model"), str):
            self._model = document["model"]
        self._read_usage(document.get("usage"))
        for index, block in enumerate(document.get("content") or ()):
            if isinstance(block, dict):
                self._start_block(index, block)
                self._blocks[index].stopped = True
        if isinstance(document.get("stop_reason"), str):
            self._stop_reason = document["stop_reason"]
        self.done = True

    def _emit(self, text: str) -> None:
        self._text.append(text)
        self.started = True
        if self._on_text is not None:
            self._on_text(text)


class ClaudeProvider(StreamingProvider):
    """A :class:`~aichat.llm.provider.Provider` for the Anthropic Messages API (``claude`` | ``anthropic``)."""

    def __init__(
        self,
        *,
        client: StreamingClient,
        model: str,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "claude",
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self._configure(client, name=name, model=model, api_key=api_key, base_url=base_url,
                        default_base_url=DEFAULT_BASE_URL, temperature=temperature, extra_body=extra_body)
        self.max_tokens = max_tokens

    @property
    def url(self) -> str:
        """The Messages endpoint (``/v1`` is not doubled when the base URL already ends with it)."""
        return f"{self.base_url}/messages" if self.base_url.endswith("/v1") else f"{self.base_url}/v1/messages"

    def _headers(self) -> Headers:
        return Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"text/event-stream"],
                b"User-Agent": [b"aichat-backend"],
                b"x-api-key": [self._api_key.encode()],
                b"anthropic-version": [API_VERSION.encode()],
            }
        )

    def request_body(self, messages: list[dict[str, Any]], tools: Sequence[ToolSpec] | None) -> dict[str, Any]:
        """The JSON body sent for one completion."""
        return request_body(
            self.model,
            messages,
            tools,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            extra=self.extra_body,
        )

    def _sink(self, errors: Any, on_text: Callable[[str], None] | None) -> EventStream:
        return EventStream(errors, on_text)


__all__ = ["DEFAULT_BASE_URL", "ClaudeProvider", "EventStream", "LLMError", "request_body"]
