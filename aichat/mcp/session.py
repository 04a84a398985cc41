"""The MCP client protocol over any JSON-RPC peer: handshake, tool discovery, tool calls.

Implements the client side of MCP 2025-06-18 (and accepts servers that answer 2025-03-26 or 2024-11-05):
``initialize`` then ``notifications/initialized``; ``tools/list`` followed through every ``nextCursor``;
``tools/call`` with a timeout, and ``notifications/cancelled`` for every request we stop waiting for.
Server-to-client requests get ``ping`` -> ``{}``, ``roots/list`` -> no roots, anything else -32601.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from aichat.mcp.jsonrpc import METHOD_NOT_FOUND, JSONRPCPeer, RequestId, RPCError

log = Logger()

PROTOCOL_VERSION = "2025-06-18"
SUPPORTED_PROTOCOL_VERSIONS = ("2025-06-18", "2025-03-26", "2024-11-05")
CLIENT_INFO = {"name": "aichat-backend", "version": "1.0.0"}
MAX_TOOL_PAGES = 1000


class ProtocolVersionError(Exception):
    """The server answered ``initialize`` with a protocol version we do not implement."""


class ProtocolError(Exception):
    """The server answered with something MCP does not allow (a malformed result)."""


@dataclass(frozen=True)
class ServerInfo:
    """What ``initialize`` told us about the server."""

    protocol_version: str
    server_info: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    instructions: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """A ``tools/call`` result as the model will read it."""

    text: str
    is_error: bool = False
    structured: Any | None = None


class MCPSession:
    """An initialized (or initializing) MCP conversation with one server over ``peer``.

    ``on_negotiated(version)`` hears the agreed protocol version before ``notifications/initialized`` goes
    out (Streamable HTTP sends it as a header from then on).
    """

    def __init__(
        self,
        peer: JSONRPCPeer,
        *,
        name: str,
        on_tools_changed: Callable[[], None] | None = None,
        on_negotiated: Callable[[str], None] | None = None,
    ) -> None:
        self.peer = peer
        self.on_negotiated = on_negotiated
        self.name = name
        self.on_tools_changed = on_tools_changed
        self.info: ServerInfo | None = None
        peer.on_request = self._on_request
        peer.on_notification = self._on_notification
        peer.on_abandon = self._on_abandon

    async def initialize(self, time_limit: float | None = None) -> ServerInfo:
        """Run the handshake; raise :class:`ProtocolVersionError` for a version we do not support."""
        result = await self.peer.request(
            "initialize",
            {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO},
            timeout=time_limit,
        )
        if not isinstance(result, dict):
            raise ProtocolError(f"initialize returned {type(result).__name__}, not an object")
        version = result.get("protocolVersion")
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise ProtocolVersionError(
                f"server answered protocol version {version!r}; supported: {', '.join(SUPPORTED_PROTOCOL_VERSIONS)}"
            )
        server_info = result.get("serverInfo")
        capabilities = result.get("capabilities")
        instructions = result.get("instructions")
        self.info = ServerInfo(
            protocol_version=version,
            server_info=server_info if isinstance(server_info, dict) else {},
            capabilities=capabilities if isinstance(capabilities, dict) else {},
            instructions=instructions if isinstance(instructions, str) else None,
        )
        if self.on_negotiated is not None:
            self.on_negotiated(version)
        self.peer.notify("notifications/initialized")
        return self.info

    async def list_tools(self, time_limit: float | None = None) -> list[dict[str, Any]]:
        """Every tool of the server, following ``nextCursor`` until the last page."""
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        seen_cursors: set[str] = set()
        for _ in range(MAX_TOOL_PAGES):
            params = {"cursor": cursor} if cursor is not None else {}
            page = await self.peer.request("tools/list", params, timeout=time_limit)
            if not isinstance(page, dict) or not isinstance(page.get("tools", []), list):
                raise ProtocolError("tools/list returned a malformed page")
            for tool in page.get("tools", []):
                if isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"]:
                    tools.append(tool)
                else:
                    log.warn("{server}: skipped a malformed tool entry {tool!r}", server=self.name, tool=tool)
            next_cursor = page.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                return tools
            if next_cursor in seen_cursors:
                raise ProtocolError(f"tools/list repeated cursor {next_cursor!r}")
            seen_cursors.add(next_cursor)
            cursor = next_cursor
        raise ProtocolError(f"tools/list returned more than {MAX_TOOL_PAGES} pages")

    async def call_tool(self, name: str, arguments: dict[str, Any], time_limit: float | None = None) -> ToolResult:
        """Call one tool; a result with ``isError`` is returned (not raised) with ``is_error=True``."""
        result = await self.peer.request("tools/call", {"name": name, "arguments": arguments}, timeout=time_limit)
        if not isinstance(result, dict):
            raise ProtocolError(f"tools/call returned {type(result).__name__}, not an object")
        return format_tool_result(result)

    def _on_request(self, method: str, params: Any) -> Any:
        if method == "ping":
            return {}
        if method == "roots/list":
            return {"roots": []}
        raise RPCError(METHOD_NOT_FOUND, f"Method not found: {method}")

    def _on_notification(self, method: str, params: Any) -> None:
        if method == "notifications/tools/list_changed":
            if self.on_tools_changed is not None:
                self.on_tools_changed()
        elif method == "notifications/message" and isinstance(params, dict):
            log.info(
                "{server} log ({log_level}): {data}",
                server=self.name,
                log_level=params.get("level", "info"),
                data=params.get("data"),
            )

    def _on_abandon(self, request_id: RequestId, method: str, reason: str) -> None:
        if method == "initialize":
            return
        self.peer.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})


def format_tool_result(result: dict[str, Any]) -> ToolResult:
    """Join all text items; describe images, audio and resources; keep ``structuredContent``."""
    parts: list[str] = []
    content = result.get("content")
    for item in content if isinstance(content, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "text":
            parts.append(str(item.get("text", "")))
        elif kind in ("image", "audio"):
            parts.append(f"[{kind}: {item.get('mimeType', 'unknown type')}, {_b64_size(item.get('data'))} bytes]")
        elif kind == "resource_link":
            label = item.get("name") or item.get("title") or item.get("uri")
            parts.append(f"[resource link: {label} <{item.get('uri')}>{_mime(item)}]")
        elif kind == "resource" and isinstance(item.get("resource"), dict):
            resource = item["resource"]
            if isinstance(resource.get("text"), str):
                parts.append(f"[resource: {resource.get('uri')}{_mime(resource)}]\n{resource['text']}")
            else:
                size = _b64_size(resource.get("blob"))
                parts.append(f"[resource: {resource.get('uri')}{_mime(resource)}, {size} bytes]")
        else:
            parts.append(f"[{kind} content]")
    structured = result.get("structuredContent")
    text = "\n".join(parts)
    if not parts and structured is not None:
        text = json.dumps(structured, ensure_ascii=False)
    return ToolResult(text=text, is_error=bool(result.get("isError", False)), structured=structured)


def _b64_size(data: Any) -> int:
    if not isinstance(data, str):
        return 0
    try:
        return len(base64.b64decode(data, validate=False))
    except ValueError:
        return len(data) * 3 // 4


def _mime(item: dict[str, Any]) -> str:
    mime = item.get("mimeType")
    return f", {mime}" if mime else ""
