"""``POST /v1/responses``: OpenAI's Responses API with ``mcp`` tools that name the daemon's own MCP servers.

A request's ``tools`` are ``{"type": "mcp", "server_label": <a configured server>, "allowed_tools": [...],
"require_approval": "always" | "never" | {"never": {"tool_names": [...]}} | {"always": {...}}}``; the daemon
connects only to the servers its operator configured, so a ``server_url`` is never followed and a label
that is not configured is refused. The operator's ``chat.approval`` policy is the floor: a request may ask
for more approvals, never fewer. A call that needs one ends the response with an ``mcp_approval_request``
item whose id is the daemon's durable approval (owner, expiry, decided once); the client continues with
``previous_response_id`` and ``mcp_approval_response`` input items.

A stored response's conversation is a session of the token's user (listed by ``/v1/chat/sessions``); its
id, ``resp_<session id>_<n>``, continues that session. ``store: false`` keeps nothing (the input is the
whole context, and no tool that needs an approval may be offered). Output items are ``mcp_list_tools``
(on a new conversation), ``mcp_call``, ``mcp_approval_request`` and ``message``; streamed, the events are
the SDK's ``ResponseStreamEvent`` types, each with its ``sequence_number``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
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
from aichat.chat.approvals import approval_calls
from aichat.chat.turn import ChatError, ChatService, ToolInfo, ToolScope, Turn, TurnResult, settled
from aichat.llm.tools import Failed
from aichat.mcp import MCPHost
from aichat.store.base import History

APPROVAL_ITEM = "mcpr_"
RESPONSE = "resp_"


@dataclass(frozen=True)
class McpServerTool:
    """One ``mcp`` entry of a request: which of a server's tools it offers and which it wants approved."""

    label: str
    allowed: frozenset[str] | None
    require: str  # "always" | "never" | "filter"
    never_names: frozenset[str] = frozenset()
    always_names: frozenset[str] = frozenset()

    def offers(self, tool: ToolInfo) -> bool:
        return tool.server == self.label and (self.allowed is None or tool.name in self.allowed)

    def asks(self, tool: ToolInfo) -> bool:
        if self.require == "always":
            return True
        if self.require == "never":
            return False
        if tool.name in self.always_names:
            return True
        if tool.name in self.never_names:
            return False
        # A filter naming only the tools that always ask leaves the rest free; any other asks.
        return not (self.always_names and not self.never_names)


def _names(value: Any, where: str) -> frozenset[str]:
    names = value.get("tool_names") if isinstance(value, dict) else None
    if names is None:
        return frozenset()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise invalid(f"{where}.tool_names must be an array of strings", f"{where}.tool_names")
    return frozenset(names)


def _mcp_tools(body: dict[str, Any], configured: set[str]) -> list[McpServerTool]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array", "tools")
    out = []
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid(
                f"{where}: only 'mcp' tools naming this server's MCP servers are supported, not {kind!r}",
                f"{where}.type",
            )
        label = tool.get("server_label")
        if not isinstance(label, str) or not label:
            raise invalid(f"{where}.server_label is required", f"{where}.server_label")
        if label not in configured:
            what = (
                "connects only to the MCP servers its operator configured"
                if tool.get("server_url")
                else ("has no MCP server of that name")
            )
            raise invalid(
                f"{where}.server_label '{label}': this server {what} ({', '.join(sorted(configured))})",
                f"{where}.server_label",
            )
        if tool.get("connector_id") is not None:
            raise invalid(f"{where}.connector_id: connectors are not supported", f"{where}.connector_id")
        allowed_raw = tool.get("allowed_tools")
        allowed: frozenset[str] | None
        if allowed_raw is None:
            allowed = None
        elif isinstance(allowed_raw, list) and all(isinstance(a, str) for a in allowed_raw):
            allowed = frozenset(allowed_raw)
        elif isinstance(allowed_raw, dict):
            allowed = _names(allowed_raw, f"{where}.allowed_tools")
        else:
            raise invalid(f"{where}.allowed_tools must be an array of tool names", f"{where}.allowed_tools")
        require = tool.get("require_approval", "always")
        if require is None:
            require = "always"
        if require in ("always", "never"):
            out.append(McpServerTool(label, allowed, require))
        elif isinstance(require, dict) and set(require) <= {"always", "never"}:
            out.append(
                McpServerTool(
                    label,
                    allowed,
                    "filter",
                    never_names=_names(require.get("never"), f"{where}.require_approval.never"),
                    always_names=_names(require.get("always"), f"{where}.require_approval.always"),
                )
            )
        else:
            raise invalid(
                f"{where}.require_approval must be 'always', 'never' or a tool filter", f"{where}.require_approval"
            )
    return out


def _scope(chat: ChatService, servers: Sequence[McpServerTool]) -> ToolScope:
    def entry(tool: ToolInfo) -> McpServerTool | None:
        return next((s for s in servers if s.offers(tool)), None)

    def asks(tool: ToolInfo) -> bool:
        found = entry(tool)
        return found is None or found.asks(tool)

    return ToolScope(chat.policy, offers=lambda tool: entry(tool) is not None, ask=asks)


@dataclass
class Input:
    """A request's ``input``: messages in Chat Completions shape, and approval decisions."""

    messages: list[dict[str, Any]]
    decisions: list[tuple[str, bool]]

    def user_text(self) -> str:
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "user" and m["content"])


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or an array of parts", f"{where}.content")
    texts = []
    for m, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            raise invalid(f"{where}.content[{m}]: only text parts are supported", f"{where}.content[{m}]")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _input(body: dict[str, Any]) -> Input:
    raw = body.get("input")
    if isinstance(raw, str):
        return Input([{"role": "user", "content": raw}], [])
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a string or a non-empty array of items", "input")
    messages: list[dict[str, Any]] = []
    decisions: list[tuple[str, bool]] = []
    for n, item in enumerate(raw):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
            messages.append(
                {"role": "system" if role == "developer" else role, "content": _text_of(item.get("content"), where)}
            )
        elif kind == "mcp_approval_response":
            request_id = item.get("approval_request_id")
            approve = item.get("approve")
            if not isinstance(request_id, str) or not isinstance(approve, bool):
                raise invalid(f"{where} needs approval_request_id and a boolean approve", where)
            decisions.append((request_id, approve))
        else:
            raise invalid(f"{where}: input items of type {kind!r} are not supported", f"{where}.type")
    return Input(messages, decisions)


def _session_of(response_id: str) -> str:
    session_id, _, tail = response_id.removeprefix(RESPONSE).rpartition("_")
    if not response_id.startswith(RESPONSE) or not session_id or not tail:
        raise OpenAIError(f"Previous response with id '{response_id}' not found.", 404, param="previous_response_id")
    return session_id


def _approval_of(item_id: str) -> tuple[str, int]:
    approval_id, _, index = item_id.removeprefix(APPROVAL_ITEM).rpartition("_")
    if not item_id.startswith(APPROVAL_ITEM) or not approval_id or not index.isdigit():
        raise invalid(f"Unknown approval_request_id '{item_id}'", "input")
    return approval_id, int(index)


class ResponseBuilder:
    """Builds a response's output items from a turn's events and, streamed, sends each change as the SDK's
    event types. Events before :meth:`attach` are queued (a turn may report before the stream is open)."""

    def __init__(
        self,
        chat: ChatService,
        response_id: str,
        created: int,
        model: str,
        body: dict[str, Any],
        previous: str | None,
        store: bool,
        approved: dict[str, str] | None = None,
    ) -> None:
        self._chat = chat
        self.id = response_id
        self._created = created
        self._model = model
        self._body = body
        self._previous = previous
        self._store = store
        self._approved = approved or {}
        self.output: list[dict[str, Any]] = []
        self._out: EventStream | None = None
        self._queue: list[dict[str, Any]] = []
        self._seq = 0
        self._message: dict[str, Any] | None = None
        self._text: list[str] = []
        self._calls: dict[str, dict[str, Any]] = {}

    # -- the response object ------------------------------------------------------------------------

    def response(
        self, status: str, result: TurnResult | None = None, error: OpenAIError | None = None
    ) -> dict[str, Any]:
        usage = None
        if result is not None and result.usage is not None:
            usage = {
                "input_tokens": result.usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": result.usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": result.usage.total_tokens,
            }
        instructions = self._body.get("instructions")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "error": None if error is None else {"code": "server_error", "message": error.message},
            "incomplete_details": None,
            "instructions": instructions if isinstance(instructions, str) else None,
            "metadata": self._body.get("metadata") if isinstance(self._body.get("metadata"), dict) else {},
            "model": self._model,
            "output": copy.deepcopy(self.output) if status != "in_progress" else [],
            "parallel_tool_calls": True,
            "previous_response_id": self._previous,
            "store": self._store,
            "temperature": None,
            "tool_choice": "auto",
            "tools": self._body.get("tools") or [],
            "top_p": None,
            "truncation": "disabled",
            "usage": usage,
        }

    # -- streaming ----------------------------------------------------------------------------------

    def attach(self, out: EventStream) -> None:
        self._out = out
        queued, self._queue = self._queue, []
        self._send({"type": "response.created", "response": self.response("in_progress")})
        self._send({"type": "response.in_progress", "response": self.response("in_progress")})
        for event in queued:
            self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        if self._out is None:
            self._queue.append(event)
            return
        event["sequence_number"] = self._seq
        self._seq += 1
        self._out.send(event, event=event["type"])

    def _event(self, kind: str, **fields: Any) -> None:
        self._send({"type": kind, **copy.deepcopy(fields)})

    def _add(self, item: dict[str, Any]) -> int:
        self.output.append(item)
        index = len(self.output) - 1
        self._event("response.output_item.added", output_index=index, item=item)
        return index

    def _done(self, item: dict[str, Any]) -> None:
        self._event("response.output_item.done", output_index=self.output.index(item), item=item)

    # -- items --------------------------------------------------------------------------------------

    def list_tools(self, servers: Sequence[McpServerTool]) -> None:
        offered = list(self._chat.tools.tools()) if self._chat.tools is not None else []
        for server in servers:
            item: dict[str, Any] = {
                "id": short_id("mcpl"), "type": "mcp_list_tools", "server_label": server.label, "tools": []
            }
            index = self._add(item)
            self._event("response.mcp_list_tools.in_progress", item_id=item["id"], output_index=index)
            item["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema, "annotations": None}
                for t in offered
                if server.offers(t)
            ]
            self._event("response.mcp_list_tools.completed", item_id=item["id"], output_index=index)
            self._done(item)

    def _say(self, text: str) -> None:
        if self._message is None:
            self._message = {
                "id": short_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            self._text = []
            index = self._add(self._message)
            self._event(
                "response.content_part.added",
                item_id=self._message["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        self._text.append(text)
        self._event(
            "response.output_text.delta",
            item_id=self._message["id"],
            output_index=self.output.index(self._message),
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _close_message(self) -> None:
        message, self._message = self._message, None
        if message is None:
            return
        text = "".join(self._text)
        index = self.output.index(message)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        self._event(
            "response.output_text.done",
            item_id=message["id"],
            output_index=index,
            content_index=0,
            text=text,
            logprobs=[],
        )
        self._event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0, part=part)
        message["content"] = [part]
        message["status"] = "completed"
        self._done(message)

    def _tool(self, function_name: str) -> tuple[str, str]:
        tool = self._chat.tool(function_name)
        if tool is not None:
            return tool.server, tool.name
        server, _, name = function_name.partition("__")
        return server, name or function_name

    def __call__(self, event: events.TurnEvent) -> None:
        if isinstance(event, events.TextDelta):
            self._say(event.text)
        elif isinstance(event, events.RoundAnswered):
            self._close_message()
        elif isinstance(event, events.RoundLimit):
            self._say(event.notice)
            self._close_message()
        elif isinstance(event, events.ToolStarted):
            self._close_message()
            call = event.call
            server, name = self._tool(call.name)
            arguments = call.arguments or "{}"
            item: dict[str, Any] = {
                "id": short_id("mcp"),
                "type": "mcp_call",
                "server_label": server,
                "name": name,
                "arguments": arguments,
                "output": None,
                "error": None,
                "status": "in_progress",
            }
            if call.id in self._approved:
                item["approval_request_id"] = self._approved[call.id]
            self._calls[call.id] = item
            index = self._add(item)
            self._event("response.mcp_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments)
            self._event("response.mcp_call_arguments.done", item_id=item["id"], output_index=index, arguments=arguments)
            self._event("response.mcp_call.in_progress", item_id=item["id"], output_index=index)
        elif isinstance(event, events.ToolsFinished):
            for call, execution in zip(event.calls, event.executions, strict=True):
                item = self._calls[call.id]
                index = self.output.index(item)
                if isinstance(execution, Failed):
                    item["error"] = {
                        "type": "mcp_tool_execution_error",
                        "content": [{"type": "text", "text": execution.error}],
                    }
                    item["status"] = "failed"
                    self._event("response.mcp_call.failed", item_id=item["id"], output_index=index)
                else:
                    item["output"] = execution.result
                    item["status"] = "completed"
                    self._event("response.mcp_call.completed", item_id=item["id"], output_index=index)
                self._done(item)
        elif isinstance(event, events.ApprovalRequested):
            self._close_message()
            for n, call in enumerate(approval_calls(event.approval)):
                server, name = self._tool(call.name)
                request = {
                    "id": f"{APPROVAL_ITEM}{event.approval.id}_{n}",
                    "type": "mcp_approval_request",
                    "server_label": server,
                    "name": name,
                    "arguments": call.arguments,
                }
                self._add(request)
                self._done(request)
        elif isinstance(event, events.Finished | events.Failed):
            self._close_message()

    def finish(self, result: TurnResult) -> None:
        self._send({"type": "response.completed", "response": self.response("completed", result)})

    def fail(self, result: TurnResult, error: OpenAIError) -> None:
        self._send({"type": "response.failed", "response": self.response("failed", result, error)})

    def lagged(self, message: str) -> tuple[dict[str, Any], str]:
        """The SDK's ``error`` event that ends a stream whose client fell too far behind."""
        event = {"type": "error", "code": "reader_lag", "message": message, "param": None,
                 "sequence_number": self._seq}
        self._seq += 1
        return event, "error"


def _configured(host: MCPHost | None, chat: ChatService) -> set[str]:
    names = {t.server for t in (chat.tools.tools() if chat.tools is not None else [])}
    if host is not None:
        names |= {config.name for config in host.configs()}
    return names


@dataclass
class ResponseRoutes(TurnFace):
    """``POST /v1/responses``: stored conversations (sessions) or ``store: false``, whole or streamed.

    ``host`` is the MCP host whose configured servers a request's ``mcp`` tools may name."""

    host: MCPHost | None
    app = Klein()

    @app.route("/v1/responses", methods=["POST"])
    @openai_errors
    @authorized
    async def responses(self, request: IRequest, user: str) -> bytes:
        body = read_json(request)
        chat = self.chat()
        model = check_model(chat, body)
        servers = _mcp_tools(body, _configured(self.host, chat))
        given = _input(body)
        store = flag(body, "store", True)
        stream = flag(body, "stream", False)
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise invalid("'instructions' must be a string", "instructions")
        previous = body.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise invalid("'previous_response_id' must be a string", "previous_response_id")
        scope = _scope(chat, servers)
        created = int(self.clock.seconds())

        if not store:
            if previous is not None or given.decisions:
                raise invalid(
                    "store: false keeps nothing to continue from: send the whole conversation as input",
                    "previous_response_id" if previous is not None else "input",
                )
            every = chat.tools.tools() if chat.tools is not None else []
            asking = [t.function_name for t in every if scope.offers(t) and scope.needs_approval(t.function_name, t)]
            if asking:
                raise invalid(
                    "store: false cannot wait for an approval, and these tools need one: " + ", ".join(asking),
                    "store",
                )
            messages = ([{"role": "system", "content": instructions}] if instructions else []) + given.messages
            builder = ResponseBuilder(chat, short_id("resp"), created, model, body, None, False)
            builder.list_tools(servers)
            turn = chat.start_stateless(user, messages, scope, builder)
            return await self._answer(request, chat, builder, turn, stream)

        if given.decisions and previous is None:
            raise invalid("mcp_approval_response items continue a response: send its previous_response_id", "input")
        try:
            if previous is not None:
                session, history = await chat.resume(user, _session_of(previous))
            else:
                session, history = chat.new_session(user), History()
        except ChatError as e:
            raise OpenAIError(
                f"Previous response with id '{previous}' not found.", e.status, param="previous_response_id"
            ) from None
        response_id = f"{RESPONSE}{session.id}_{short_id('r').removeprefix('r_')[:12]}"
        if given.decisions:
            if given.user_text():
                raise invalid("send approval responses without a new message, then the message", "input")
            parsed = [(_approval_of(item), approve, item) for item, approve in given.decisions]
            approval_ids = {approval_id for (approval_id, _), _, _ in parsed}
            if len(approval_ids) != 1:
                raise invalid("the approval responses must answer the requests of one response", "input")
            approval_id = approval_ids.pop()
            approval = await chat.store.get_approval(user, approval_id)
            if approval is None or approval.session_id != session.id:
                raise OpenAIError(f"approval request {approval_id} not found in this conversation", 404, param="input")
            calls = approval_calls(approval)
            if any(index >= len(calls) for (_, index), _, _ in parsed):
                raise invalid("approval_request_id names no request of that response", "input")
            chosen = [calls[index].id for (_, index), approve, _ in parsed if approve]
            approved = {calls[index].id: item for (_, index), approve, item in parsed if approve}
            builder = ResponseBuilder(chat, response_id, created, model, body, previous, True, approved)
            try:
                turn = await chat.start_resolution(
                    user,
                    approval_id,
                    bool(chosen),
                    chosen or None,
                    scope=scope,
                    listener=builder,
                    instructions=instructions,
                )
            except ChatError as e:
                raise OpenAIError(e.message, e.status, param="input") from None
        else:
            text = given.user_text()
            if not text:
                raise invalid("the input holds no user message", "input")
            if any(m["role"] == "assistant" for m in given.messages):
                raise invalid(
                    "a stored conversation keeps its own history: continue it with previous_response_id", "input"
                )
            system = "\n\n".join(m["content"] for m in given.messages if m["role"] == "system")
            builder = ResponseBuilder(chat, response_id, created, model, body, previous, True)
            if previous is None:
                builder.list_tools(servers)
            try:
                turn = chat.start_message(
                    user,
                    session,
                    text,
                    history=history,
                    scope=scope,
                    listener=builder,
                    instructions=instructions if instructions is not None else (system or None),
                )
            except ChatError as e:
                raise OpenAIError(e.message, e.status) from None
        return await self._answer(request, chat, builder, turn, stream)

    async def _answer(
        self, request: IRequest, chat: ChatService, builder: ResponseBuilder, turn: Turn, stream: bool
    ) -> bytes:
        """The response object once the turn ends; streamed, every change as it happens."""
        if not stream:
            result = await chat.wait(turn)
            if result.error is not None:
                raise turn_error(result)
            return json_response(request, builder.response("completed", result))
        out = self.event_stream(request, builder.lagged)
        builder.attach(out)
        try:
            # A client that goes away stops reading: a stored turn goes on and is stored, one kept in memory
            # is cancelled (nobody could see its outcome).
            if turn.conversation.stored:
                assert turn.done is not None
                await settled([turn.done])
            else:
                await chat.wait(turn)
            result = turn.result
            if result.error is not None:
                builder.fail(result, turn_error(result))
            else:
                builder.finish(result)
        finally:
            out.close()
        await out.flushed()
        return b""
