"""Helpers for tests with real MCP server processes: server configs, process-group inspection, polling."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from aichat.mcp import MCPHost, ServerConfig

ROOT = Path(__file__).resolve().parent.parent.parent
MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
FAKE_SERVER = Path(__file__).resolve().parent / "servers" / "fake_server.py"


def require_npm_servers() -> None:
    """Fail (not skip) with the fix when the pinned npm servers are not installed."""
    if not (MODULES / "server-everything" / "dist" / "index.js").exists():
        raise AssertionError(f"{MODULES} is missing: run `npm ci` in {ROOT}")


def everything(name: str = "everything", **overrides: object) -> ServerConfig:
    """server-everything over stdio."""
    return ServerConfig(
        name, command="node", args=(str(MODULES / "server-everything/dist/index.js"), "stdio"), **overrides  # type: ignore[arg-type]
    )


def filesystem(directory: str) -> ServerConfig:
    """server-filesystem allowed to use ``directory``."""
    script = str(MODULES / "server-filesystem/dist/index.js")
    return ServerConfig("filesystem", command="node", args=(script, directory))


def memory(path: str) -> ServerConfig:
    """server-memory storing its graph at ``path``."""
    return ServerConfig(
        "memory", command="node", args=(str(MODULES / "server-memory/dist/index.js"),), env={"MEMORY_FILE_PATH": path}
    )


def fake(name: str, *options: str, **overrides: object) -> ServerConfig:
    """The misbehaving Python test server with command-line ``options``."""
    return ServerConfig(name, command=sys.executable, args=(str(FAKE_SERVER), *options), **overrides)  # type: ignore[arg-type]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def group_empty(pgid: int) -> bool:
    """True once no live process is left in group ``pgid``."""
    return not group_members(pgid)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_for(condition: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` every 10 ms until true; fail after ``within`` seconds."""
    clock: IReactorTime = global_reactor
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await deferLater(clock, 0.01)


async def structured(host: MCPHost, function_name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call a tool and return its structured content, which must be an object."""
    result = await host.call_tool(function_name, arguments)
    assert isinstance(result.structured, dict), result
    return result.structured
