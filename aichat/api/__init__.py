"""The HTTP API: Klein routes at the edge; nothing below this package knows HTTP."""

from __future__ import annotations

from twisted.web.resource import IResource

from aichat.api.app import API
from aichat.api.chat import register_chat
from aichat.api.executions import register_executions
from aichat.api.mcp import register_mcp
from aichat.api.observability import register_observability
from aichat.api.openai_chat import register_chat_completions
from aichat.api.openai_responses import register_responses
from aichat.api.openai_wire import register_models
from aichat.api.sessions import register_health, register_sessions
from aichat.api.site import EdgeResource


def build_resource(api: API) -> IResource:
    """Register every route on ``api`` and wrap its resource in the edge (UTF-8 paths, CORS).

    Chat and MCP routes find their services in ``api.services`` (``chat``, ``mcp``) and answer 503 without;
    the OpenAI-compatible face (``/v1/models``, ``/v1/chat/completions``, ``/v1/responses``) drives the same
    chat service; ``/metrics``, ``/health/ready`` and ``/openapi.json`` are for operators and machines.
    """
    register_health(api)
    register_sessions(api)
    register_chat(api)
    register_mcp(api)
    register_models(api)
    register_chat_completions(api)
    register_responses(api)
    register_executions(api)
    register_observability(api)
    resource: IResource = EdgeResource(api.app.resource(), api.settings.cors.origins)
    return resource


__all__ = ["API", "build_resource"]
