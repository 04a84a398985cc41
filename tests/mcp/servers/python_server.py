"""A Python MCP server from the PyPI ``mcp`` SDK, for the Streamable HTTP and legacy HTTP+SSE transports.

Usage: ``python python_server.py {streamable-http|sse} PORT [--json]``. Prints ``listening`` on stderr
once the port is about to be served. Tools: ``add``, ``echo``, ``slow`` (sleeps ``seconds``).
"""

from __future__ import annotations

import sys

import anyio
from mcp.server.mcpserver import MCPServer

server = MCPServer("python-test-server", version="1.0")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(message: str) -> str:
    """Return the message."""
    return f"Echo: {message}"


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await anyio.sleep(seconds)
    return "done"


def main() -> None:
    """Serve on 127.0.0.1 with the transport and port from the command line."""
    transport, port = sys.argv[1], int(sys.argv[2])
    print("listening", file=sys.stderr, flush=True)
    if transport == "sse":
        server.run("sse", host="127.0.0.1", port=port)
    else:
        server.run("streamable-http", host="127.0.0.1", port=port, json_response="--json" in sys.argv)


if __name__ == "__main__":
    main()
