"""Tests of model-facing tool names and the tool table: valid, stable, unambiguous, filtered, ordered."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp.registry import FUNCTION_NAME_RE, ServerTools, ToolNotFound, ToolRegistry, function_name, tool_allowed
from tests.mcp.fakes import tool


class NameTests(SynchronousTestCase):
    """function_name()."""

    def test_plain(self) -> None:
        """server__tool when already valid."""
        self.assertEqual(function_name("everything", "get-sum"), "everything__get-sum")

    def test_sanitised(self) -> None:
        """Characters outside [a-zA-Z0-9_-] become underscores."""
        self.assertEqual(function_name("my.server", "read file/ü"), "my_server__read_file__")

    def test_long_names_are_hashed_stably(self) -> None:
        """Over 64 characters: cut and suffixed with a hash of the pair, the same every time."""
        long_name = function_name("server", "t" * 100)
        self.assertEqual(len(long_name), 64)
        self.assertEqual(long_name, function_name("server", "t" * 100))
        self.assertNotEqual(long_name, function_name("server", "t" * 99))

    @given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=200))
    def test_always_valid(self, server: str, name: str) -> None:
        """Whatever the server and tool names, the function name matches ^[a-zA-Z0-9_-]{1,64}$."""
        self.assertRegex(function_name(server, name), FUNCTION_NAME_RE)


class RegistryTests(SynchronousTestCase):
    """ToolRegistry.rebuild() and lookup()."""

    def test_order_and_lookup(self) -> None:
        """Servers in the given order, tools sorted by name; each name maps back to its server and tool."""
        registry = ToolRegistry()
        registry.rebuild([ServerTools("b", [tool("z"), tool("a")]), ServerTools("a", [tool("m")])])
        self.assertEqual([t.function_name for t in registry.tools()], ["b__a", "b__z", "a__m"])
        found = registry.lookup("b__z")
        self.assertEqual((found.server, found.name, found.input_schema["type"]), ("b", "z", "object"))
        with self.assertRaises(ToolNotFound):
            registry.lookup("nope")

    def test_collisions_are_disambiguated(self) -> None:
        """Two tools whose sanitised names collide both get hashed, distinct names."""
        registry = ToolRegistry()
        registry.rebuild([ServerTools("s", [tool("a.b"), tool("a_b")])])
        names = [t.function_name for t in registry.tools()]
        self.assertEqual(len(set(names)), 2)
        self.assertTrue(all(n.startswith("s__a_b_") for n in names))
        self.assertEqual({registry.lookup(n).name for n in names}, {"a.b", "a_b"})

    def test_allow_and_deny(self) -> None:
        """allow globs select, deny globs remove, deny wins."""
        self.assertTrue(tool_allowed("read_file", [], []))
        self.assertTrue(tool_allowed("read_file", ["read_*"], []))
        self.assertFalse(tool_allowed("write_file", ["read_*"], []))
        self.assertFalse(tool_allowed("read_secret", ["read_*"], ["*secret*"]))
        registry = ToolRegistry()
        registry.rebuild([ServerTools("s", [tool("read_a"), tool("write_a"), tool("read_x")], ["read_*"], ["*_x"])])
        self.assertEqual([t.name for t in registry.tools()], ["read_a"])

    def test_schema_normalised(self) -> None:
        """A tool without an input schema gets an empty object schema; other keys are kept."""
        registry = ToolRegistry()
        registry.rebuild([ServerTools("s", [
            {"name": "bare"},
            {"name": "full", "inputSchema": {"type": "object", "properties": {"x": {}}, "$defs": {"d": {}}}},
        ])])
        bare, full = registry.tools()
        self.assertEqual(bare.input_schema, {"type": "object", "properties": {}})
        self.assertIn("$defs", full.input_schema)
