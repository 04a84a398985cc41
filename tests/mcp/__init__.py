"""Tests of the MCP host: JSON-RPC core, transports, supervision, registry, and real MCP servers."""
