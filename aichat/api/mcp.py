"""MCP routes: the tool list (reference path and the seed's), server status and restart.

The tool list and the status are open, as in the reference (they carry no user data). Restarting a server
fails every user's calls in flight on it, so it is an operator action: an ``auth.admin_tokens`` bearer
token, or a request made on this machine directly (a loopback peer, not through a proxy).
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from aichat.api.app import API, json_response, query_arg, rfc3339_now
from aichat.api.errors import NotFound, ServiceUnavailable
from aichat.mcp import MCPHost, UnknownServer


def _host(api: API) -> MCPHost:
    host: MCPHost | None = api.services.get("mcp")
    if host is None:
        raise ServiceUnavailable("MCP support is not running")
    return host


def register_mcp(api: API) -> None:
    """The MCP routes."""

    @api.route("/v1/chat/mcp/tools", methods=["GET"])
    @api.route("/api/v1/mcp/tools", methods=["GET"])
    async def tools(request: IRequest) -> bytes:
        host = _host(api)
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

    @api.route("/v1/chat/mcp/servers/status", methods=["GET"])
    @api.route("/api/v1/mcp/servers/status", methods=["GET"])
    def status(request: IRequest) -> bytes:
        host = _host(api)
        servers = host.status()
        body = {"servers": servers, "timestamp": rfc3339_now(api.clock)}
        return json_response(request, body)

    @api.route("/v1/chat/mcp/servers/<string:name>/restart", methods=["POST"])
    @api.route("/api/v1/mcp/servers/<string:name>/restart", methods=["POST"])
    async def restart(request: IRequest, name: str) -> bytes:
        api.identity.operator(request)
        host = _host(api)
        try:
            await host.restart(name)
        except UnknownServer:
            raise NotFound(f"unknown MCP server: {name}") from None
        return json_response(request, {"message": f"MCP server {name} restarted", "server": name})
