"""MCP routes: the tool list (reference path and the seed's), server status and restart.

The tool list and the status are open, as in the reference (they carry no user data). Restarting a server
fails every user's calls in flight on it, so it is an operator action (:func:`~aichat.api.routing.operator_only`):
an ``auth.admin_tokens`` bearer token, or a request made on this machine directly (a loopback peer, not
through a proxy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from aichat.api.app import json_response, query_arg, rfc3339_now
from aichat.api.errors import NotFound, ServiceUnavailable
from aichat.api.identity import Identity
from aichat.api.routing import operator_only
from aichat.mcp import MCPHost, UnknownServer


@dataclass
class MCPRoutes:
    """The MCP host's tools and servers; without a host (``host`` is ``None``) every route answers 503."""

    host: MCPHost | None
    identity: Identity
    clock: IReactorTime
    app = Klein()

    def running(self) -> MCPHost:
        """The MCP host, or 503."""
        if self.host is None:
            raise ServiceUnavailable("MCP support is not running")
        return self.host

    @app.route("/v1/chat/mcp/tools", methods=["GET"])
    @app.route("/api/v1/mcp/tools", methods=["GET"])
    async def tools(self, request: IRequest) -> bytes:
        host = self.running()
        force = query_arg(request, "force_refresh") == "true"
        if force:
            await host.refresh()
        body: dict[str, Any] = {
            "tools": [
                {
                    "name": tool.name,
                    "description": tool.description,
                    "input_schema": tool.input_schema,
                    "server": tool.server,
                    "function_name": tool.function_name,
                }
                for tool in host.tools()
            ]
        }
        if force:
            body["force_refresh"] = True
        return json_response(request, body)

    @app.route("/v1/chat/mcp/servers/status", methods=["GET"])
    @app.route("/api/v1/mcp/servers/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        servers = self.running().status()
        body = {"servers": servers, "timestamp": rfc3339_now(self.clock)}
        return json_response(request, body)

    @app.route("/v1/chat/mcp/servers/<string:name>/restart", methods=["POST"])
    @app.route("/api/v1/mcp/servers/<string:name>/restart", methods=["POST"])
    @operator_only
    async def restart(self, request: IRequest, name: str) -> bytes:
        host = self.running()
        try:
            await host.restart(name)
        except UnknownServer:
            raise NotFound(f"unknown MCP server: {name}") from None
        return json_response(request, {"message": f"MCP server {name} restarted", "server": name})
