"""The Anthropic Messages API as a scripted upstream (``Upstream(reactor, wire=ClaudeWire())``).

It answers ``POST /v1/messages`` as the real API does: ``x-api-key`` (or a bearer token) checked (401
``authentication_error``), ``anthropic-version`` required, the body checked for what the API refuses
with a 400 ``invalid_request_error`` (no ``max_tokens``, a ``system`` role in ``messages``, a first
message that is not the user's, an empty text block, ``tool_use`` blocks not answered by ``tool_result``
blocks at the start of the next user message, a ``tool_result`` answering no call); errors are
``{"type": "error", "error": {"type", "message"}}``. A stream is named events with a blank line after
each (:class:`tests.upstream.Event`): ``message_start``, ``ping``, per block ``content_block_start`` /
``content_block_delta`` (``text_delta``, ``input_json_delta``) / ``content_block_stop``,
``message_delta`` with ``stop_reason`` and usage, ``message_stop``.

Builders: :func:`claude_stream` (text and tool_use blocks, input JSON cut in pieces), :func:`claude_error`
(status, error type, ``retry-after`` / ``retry-after-ms``), :func:`error_event` (``overloaded_error``
mid-stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.upstream import Event, Script, Sleep, Step, Upstream

MODEL = "claude-test"


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` block: the call's id, the tool's name and its input as JSON text."""

    id: str
    name: str
    input: str


def _pieces(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, count)))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def claude_stream(
    *blocks: str | ToolUse,
    stop_reason: str | None = None,
    pieces: int = 3,
    model: str = MODEL,
    usage: tuple[int, int] = (12, 7),
    delay: float = 0.0,
    pings: int = 1,
) -> Script:
    """A whole Messages stream of ``blocks``; ``stop_reason`` defaults to ``tool_use`` when there are
    calls, else ``end_turn``. Text is sent in ``pieces`` deltas, tool input in ``pieces`` fragments."""
    calls = any(isinstance(block, ToolUse) for block in blocks)
    steps: list[Step] = [
        Event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01test",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": usage[0], "output_tokens": 1},
                },
            },
        )
    ]
    steps += [Event("ping", {"type": "ping"})] * pings
    for index, block in enumerate(blocks):
        if isinstance(block, ToolUse):
            start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in ["", *_pieces(block.input, pieces)]]
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(block, pieces)]
        opened = {"type": "content_block_start", "index": index, "content_block": start}
        steps.append(Event("content_block_start", opened))
        for delta in deltas:
            if delay:
                steps.append(Sleep(delay))
            steps.append(Event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        steps.append(Event("content_block_stop", {"type": "content_block_stop", "index": index}))
    steps.append(
        Event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason or ("tool_use" if calls else "end_turn"), "stop_sequence": None},
                "usage": {"output_tokens": usage[1]},
            },
        )
    )
    steps.append(Event("message_stop", {"type": "message_stop"}))
    return Script(steps, headers={"Content-Type": "text/event-stream; charset=utf-8", "request-id": "req_test"})


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def claude_error(
    status: int, kind: str, message: str, *, retry_after: str | None = None, retry_after_ms: str | None = None
) -> Script:
    """An error answer in the API's shape, with ``retry-after`` / ``retry-after-ms`` when given."""
    headers = {"Content-Type": "application/json", "request-id": "req_test"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    if retry_after_ms is not None:
        headers["retry-after-ms"] = retry_after_ms
    return Script([], status=status, headers=headers, body=error_body(kind, message))


def error_event(kind: str = "overloaded_error", message: str = "Overloaded") -> Event:
    """The ``error`` event the API sends mid-stream."""
    return Event("error", {"type": "error", "error": {"type": kind, "message": message}})


def refusal(body: Any) -> str | None:
    """What the API answers 400 to in ``body``, or ``None``."""
    if not isinstance(body, dict):
        return "messages: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    pending: set[str] = set()
    known: set[str] = set()
    for n, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{n}.role: Input should be 'user' or 'assistant'"
        if n == 0 and role != "user":
            return "messages: first message must use the \"user\" role"
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            return f"messages.{n}: all messages must have non-empty content"
        results = 0
        for m, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text" and not block.get("text"):
                return f"messages.{n}.content.{m}.text: text content blocks must be non-empty"
            if kind == "tool_use":
                if role != "assistant":
                    return f"messages.{n}.content.{m}: tool_use blocks are only allowed in assistant messages"
                pending.add(block["id"])
                known.add(block["id"])
            if kind == "tool_result":
                if block.get("tool_use_id") not in known:
                    return f"messages.{n}.content.{m}: unexpected `tool_use_id` found in `tool_result` blocks"
                if m != results:
                    return f"messages.{n}: tool_result blocks must come first in the user message"
                results += 1
                pending.discard(block["tool_use_id"])
        if role == "user" and pending:
            return (
                f"messages.{n}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                + ", ".join(sorted(pending))
            )
    return None


class ClaudeWire:
    """Routes requests as the Messages API does; the default answer echoes the last user text."""

    def route(self, upstream: Upstream, method: str, uri: str, headers: dict[str, str], body: Any) -> Script:
        path = uri.split("?", 1)[0]
        if path != "/v1/messages":
            return claude_error(404, "not_found_error", f"Not found: {path}")
        if method != "POST":
            return claude_error(405, "invalid_request_error", "Method not allowed")
        # The key in x-api-key (what we send); the official SDK of this version sends it as a bearer token.
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if upstream.api_key is not None and given != upstream.api_key:
            return claude_error(401, "authentication_error", "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return claude_error(400, "invalid_request_error", "anthropic-version: header is required")
        problem = refusal(body)
        if problem is not None:
            return claude_error(400, "invalid_request_error", problem)
        if upstream.scripts:
            return upstream.scripts.popleft()
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(b.get("text", "") for b in last if b.get("type") == "text")
        return claude_stream(f"Echo: {text}".strip())
