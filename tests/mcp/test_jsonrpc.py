"""Unit tests of the JSON-RPC core over a StringTransport and a Clock: no process, no sleeping."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from aichat.mcp.jsonrpc import JSONRPCPeer, PeerGone, RequestTimeout, RPCError
from aichat.mcp.stdio import LineFramer, LineTooLong


class Wire:
    """A peer writing newline-delimited JSON into a StringTransport, as the stdio transport does."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.abandoned: list[tuple[Any, str, str]] = []
        self.notifications: list[tuple[str, Any]] = []
        self.peer = JSONRPCPeer(
            self.clock,
            lambda m: self.transport.write(json.dumps(m).encode() + b"\n"),
            on_abandon=lambda i, m, r: self.abandoned.append((i, m, r)),
            on_notification=lambda m, p: self.notifications.append((m, p)),
        )

    def sent(self) -> list[dict[str, Any]]:
        """Messages written so far (and forget them)."""
        data = self.transport.value()
        self.transport.clear()
        return [json.loads(line) for line in data.splitlines()]

    def receive(self, message: Any) -> None:
        """Feed one message as a line, as the framer would."""
        self.peer.line_received(json.dumps(message).encode())


class RequestTests(SynchronousTestCase):
    """Outgoing requests: each pending entry leaves the table exactly once."""

    def test_result(self) -> None:
        """A result response fires the request's Deferred and clears the entry."""
        wire = Wire()
        d = wire.peer.request("tools/list", {"cursor": "x"})
        [message] = wire.sent()
        self.assertEqual(message, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"cursor": "x"}})
        self.assertEqual(wire.peer.pending_count, 1)
        wire.receive({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}})
        self.assertEqual(self.successResultOf(d), {"tools": []})
        self.assertEqual(wire.peer.pending_count, 0)

    def test_error(self) -> None:
        """An error response fails the Deferred with RPCError carrying code, message and data."""
        wire = Wire()
        d = wire.peer.request("x")
        wire.receive({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad", "data": [1]}})
        error = self.failureResultOf(d, RPCError).value
        assert isinstance(error, RPCError)
        self.assertEqual((error.code, error.message, error.data), (-32602, "bad", [1]))
        self.assertEqual(wire.peer.pending_count, 0)

    def test_out_of_order_responses(self) -> None:
        """Responses are matched by id, whatever their order."""
        wire = Wire()
        first, second = wire.peer.request("a"), wire.peer.request("b")
        wire.receive({"jsonrpc": "2.0", "id": 2, "result": "B"})
        wire.receive({"jsonrpc": "2.0", "id": 1, "result": "A"})
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("A", "B"))

    def test_timeout(self) -> None:
        """A timeout fails the request, clears the entry and its timer, and reports it abandoned."""
        wire = Wire()
        d = wire.peer.request("tools/call", timeout=5)
        wire.clock.advance(4.9)
        self.assertNoResult(d)
        wire.clock.advance(0.1)
        self.failureResultOf(d, RequestTimeout)
        self.assertEqual(wire.peer.pending_count, 0)
        self.assertEqual(wire.abandoned, [(1, "tools/call", "timed out after 5 s")])
        self.assertEqual(wire.clock.getDelayedCalls(), [])
        wire.receive({"jsonrpc": "2.0", "id": 1, "result": "late"})

    def test_result_cancels_timer(self) -> None:
        """An answered request leaves no timer behind."""
        wire = Wire()
        d = wire.peer.request("x", timeout=5)
        wire.receive({"jsonrpc": "2.0", "id": 1, "result": None})
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling the Deferred clears the entry and the timer and reports it abandoned."""
        wire = Wire()
        d = wire.peer.request("tools/call", timeout=5)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(wire.peer.pending_count, 0)
        self.assertEqual(wire.clock.getDelayedCalls(), [])
        self.assertEqual(wire.abandoned, [(1, "tools/call", "cancelled by the client")])

    def test_fail_all(self) -> None:
        """A lost connection fails every pending request at once and refuses new ones."""
        wire = Wire()
        pending = [wire.peer.request("x", timeout=5) for _ in range(3)]
        wire.peer.fail_all(PeerGone("server crashed"))
        for d in pending:
            self.assertIn("server crashed", str(self.failureResultOf(d, PeerGone).value))
        self.assertEqual(wire.peer.pending_count, 0)
        self.assertEqual(wire.clock.getDelayedCalls(), [])
        self.failureResultOf(wire.peer.request("y"), PeerGone)
        self.assertEqual(wire.abandoned, [])

    def test_send_failure(self) -> None:
        """A transport that cannot send fails the request instead of leaving it pending."""
        clock = Clock()

        def broken(message: dict[str, Any]) -> None:
            raise OSError("pipe closed")

        peer = JSONRPCPeer(clock, broken)
        self.failureResultOf(peer.request("x", timeout=1), PeerGone)
        self.assertEqual(peer.pending_count, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_string_id_echo(self) -> None:
        """A server that echoes our numeric id as a string is still matched."""
        wire = Wire()
        d = wire.peer.request("x")
        wire.receive({"jsonrpc": "2.0", "id": "1", "result": 7})
        self.assertEqual(self.successResultOf(d), 7)


class IncomingTests(SynchronousTestCase):
    """Messages from the other side: requests answered, notifications dispatched, junk skipped."""

    def test_unknown_request(self) -> None:
        """Without a handler every server-to-client request gets -32601."""
        wire = Wire()
        wire.receive({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage"})
        [reply] = wire.sent()
        self.assertEqual(reply["id"], "s1")
        self.assertEqual(reply["error"]["code"], -32601)

    def test_handler_result_and_error(self) -> None:
        """A handler's return value is the result; an RPCError it raises is the error response."""
        wire = Wire()

        def handle(method: str, params: Any) -> Any:
            if method == "ping":
                return {}
            raise RPCError(-32601, "no")

        wire.peer.on_request = handle
        wire.receive({"jsonrpc": "2.0", "id": 7, "method": "ping"})
        wire.receive({"jsonrpc": "2.0", "id": 8, "method": "other"})
        self.assertEqual(
            wire.sent(),
            [
                {"jsonrpc": "2.0", "id": 7, "result": {}},
                {"jsonrpc": "2.0", "id": 8, "error": {"code": -32601, "message": "no"}},
            ],
        )

    def test_async_handler(self) -> None:
        """A handler may answer later through a Deferred."""
        wire = Wire()
        later: Deferred[Any] = Deferred()
        wire.peer.on_request = lambda method, params: later
        wire.receive({"jsonrpc": "2.0", "id": 1, "method": "roots/list"})
        self.assertEqual(wire.sent(), [])
        later.callback({"roots": []})
        self.assertEqual(wire.sent(), [{"jsonrpc": "2.0", "id": 1, "result": {"roots": []}}])

    def test_handler_bug(self) -> None:
        """An unexpected exception in a handler becomes -32603 and is logged."""
        wire = Wire()

        def handle(method: str, params: Any) -> Any:
            raise ZeroDivisionError()

        wire.peer.on_request = handle
        wire.receive({"jsonrpc": "2.0", "id": 1, "method": "x"})
        self.assertEqual(wire.sent()[0]["error"]["code"], -32603)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_notifications_and_batches(self) -> None:
        """Notifications reach the handler, also inside a batch."""
        wire = Wire()
        wire.receive([
            {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": 1}},
        ])
        self.assertEqual(
            wire.notifications,
            [("notifications/tools/list_changed", None), ("notifications/message", {"data": 1})],
        )

    def test_garbage_is_skipped(self) -> None:
        """Lines that are not JSON, or JSON that is not a message, are skipped; the peer keeps working."""
        wire = Wire()
        d = wire.peer.request("x")
        for line in (b"hello world", b"\xff\xfe", b"42", b'{"jsonrpc": "2.0"}', b"[1, 2]"):
            wire.peer.line_received(line)
        wire.receive({"jsonrpc": "2.0", "id": 99, "result": "unknown id"})
        wire.receive({"jsonrpc": "2.0", "id": 1, "result": "ok"})
        self.assertEqual(self.successResultOf(d), "ok")


class FramerTests(SynchronousTestCase):
    """The newline framer under any chunking, and its limit."""

    def test_limit(self) -> None:
        """A line over the limit raises, whether it arrives whole or in pieces; one at the limit passes."""
        self.assertEqual(LineFramer(4).feed(b"abcd\n"), [b"abcd"])
        with self.assertRaises(LineTooLong):
            LineFramer(4).feed(b"abcde\n")
        framer = LineFramer(4)
        framer.feed(b"abc")
        with self.assertRaises(LineTooLong):
            framer.feed(b"de")

    def test_crlf_and_blank_lines(self) -> None:
        """A trailing CR is dropped and blank lines are not messages."""
        self.assertEqual(LineFramer(100).feed(b"a\r\n\n\r\nb\n"), [b"a", b"b"])

    @given(
        st.lists(st.binary(min_size=0, max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
        st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=50),
    )
    def test_any_chunking(self, lines: list[bytes], cuts: list[int]) -> None:
        """However the stream is cut into chunks, the same lines come out in order."""
        stream = b"".join(line + b"\n" for line in lines)
        framer = LineFramer(64)
        out: list[bytes] = []
        position = 0
        index = 0
        while position < len(stream):
            size = cuts[index % len(cuts)]
            out.extend(framer.feed(stream[position : position + size]))
            position += size
            index += 1
        expected = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        self.assertEqual(out, [line for line in expected if line])
