"""Where the tool executions of chat completions are seen: by their user, per completion, and by operators.

``POST /v1/chat/completions`` keeps no session (the client's messages are its context), so the tool calls
it runs server-side are stored apart, by user and completion id (``tool_executions``), rather than on a
session's tool messages as a chat turn's are. Their user reads a completion's executions at
``GET /v1/chat/completions/<id>/tool_executions`` (OpenAI's list shape and errors, as the rest of that
face); an operator (an ``auth.admin_tokens`` token, or a direct local call) lists anyone's, newest first, at
``GET /v1/tool_executions`` with ``user_id``, ``completion_id`` and the reference's ``page``/``limit``.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from aichat.api.app import API, json_response, page_args, query_arg
from aichat.api.openai_wire import OpenAIError, openai_errors

#: The most executions one completion's listing returns (its tool rounds are capped well below).
PER_COMPLETION = 1000


def register_executions(api: API) -> None:
    """``GET /v1/chat/completions/<id>/tool_executions`` and ``GET /v1/tool_executions``."""
    store = api.store

    @api.route("/v1/chat/completions/<string:completion_id>/tool_executions", methods=["GET"])
    @openai_errors
    async def of_completion(request: IRequest, completion_id: str) -> bytes:
        user = api.user(request)
        found = await store.list_tool_executions(user, completion_id, PER_COMPLETION, 0)
        if not found:
            raise OpenAIError(
                f"No tool executions are stored for completion '{completion_id}'", 404, param="completion_id",
                code="not_found",
            )
        data = [execution.to_json() for execution in reversed(found)]
        return json_response(request, {"object": "list", "completion_id": completion_id, "data": data})

    @api.route("/v1/tool_executions", methods=["GET"])
    async def listing(request: IRequest) -> bytes:
        api.identity.operator(request)
        page, limit, offset = page_args(request, 50)
        found = await store.list_tool_executions(
            query_arg(request, "user_id"), query_arg(request, "completion_id"), limit, offset
        )
        body = {
            "executions": [execution.to_json() for execution in found],
            "pagination": {"page": page, "limit": limit, "offset": offset},
        }
        return json_response(request, body)
