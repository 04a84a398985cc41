"""Tests of mcp-servers.json loading: both shapes accepted, every mistake reported with file, path and server."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp.config import ServerConfig, load_servers_file, parse_servers
from aichat.validation import ConfigError


def problems(document: Any) -> list[str]:
    """The problems of ``document`` as strings (it must be invalid)."""
    try:
        parse_servers(document, "mcp.json")
    except ConfigError as e:
        return [str(p) for p in e.problems]
    raise AssertionError("document was accepted")


class ShapeTests(SynchronousTestCase):
    """The two accepted shapes and the defaults."""

    def test_claude_desktop_shape(self) -> None:
        """{"mcpServers": {...}}: the key is the name; transport inferred; defaults applied."""
        [stdio, sse, http] = parse_servers(
            {
                "mcpServers": {
                    "vm": {"command": "/bin/vm", "args": ["-v"], "env": {"A": "1"}, "timeout": 0},
                    "pmm": {"url": "http://localhost:7772/v1/mcp/sse", "description": "PMM", "timeout": 5},
                    "remote": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer x"}},
                }
            },
            "f",
        )
        self.assertEqual(
            stdio,
            ServerConfig("vm", transport="stdio", command="/bin/vm", args=("-v",), env={"A": "1"}, timeout=30.0),
        )
        self.assertEqual((sse.transport, sse.timeout, sse.description), ("sse", 5.0, "PMM"))
        self.assertEqual((http.transport, dict(http.headers)), ("http", {"Authorization": "Bearer x"}))
        self.assertEqual(http.init_timeout, 60.0)

    def test_list_shape(self) -> None:
        """{"servers": [{"name": ...}]} with every field."""
        [config] = parse_servers(
            {
                "servers": [
                    {
                        "name": "fs",
                        "command": "node",
                        "args": ["index.js"],
                        "cwd": "/tmp",
                        "transport": "stdio",
                        "timeout": 12.5,
                        "init_timeout": 90,
                        "enabled": False,
                        "tools": {"allow": ["read_*"], "deny": ["read_secret"]},
                    }
                ]
            },
            "f",
        )
        self.assertEqual(config.cwd, "/tmp")
        self.assertEqual((config.timeout, config.init_timeout, config.enabled), (12.5, 90.0, False))
        self.assertEqual((config.tools_allow, config.tools_deny), (("read_*",), ("read_secret",)))

    def test_explicit_transport_wins(self) -> None:
        """An explicit transport overrides the inference from the URL."""
        [config] = parse_servers({"mcpServers": {"a": {"url": "http://h/sse", "transport": "http"}}}, "f")
        self.assertEqual(config.transport, "http")


class ProblemTests(SynchronousTestCase):
    """Invalid files: every message names the file, the JSON path and the server."""

    def test_both_command_and_url(self) -> None:
        """command and url together are refused, naming the server."""
        self.assertEqual(
            problems({"mcpServers": {"x": {"command": "a", "url": "http://h/"}}}),
            ["mcp.json: $.mcpServers.x: server 'x': both 'command' and 'url' are set (rule: exactly one of them)"],
        )

    def test_neither(self) -> None:
        """A server with neither command nor url is refused, naming it."""
        [message] = problems({"servers": [{"name": "empty"}]})
        self.assertIn("$.servers[0]: server 'empty': neither 'command' nor 'url'", message)

    def test_duplicate_name(self) -> None:
        """Two servers with one name are refused."""
        [message] = problems({"servers": [{"name": "a", "command": "x"}, {"name": "a", "command": "y"}]})
        self.assertIn("$.servers[1]: duplicate server name 'a' (also at $.servers[0])", message)

    def test_schema_problems_name_the_server(self) -> None:
        """Type errors and misspelt keys come with the path, the server and a suggestion."""
        messages = problems({"servers": [{"name": "a", "comand": "x", "timeout": "soon"}]})
        self.assertEqual(
            messages,
            [
                "mcp.json: $.servers[0]: server 'a': unknown key 'comand' (did you mean 'command'?)",
                "mcp.json: $.servers[0].timeout: server 'a': 'soon' is not of type 'number'",
            ],
        )

    def test_transport_mismatch(self) -> None:
        """transport stdio without a command is refused."""
        [message] = problems({"mcpServers": {"a": {"url": "http://h/", "transport": "stdio"}}})
        self.assertIn("$.mcpServers.a.transport: server 'a': transport 'stdio' needs 'command'", message)

    def test_both_shapes(self) -> None:
        """A file cannot mix both shapes."""
        [message] = problems({"mcpServers": {}, "servers": []})
        self.assertIn("too many properties", message)

    def test_missing_file(self) -> None:
        """A missing file is a ConfigError; the caller decides whether that matters."""
        with self.assertRaises(ConfigError) as raised:
            load_servers_file(self.mktemp())
        self.assertIn("file not found", str(raised.exception))

    def test_invalid_json(self) -> None:
        """Broken JSON is reported with its line and column."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"mcpServers": {\n  "a": }')
        with self.assertRaises(ConfigError) as raised:
            load_servers_file(path)
        self.assertIn("invalid JSON at line 2", str(raised.exception))

    def test_file_round_trip(self) -> None:
        """A valid file on disk loads."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"mcpServers": {"a": {"command": "x"}}}, f)
        self.assertEqual([c.name for c in load_servers_file(path)], ["a"])
