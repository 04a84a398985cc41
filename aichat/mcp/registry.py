"""Model-facing tool names and the table that maps them back to a server and an MCP tool.

A tool ``t`` of server ``s`` is offered to the model as ``s__t``, with every character outside
``[a-zA-Z0-9_-]`` replaced by ``_`` and, when the result is longer than 64 characters or collides with
another tool's name, cut and suffixed with a hash of the original pair, so names are stable across
restarts and never ambiguous.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_FUNCTION_NAME = 64
_INVALID = re.compile(r"[^a-zA-Z0-9_-]")
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ToolNotFound(KeyError):
    """No tool has this model-facing function name."""

    def __str__(self) -> str:
        return f"tool not found: {self.args[0]}" if self.args else "tool not found"


@dataclass(frozen=True)
class Tool:
    """One tool as offered to the model."""

    name: str
    function_name: str
    description: str
    input_schema: dict[str, Any]
    server: str
    annotations: dict[str, Any] = field(default_factory=dict, compare=False)


def _digest(server: str, tool: str) -> str:
    return hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:8]


def function_name(server: str, tool: str, *, hashed: bool = False) -> str:
    """``<server>__<tool>`` made valid for the model; ``hashed`` forces the hash suffix."""
    name = _INVALID.sub("_", f"{server}__{tool}")
    if hashed or len(name) > MAX_FUNCTION_NAME:
        suffix = "_" + _digest(server, tool)
        name = name[: MAX_FUNCTION_NAME - len(suffix)] + suffix
    return name


def function_name_prefix(server: str) -> str:
    """The start every function name of ``server`` shares (unless hashing had to cut into it)."""
    return _INVALID.sub("_", f"{server}__")


def tool_allowed(tool: str, allow: Sequence[str], deny: Sequence[str]) -> bool:
    """An empty ``allow`` allows everything; ``deny`` wins over ``allow``. Globs match case-sensitively."""
    if allow and not any(fnmatch.fnmatchcase(tool, pattern) for pattern in allow):
        return False
    return not any(fnmatch.fnmatchcase(tool, pattern) for pattern in deny)


def _input_schema(raw: Any) -> dict[str, Any]:
    schema = dict(raw) if isinstance(raw, dict) else {}
    if schema.get("type") != "object":
        schema["type"] = "object"
    schema.setdefault("properties", {})
    return schema


@dataclass(frozen=True)
class ServerTools:
    """The tools one server lists, with its filters, in the server's order."""

    server: str
    tools: Sequence[dict[str, Any]]
    allow: Sequence[str] = ()
    deny: Sequence[str] = ()


class ToolRegistry:
    """The current model-facing tool table, rebuilt whenever a server's tool list changes."""

    def __init__(self) -> None:
        self._tools: list[Tool] = []
        self._by_function: dict[str, Tool] = {}

    def rebuild(self, servers: Iterable[ServerTools]) -> None:
        """Replace the table: servers in the given order, each server's tools sorted by name."""
        candidates: list[tuple[str, dict[str, Any]]] = []
        for entry in servers:
            seen: set[str] = set()
            for raw in sorted(entry.tools, key=lambda t: str(t.get("name", ""))):
                name = str(raw.get("name", ""))
                if not name or name in seen or not tool_allowed(name, entry.allow, entry.deny):
                    continue
                seen.add(name)
                candidates.append((entry.server, raw))
        plain = [function_name(server, str(raw["name"])) for server, raw in candidates]
        counts: dict[str, int] = {}
        for name in plain:
            counts[name] = counts.get(name, 0) + 1
        tools: list[Tool] = []
        by_function: dict[str, Tool] = {}
        for (server, raw), name in zip(candidates, plain, strict=True):
            tool_name = str(raw["name"])
            if counts[name] > 1:
                name = function_name(server, tool_name, hashed=True)
            annotations = raw.get("annotations")
            tool = Tool(
                name=tool_name,
                function_name=name,
                description=str(raw.get("description") or raw.get("title") or ""),
                input_schema=_input_schema(raw.get("inputSchema")),
                server=server,
                annotations=annotations if isinstance(annotations, dict) else {},
            )
            tools.append(tool)
            by_function[name] = tool
        self._tools = tools
        self._by_function = by_function

    def tools(self) -> list[Tool]:
        """Every tool, in deterministic order."""
        return list(self._tools)

    def lookup(self, function_name: str) -> Tool:
        """The tool behind a model-facing name; raise :class:`ToolNotFound`."""
        try:
            return self._by_function[function_name]
        except KeyError:
            raise ToolNotFound(function_name) from None
