"""A small stdio MCP server (standard library only) that misbehaves on request, for the host's tests.

Start-up options: ``--slow-start S`` sleeps before reading; ``--hang-init`` never answers ``initialize``;
``--protocol V`` answers ``initialize`` with version V; ``--garbage`` writes non-JSON lines before every
answer; ``--page-size N`` pages ``tools/list``; ``--spawn-grandchild`` starts a ``sleep`` grandchild
(an ``npx`` -> node chain in miniature); ``--exit-at-start N`` exits at once with status N;
``--stubborn`` ignores SIGTERM and keeps running after stdin closes (only SIGKILL ends it).

Tools: ``echo``, ``hang`` (never answers; the request id is remembered), ``cancelled`` (ids we received
``notifications/cancelled`` for), ``crash`` (exits with status 3), ``big`` (answers with one line of
``size`` bytes), ``env`` (our environment, as structured content), ``ids`` (pid, pgid, grandchild pid),
``mixed`` (text, image, resource link, embedded resource, structured content), ``fail`` (an ``isError``
result), ``add_tool`` (adds a tool and sends ``notifications/tools/list_changed``), ``ping_client``
(sends a ``ping`` and a ``sampling/createMessage`` request to the client, answers with their responses).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

TOOL_NAMES = ["echo", "hang", "cancelled", "crash", "big", "env", "ids", "mixed", "fail", "add_tool", "ping_client"]


def main() -> None:
    """Serve MCP on stdin/stdout until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow-start", type=float, default=0.0)
    parser.add_argument("--hang-init", action="store_true")
    parser.add_argument("--protocol", default=None)
    parser.add_argument("--garbage", action="store_true")
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--spawn-grandchild", action="store_true")
    parser.add_argument("--exit-at-start", type=int, default=None)
    parser.add_argument("--stubborn", action="store_true")
    options = parser.parse_args()
    if options.stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options.exit_at_start is not None:
        print("exiting at start as asked", file=sys.stderr, flush=True)
        sys.exit(options.exit_at_start)
    grandchild = None
    if options.spawn_grandchild:
        grandchild = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    time.sleep(options.slow_start)
    print("fake server started", file=sys.stderr, flush=True)
    tools = list(TOOL_NAMES)
    cancelled: list[Any] = []
    client_responses: dict[Any, Any] = {}
    out = sys.stdout.buffer

    def send(message: dict[str, Any]) -> None:
        if options.garbage:
            out.write(b"this is not JSON\n")
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    def result(request_id: Any, value: Any) -> None:
        send({"jsonrpc": "2.0", "id": request_id, "result": value})

    def text(value: str, **extra: Any) -> dict[str, Any]:
        return {"content": [{"type": "text", "text": value}], **extra}

    for raw in sys.stdin.buffer:
        message = json.loads(raw)
        method = message.get("method")
        request_id = message.get("id")
        params = message.get("params") or {}
        if method is None:
            client_responses[request_id] = message
            continue
        if method == "initialize":
            if options.hang_init:
                continue
            result(request_id, {
                "protocolVersion": options.protocol or params["protocolVersion"],
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "fake", "version": "0.1"},
            })
        elif method == "notifications/cancelled":
            cancelled.append(params.get("requestId"))
        elif method == "tools/list":
            start = int(params.get("cursor") or 0)
            size = options.page_size or len(tools)
            page = tools[start:start + size]
            value: dict[str, Any] = {"tools": [
                {"name": n, "description": f"the {n} tool", "inputSchema": {"type": "object"}} for n in page
            ]}
            if start + size < len(tools):
                value["nextCursor"] = str(start + size)
            result(request_id, value)
        elif method == "tools/call":
            name = params.get("name")
            args = params.get("arguments") or {}
            if name == "echo":
                result(request_id, text(str(args.get("message", ""))))
            elif name == "hang":
                pass
            elif name == "cancelled":
                result(request_id, text(json.dumps(cancelled), structuredContent={"cancelled": cancelled}))
            elif name == "crash":
                sys.exit(3)
            elif name == "big":
                result(request_id, text("x" * int(args.get("size", 1000))))
            elif name == "env":
                result(request_id, text("env", structuredContent=dict(os.environ)))
            elif name == "ids":
                ids = {"pid": os.getpid(), "pgid": os.getpgid(0), "cwd": os.getcwd(),
                       "grandchild": grandchild.pid if grandchild else None}
                result(request_id, text(json.dumps(ids), structuredContent=ids))
            elif name == "mixed":
                result(request_id, {
                    "content": [
                        {"type": "text", "text": "first"},
                        {"type": "image", "mimeType": "image/png", "data": base64.b64encode(b"\x89PNG1234").decode()},
                        {"type": "text", "text": "second"},
                        {"type": "resource_link", "uri": "file:///a.txt", "name": "a.txt", "mimeType": "text/plain"},
                        {"type": "resource", "resource": {"uri": "file:///b.txt", "mimeType": "text/plain",
                                                          "text": "inside b"}},
                    ],
                    "structuredContent": {"answer": 42},
                })
            elif name == "fail":
                result(request_id, text("it went wrong", isError=True))
            elif name == "add_tool":
                tools.append(str(args.get("name", "added")))
                result(request_id, text("added"))
                send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            elif name == "ping_client":
                send({"jsonrpc": "2.0", "id": "s1", "method": "ping"})
                send({"jsonrpc": "2.0", "id": "s2", "method": "sampling/createMessage", "params": {}})
                send({"jsonrpc": "2.0", "id": "s3", "method": "roots/list"})
                while len(client_responses) < 3:
                    reply = json.loads(sys.stdin.buffer.readline())
                    client_responses[reply.get("id")] = reply
                result(request_id, text("pinged", structuredContent=client_responses))
            else:
                send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"no tool {name}"}})
        elif request_id is not None:
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "nope"}})
    while options.stubborn:
        time.sleep(1)


if __name__ == "__main__":
    main()
