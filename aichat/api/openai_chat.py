"""``POST /v1/chat/completions``: OpenAI's Chat Completions over the daemon's tool loop.

The client's messages are the context (no session is kept). The model is offered the MCP tools that the
operator's ``chat.approval`` policy lets run without a person (``never``, or ``auto`` globs), and those calls
run server-side in the same loop as a chat turn (round cap, concurrency, timeouts, stored executions: by
user and completion id, see :mod:`aichat.api.executions`, since there is no session); tools that need an
approval are not offered here. Tools the client sends in ``tools`` are offered too, and a call to one ends
the answer with ``finish_reason: "tool_calls"`` for the client to run. Streamed, the chunks are OpenAI's: a
role chunk, content deltas, the client's tool calls, a finish chunk, the usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``; server-side tool work never shows in the
content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from aichat.api.app import json_response, read_json
from aichat.api.openai_wire import (
    EventStream,
    OpenAIError,
    TurnFace,
    check_model,
    flag,
    invalid,
    openai_errors,
    short_id,
    turn_error,
)
from aichat.api.routing import authorized
from aichat.chat import events
from aichat.chat.turn import ChatService, ToolScope, TurnResult
from aichat.llm.tools import ToolSpec

#: Request fields we accept and do not act on (sampling is the operator's ``llm.options``).
IGNORED = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "user",
        "metadata",
        "parallel_tool_calls",
        "store",
        "service_tier",
        "logit_bias",
        "prompt_cache_key",
        "safety_identifier",
        "reasoning_effort",
        "verbosity",
    }
)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``messages``, checked and in the form every upstream takes (``developer`` is sent
    as ``system``; only the fields the Chat Completions API defines are kept)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array", "messages")
    out: list[dict[str, Any]] = []
    for n, message in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"{where}.content must be a string or an array of parts", f"{where}.content")
        if isinstance(content, list):
            for m, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                    raise invalid(f"{where}.content[{m}] must be a text or image_url part", f"{where}.content[{m}]")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise invalid(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id")
            entry["tool_call_id"] = message["tool_call_id"]
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
                for c in calls
            ):
                raise invalid(f"{where}.tool_calls must be an array of function calls", f"{where}.tool_calls")
            entry["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": str(c["function"].get("name", "")),
                        "arguments": str(c["function"].get("arguments") or "{}"),
                    },
                }
                for c in calls
            ]
            if content is None:
                entry["content"] = ""
        elif content is None:
            raise invalid(f"{where}.content is required", f"{where}.content")
        out.append(entry)
    return out


def _client_tools(body: dict[str, Any], chat: ChatService) -> list[ToolSpec]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array", "tools")
    server = {t.function_name for t in (chat.tools.tools() if chat.tools is not None else [])}
    out = []
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise invalid(f"{where} must be a function tool", where)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"{where}.function.name is required", f"{where}.function.name")
        if name in server:
            raise invalid(
                f"{where}.function.name '{name}' is the name of one of this server's own tools",
                f"{where}.function.name",
            )
        description = function.get("description")
        out.append(
            ToolSpec(
                name,
                description if isinstance(description, str) else None,
                function.get("parameters") or {"type": "object"},
            )
        )
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n not in (1, None):
        raise invalid("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise invalid("logprobs are not supported", "logprobs")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise invalid("the legacy 'functions' parameter is not supported: use 'tools'", "functions")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise invalid("only the 'text' response_format is supported", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise invalid("only text output is supported", "modalities")


def _scope(chat: ChatService, body: dict[str, Any], client_tools: list[ToolSpec]) -> ToolScope:
    """The MCP tools no person needs to approve, plus the client's; ``tool_choice: "none"`` offers none."""
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none", None):
        raise invalid("tool_choice must be 'auto' or 'none'", "tool_choice")
    policy = chat.policy
    if choice == "none":
        return ToolScope(policy, offers=lambda tool: False)
    return ToolScope(
        policy,
        offers=lambda tool: not policy.needs_approval(tool.function_name, tool.server, tool.name),
        client_tools=client_tools,
    )


def _usage(result: TurnResult) -> dict[str, int]:
    usage = result.usage
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _finish_reason(result: TurnResult) -> str:
    if result.client_calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


class ChunkWriter:
    """Presents a turn as ``chat.completion.chunk`` events on an SSE response."""

    def __init__(self, out: EventStream, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._out = out
        self._id = completion_id
        self._created = created
        self._model = model
        self._usage = include_usage

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> None:
        body: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._usage:
            body["usage"] = None
        body.update(extra)
        self._out.send(body)

    def __call__(self, event: events.TurnEvent) -> None:
        if isinstance(event, events.TextDelta):
            self.chunk({"content": event.text})
        elif isinstance(event, events.RoundLimit):
            self.chunk({"content": event.notice})

    def finish(self, result: TurnResult) -> None:
        if result.client_calls:
            self.chunk(
                {
                    "tool_calls": [
                        {"index": n, "id": c.id, "type": "function", "function": c.to_openai()["function"]}
                        for n, c in enumerate(result.client_calls)
                    ]
                }
            )
        self.chunk({}, _finish_reason(result))
        if self._usage:
            self.chunk(None, usage=_usage(result))
        self._out.send("[DONE]")

    def fail(self, error: OpenAIError) -> None:
        self._out.send(error.body())


def lagged(message: str) -> tuple[dict[str, Any], None]:
    """The error chunk that ends a stream whose client fell too far behind (as ``fail`` writes errors)."""
    return OpenAIError(message, 500, code="reader_lag").body(), None


@dataclass
class CompletionRoutes(TurnFace):
    """``POST /v1/chat/completions``, answered whole or streamed as chunks."""

    app = Klein()

    @app.route("/v1/chat/completions", methods=["POST"])
    @openai_errors
    @authorized
    async def completions(self, request: IRequest, user: str) -> bytes:
        body = read_json(request)
        chat = self.chat()
        model = check_model(chat, body)
        _refuse_unsupported(body)
        messages = _messages(body)
        scope = _scope(chat, body, _client_tools(body, chat))
        stream = flag(body, "stream", False)
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not stream):
            raise invalid("stream_options is only allowed with stream: true, as an object", "stream_options")
        include_usage = bool(options and options.get("include_usage"))
        completion_id = short_id("chatcmpl")
        created = int(self.clock.seconds())
        if not stream:
            turn = chat.start_stateless(user, messages, scope, lambda event: None, request_id=completion_id)
            result = await chat.wait(turn)
            if result.error is not None:
                raise turn_error(result)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(result.text) or (None if result.client_calls else ""),
                "refusal": None,
                "annotations": [],
            }
            if result.client_calls:
                message["tool_calls"] = [call.to_openai() for call in result.client_calls]
            answer = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(result)}
                ],
                "usage": _usage(result),
            }
            return json_response(request, answer)
        out = self.event_stream(request, lagged)
        writer = ChunkWriter(out, completion_id, created, model, include_usage)
        writer.chunk({"role": "assistant", "content": "", "refusal": None})
        try:
            turn = chat.start_stateless(user, messages, scope, writer, request_id=completion_id)
            result = await chat.wait(turn)
            if result.error is not None:
                writer.fail(turn_error(result))
            else:
                writer.finish(result)
        finally:
            out.close()
        await out.flushed()
        return b""
