"""The MCP host: configured MCP servers, supervised, with their tools exposed to the chat layer.

Import the public API from here; the submodules are its implementation.
"""

from aichat.mcp.config import ServerConfig, load_servers_file, load_servers_file_if_present
from aichat.mcp.host import MCPHost, UnknownServer
from aichat.mcp.registry import Tool, ToolNotFound
from aichat.mcp.session import ToolResult
from aichat.mcp.supervisor import State, ToolCallError

__all__ = [
    "MCPHost",
    "ServerConfig",
    "State",
    "Tool",
    "ToolCallError",
    "ToolNotFound",
    "ToolResult",
    "UnknownServer",
    "load_servers_file",
    "load_servers_file_if_present",
]
