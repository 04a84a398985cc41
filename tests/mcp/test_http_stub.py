"""Unit tests of the Streamable HTTP transport with StubTreq: headers, sessions, 404 re-initialize, DELETE."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from aichat.mcp import MCPHost, ServerConfig, ToolCallError
from tests.mcp.fakes import FakeProcessReactor


class FakeStreamableServer(Resource):
    """A Streamable HTTP MCP endpoint that records every request it gets.

    ``restart()`` forgets every session, as a restarted server does; a message on a forgotten session is
    then answered the way ``reject`` says: 400 with the TypeScript SDK's JSON-RPC error, or 404.
    ``event_ids`` numbers the events of its streams, which a GET with ``Last-Event-ID`` replays;
    ``cut_after_first_event`` ends a call's response stream after a progress notification, before the
    response, and ``break_calls`` drops the connection of a call's POST once the call has run.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.sessions = 0
        self.live: set[str] = set()
        self.expired: set[str] = set()
        self.reject = 400
        self.sse = False
        self.fail_calls_with: int | None = None
        self.offer_stream = False
        self.streams: list[Request] = []
        self.tool_names = ["add"]
        self.calls_run = 0
        self.event_ids = False
        self.events: list[tuple[str, bytes]] = []
        self.cut_after_first_event = False
        self.break_calls = False

    def restart(self) -> None:
        """Forget every session and end every open GET stream, as a server that restarts does."""
        self.live.clear()
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.finish()

    def event(self, data: bytes) -> bytes:
        """One SSE message event, numbered when ``event_ids`` is set."""
        if not self.event_ids:
            return b"event: message\ndata: " + data + b"\n\n"
        event_id = f"e{len(self.events) + 1}"
        framed = f"id: {event_id}\nevent: message\ndata: ".encode() + data + b"\n\n"
        self.events.append((event_id, framed))
        return framed

    def known(self, session: str | None) -> bool:
        """Whether ``session`` is one this server (since its last restart) handed out and still keeps."""
        return session is not None and session in self.live and session not in self.expired

    def refuse(self, request: Request) -> bytes:
        """The answer to a message on a session this server does not know."""
        request.setResponseCode(self.reject)
        if self.reject == 404:
            return b"unknown session"
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"jsonrpc": "2.0", "error": {"code": -32000,
                           "message": "Bad Request: No valid session ID provided"}, "id": None}).encode()

    def render(self, request: Request) -> bytes | int:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        assert request.method is not None and request.content is not None
        method = request.method.decode()
        body = json.loads(request.content.read()) if method == "POST" else None
        self.requests.append((method, headers, body))
        session = headers.get("mcp-session-id")
        if method == "DELETE":
            return b""
        if method == "GET":
            if not self.offer_stream:
                request.setResponseCode(405)
                return b""
            if not self.known(session):
                return self.refuse(request)
            request.setHeader("Content-Type", "text/event-stream")
            request.write(b": stream open\n\n")
            last = headers.get("last-event-id")
            if last is not None:
                ids = [event_id for event_id, _ in self.events]
                for _, framed in self.events[ids.index(last) + 1:]:
                    request.write(framed)
            self.streams.append(request)
            return NOT_DONE_YET
        assert isinstance(body, dict)
        if body.get("method") != "initialize" and not self.known(session):
            return self.refuse(request)
        if "id" not in body:
            request.setResponseCode(202)
            return b""
        if body["method"] == "initialize":
            self.sessions += 1
            self.live.add(f"session-{self.sessions}")
            request.setHeader("Mcp-Session-Id", f"session-{self.sessions}")
            result: Any = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                           "serverInfo": {"name": "stub", "version": "1"}}
        elif body["method"] == "tools/list":
            result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in self.tool_names]}
        else:
            if self.fail_calls_with is not None:
                request.setResponseCode(self.fail_calls_with)
                return b"upstream broke"
            self.calls_run += 1
            args = body["params"]["arguments"]
            result = {"content": [{"type": "text", "text": str(args["a"] + args["b"])}]}
        response = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result}).encode()
        if body["method"] == "tools/call" and self.break_calls:
            request.setHeader("Content-Type", "text/event-stream")
            request.write(b": working\n\n")
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if body["method"] == "tools/call" and self.cut_after_first_event:
            request.setHeader("Content-Type", "text/event-stream")
            progress = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}'
            request.write(self.event(progress))
            self.event(response)  # stored for a resumption, never sent on this stream
            return b""
        if self.sse:
            request.setHeader("Content-Type", "text/event-stream")
            return b": hello\n\n" + self.event(response)
        request.setHeader("Content-Type", "application/json")
        return response


class StreamableHTTPTests(SynchronousTestCase):
    """The transport's HTTP behaviour, observed at a fake server."""

    def start(self, server: FakeStreamableServer) -> MCPHost:
        """A started host with one Streamable HTTP server behind StubTreq."""
        host = MCPHost(
            FakeProcessReactor(),
            [ServerConfig("remote", transport="http", url="http://mcp.test/mcp",
                          headers={"Authorization": "Bearer secret-token"})],
            http_client=StubTreq(server),
        )
        host.startService()
        return host

    def add(self, host: MCPHost) -> Deferred[Any]:
        """Call remote__add(2, 3)."""
        return Deferred.fromCoroutine(host.call_tool("remote__add", {"a": 2, "b": 3}))

    def test_handshake_headers_and_session(self) -> None:
        """Accept both types, bearer header always, the session id and protocol version after initialize.

        After notifications/initialized the optional GET stream is asked for (this server answers 405).
        """
        server = FakeStreamableServer()
        host = self.start(server)
        self.assertEqual(host.status()[0]["state"], "ready")
        self.assertEqual(self.successResultOf(self.add(host)).text, "5")
        [get] = [r for r in server.requests if r[0] == "GET"]
        init, initialized, listing, call = [r for r in server.requests if r[0] == "POST"]
        self.assertEqual(get[1]["accept"], "text/event-stream")
        self.assertEqual(init[2]["method"], "initialize")
        self.assertNotIn("mcp-session-id", init[1])
        for _, headers, _ in (init, initialized, listing, call):
            self.assertEqual(headers["accept"], "application/json, text/event-stream")
            self.assertEqual(headers["authorization"], "Bearer secret-token")
        for _, headers, _ in (initialized, listing, get, call):
            self.assertEqual(headers["mcp-session-id"], "session-1")
            self.assertEqual(headers["authorization"], "Bearer secret-token")
        for _, headers, _ in (listing, get, call):
            self.assertEqual(headers["mcp-protocol-version"], "2025-06-18")

    def test_sse_response(self) -> None:
        """A response delivered as an event stream is read like a JSON body."""
        server = FakeStreamableServer()
        server.sse = True
        host = self.start(server)
        self.assertEqual(self.successResultOf(self.add(host)).text, "5")

    def test_expired_session_reinitializes(self) -> None:
        """A 404 on the session right after start: a new session after the backoff, and the call goes through.

        The server was ready for less than the first backoff delay, so the new session waits for it (a
        server that never keeps a session must not make us spin); the call waits with it and is re-sent.
        """
        server = FakeStreamableServer()
        server.reject = 404
        reactor = FakeProcessReactor()
        host = MCPHost(
            reactor,
            [ServerConfig("remote", transport="http", url="http://mcp.test/mcp")],
            http_client=StubTreq(server),
            initial_backoff=0.5,
        )
        host.startService()
        server.expired.add("session-1")
        call = self.add(host)
        self.assertNoResult(call)
        status = host.status()[0]
        self.assertEqual(status["state"], "backing_off")
        self.assertIn("session session-1 is gone (HTTP 404", status["last_error"])
        reactor.advance(0.5)
        self.assertEqual(host.status()[0]["state"], "ready")
        self.assertEqual(self.successResultOf(call).text, "5")
        self.assertEqual(server.requests[-1][1]["mcp-session-id"], "session-2")
        self.assertEqual(server.calls_run, 1)

    def test_http_error_fails_the_call_only(self) -> None:
        """An HTTP 500 answer fails that call clearly; the server stays ready."""
        server = FakeStreamableServer()
        host = self.start(server)
        server.fail_calls_with = 500
        error = self.failureResultOf(self.add(host), ToolCallError).value
        self.assertIn("HTTP 500", str(error))
        self.assertEqual(host.status()[0]["state"], "ready")

    def test_delete_on_close(self) -> None:
        """Stopping the host ends the session with DELETE carrying its id."""
        server = FakeStreamableServer()
        host = self.start(server)
        self.successResultOf(host.stopService())
        method, headers, _ = server.requests[-1]
        self.assertEqual((method, headers["mcp-session-id"]), ("DELETE", "session-1"))

    def test_get_stream_notifications(self) -> None:
        """tools/list_changed arriving on the GET stream makes the host re-list the server's tools."""
        server = FakeStreamableServer()
        server.offer_stream = True
        stub = StubTreq(server)
        host = MCPHost(
            FakeProcessReactor(),
            [ServerConfig("remote", transport="http", url="http://mcp.test/mcp")],
            http_client=stub,
        )
        host.startService()
        stub.flush()
        [stream] = server.streams
        server.tool_names = ["add", "multiply"]
        stream.write(b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n')
        stub.flush()
        self.assertEqual([t.function_name for t in host.tools()], ["remote__add", "remote__multiply"])
        self.successResultOf(host.stopService())
        stub.flush()
