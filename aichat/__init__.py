"""aichat-backend: a Twisted daemon serving AI chat with MCP tools over HTTP."""

__version__ = "1.0.0"
