"""The HTTP API: Klein routes at the edge; nothing below this package knows HTTP."""

from __future__ import annotations

from twisted.web.resource import IResource

from aichat.api.app import API
from aichat.api.chat import ChatRoutes
from aichat.api.executions import ExecutionRoutes
from aichat.api.mcp import MCPRoutes
from aichat.api.observability import ObservabilityRoutes
from aichat.api.openai_chat import CompletionRoutes
from aichat.api.openai_responses import ResponseRoutes
from aichat.api.openai_wire import ModelRoutes
from aichat.api.routing import Routes
from aichat.api.sessions import HealthRoutes, SessionRoutes
from aichat.api.site import EdgeResource


def route_classes(api: API) -> list[Routes]:
    """One instance of each route class, given what its handlers use.

    Chat and MCP routes answer 503 while ``api.chat`` or ``api.mcp`` is absent; the OpenAI-compatible face
    (``/v1/models``, ``/v1/chat/completions``, ``/v1/responses``) drives the same chat service;
    ``/metrics``, ``/health/ready`` and ``/openapi.json`` are for operators and machines.
    """
    settings, identity, clock = api.settings, api.identity, api.clock
    return [
        HealthRoutes(api.store, clock, api.version),
        SessionRoutes(api.store, identity),
        ChatRoutes(api.chat, identity, clock, settings.chat, settings.limits, api.metrics),
        MCPRoutes(api.mcp, identity, clock),
        ModelRoutes(api.chat, identity),
        CompletionRoutes(api.chat, identity, clock, settings.chat, api.metrics),
        ResponseRoutes(api.chat, identity, clock, settings.chat, api.metrics, api.mcp),
        ExecutionRoutes(api.store, identity),
        ObservabilityRoutes(api.store, api.mcp, clock, api.metrics, settings.metrics),
    ]


def build_resource(api: API) -> IResource:
    """Mount every route class on ``api`` and wrap its resource in the edge (UTF-8 paths, CORS)."""
    api.mount(*route_classes(api))
    resource: IResource = EdgeResource(api.app.resource(), api.settings.cors.origins)
    return resource


__all__ = ["API", "build_resource", "route_classes"]
