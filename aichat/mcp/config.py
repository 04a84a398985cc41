"""Load ``mcp-servers.json`` into :class:`ServerConfig` objects.

The JSON Schema ``aichat/schemas/mcp-servers.schema.json`` decides what a valid file is; this module adds
the rules a schema cannot say well (exactly one of ``command``/``url``, a transport that fits them, unique
names) and reports every problem with the file, the JSON path, the rule and the server's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aichat.validation import ConfigError, Problem, validate

Transport = Literal["stdio", "http", "sse"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_INIT_TIMEOUT = 60.0


@dataclass(frozen=True)
class ServerConfig:
    """One MCP server as configured; equal configs mean "unchanged" on reload."""

    name: str
    description: str = ""
    transport: Transport = "stdio"
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    enabled: bool = True
    tools_allow: tuple[str, ...] = ()
    tools_deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.command is None and self.url and self.transport == "stdio":
            object.__setattr__(self, "transport", _infer_transport(None, self.url))


def load_servers_file_if_present(path: str) -> list[ServerConfig] | None:
    """Like :func:`load_servers_file`, but ``None`` when the file does not exist: as in the reference, an
    absent servers file means no MCP servers (callers say so), while an unreadable or invalid one is an error."""
    if not os.path.exists(path):
        return None
    return load_servers_file(path)


def load_servers_file(path: str) -> list[ServerConfig]:
    """Read, validate and convert ``path``; raise :class:`ConfigError` listing every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([Problem(path, "$", "file not found")]) from None
    except OSError as e:
        raise ConfigError([Problem(path, "$", f"cannot read file: {e.strerror or e}")]) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([Problem(path, "$", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")]) from None
    return parse_servers(document, path)


def parse_servers(document: Any, file: str) -> list[ServerConfig]:
    """Validate an already decoded document (``file`` only names it in problems) and convert it."""
    problems = validate(document, "mcp-servers", file)
    entries = _entries(document)
    problems = [_with_server_name(p, entries) for p in problems]
    if problems:
        raise ConfigError(problems)
    seen: dict[str, str] = {}
    configs: list[ServerConfig] = []
    for json_path, name, entry in entries:
        if name in seen:
            problems.append(Problem(file, json_path, f"duplicate server name {name!r} (also at {seen[name]})"))
            continue
        seen[name] = json_path
        entry_problems = _check_entry(file, json_path, name, entry)
        if entry_problems:
            problems.extend(entry_problems)
            continue
        configs.append(_to_config(name, entry))
    if problems:
        raise ConfigError(sorted(problems))
    return configs


def _entries(document: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """``(json_path, name, entry)`` for each server in either accepted shape, in file order."""
    if not isinstance(document, dict):
        return []
    out: list[tuple[str, str, dict[str, Any]]] = []
    servers_map = document.get("mcpServers")
    if isinstance(servers_map, dict):
        for name, entry in servers_map.items():
            if isinstance(entry, dict):
                out.append((f"$.mcpServers.{name}", str(name), entry))
    servers_list = document.get("servers")
    if isinstance(servers_list, list):
        for index, entry in enumerate(servers_list):
            if isinstance(entry, dict):
                out.append((f"$.servers[{index}]", str(entry.get("name", f"#{index}")), entry))
    return out


def _with_server_name(problem: Problem, entries: list[tuple[str, str, dict[str, Any]]]) -> Problem:
    for json_path, name, _ in entries:
        if problem.path == json_path or problem.path.startswith((json_path + ".", json_path + "[")):
            return Problem(problem.file, problem.path, f"server {name!r}: {problem.message}")
    return problem


def _check_entry(file: str, json_path: str, name: str, entry: dict[str, Any]) -> list[Problem]:
    command, url = entry.get("command"), entry.get("url")
    transport = entry.get("transport")
    where = f"server {name!r}"
    if command and url:
        return [Problem(file, json_path, f"{where}: both 'command' and 'url' are set (rule: exactly one of them)")]
    if not command and not url:
        return [Problem(file, json_path, f"{where}: neither 'command' nor 'url' is set (rule: exactly one of them)")]
    if transport == "stdio" and not command:
        return [Problem(file, json_path + ".transport", f"{where}: transport 'stdio' needs 'command'")]
    if transport in ("http", "sse") and not url:
        return [Problem(file, json_path + ".transport", f"{where}: transport {transport!r} needs 'url'")]
    problems = []
    if command:
        for key in ("headers",):
            if key in entry:
                problems.append(Problem(file, f"{json_path}.{key}", f"{where}: {key!r} applies to 'url' servers only"))
    else:
        for key in ("args", "env", "cwd"):
            if key in entry:
                message = f"{where}: {key!r} applies to 'command' servers only"
                problems.append(Problem(file, f"{json_path}.{key}", message))
    return problems


def _infer_transport(command: str | None, url: str | None) -> Transport:
    """``stdio`` for a command; for a URL, ``sse`` when its path ends in ``/sse`` (the reference's), else ``http``."""
    if command:
        return "stdio"
    path = (url or "").split("?", 1)[0].rstrip("/")
    return "sse" if path.endswith("/sse") else "http"


def _to_config(name: str, entry: dict[str, Any]) -> ServerConfig:
    command = entry.get("command")
    transport: Transport = entry.get("transport") or _infer_transport(command, entry.get("url"))
    tools = entry.get("tools") or {}
    return ServerConfig(
        name=name,
        description=entry.get("description", ""),
        transport=transport,
        command=command,
        args=tuple(entry.get("args", ())),
        env=dict(entry.get("env", {})),
        cwd=entry.get("cwd"),
        url=entry.get("url"),
        headers=dict(entry.get("headers", {})),
        timeout=float(entry.get("timeout") or DEFAULT_TIMEOUT),
        init_timeout=float(entry.get("init_timeout") or DEFAULT_INIT_TIMEOUT),
        enabled=bool(entry.get("enabled", True)),
        tools_allow=tuple(tools.get("allow", ())),
        tools_deny=tuple(tools.get("deny", ())),
    )
