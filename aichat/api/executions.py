"""Where the tool executions of chat completions are seen: by their user, per completion, and by operators.

``POST /v1/chat/completions`` keeps no session (the client's messages are its context), so the tool calls
it runs server-side are stored apart, by user and completion id (``tool_executions``), rather than on a
session's tool messages as a chat turn's are. Their user reads a completion's executions at
``GET /v1/chat/completions/<id>/tool_executions`` (OpenAI's list shape and errors, as the rest of that
face); an operator (an ``auth.admin_tokens`` token, or a direct local call) lists anyone's, newest first, at
``GET /v1/tool_executions`` with ``user_id``, ``completion_id`` and the reference's ``page``/``limit``.
"""

from __future__ import annotations

from dataclasses import dataclass

from klein import Klein
from twisted.web.iweb import IRequest

from aichat.api.app import json_response, query_arg
from aichat.api.identity import Identity
from aichat.api.openai_wire import OpenAIError, openai_errors
from aichat.api.pagination import Page
from aichat.api.routing import authorized, operator_only
from aichat.store.base import Store

#: The most executions one completion's listing returns (its tool rounds are capped well below).
PER_COMPLETION = 1000


@dataclass
class ExecutionRoutes:
    """``GET /v1/chat/completions/<id>/tool_executions`` (its user's) and ``GET /v1/tool_executions`` (operators')."""

    store: Store
    identity: Identity
    app = Klein()

    @app.route("/v1/chat/completions/<string:completion_id>/tool_executions", methods=["GET"])
    @openai_errors
    @authorized
    async def of_completion(self, request: IRequest, user: str, completion_id: str) -> bytes:
        found = await self.store.list_tool_executions(user, completion_id, PER_COMPLETION, 0)
        if not found:
            raise OpenAIError(
                f"No tool executions are stored for completion '{completion_id}'", 404, param="completion_id",
                code="not_found",
            )
        data = [execution.to_json() for execution in reversed(found)]
        return json_response(request, {"object": "list", "completion_id": completion_id, "data": data})

    @app.route("/v1/tool_executions", methods=["GET"])
    @operator_only
    async def listing(self, request: IRequest) -> bytes:
        page = Page.of(request, 50)
        found = await self.store.list_tool_executions(
            query_arg(request, "user_id"), query_arg(request, "completion_id"), page.limit, page.offset
        )
        return json_response(request, page.body("executions", (execution.to_json() for execution in found)))
