"""Unit tests of the Streamable HTTP transport with StubTreq: headers, sessions, DELETE, and every signal of a
lost session (404, a 400 naming the session, the GET stream ending, connection refused) with resumption."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
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
    ``hold_calls`` keeps calls unanswered until ``release()``; ``end_streams_at_once`` ends each GET stream
    as soon as it is open.
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
        self.events: list[tuple[str, str, bytes]] = []
        self.cut_after_first_event = False
        self.break_calls = False
        self.hold_calls = False
        self.end_streams_at_once = False
        self.held: list[tuple[Request, str | None, dict[str, Any]]] = []

    def restart(self) -> None:
        """Forget every session and end every open GET stream, as a server that restarts does."""
        self.live.clear()
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.finish()

    def event(self, data: bytes, stream: str = "get") -> bytes:
        """One SSE message event of ``stream``, numbered (and kept for replay) when ``event_ids`` is set."""
        if not self.event_ids:
            return b"event: message\ndata: " + data + b"\n\n"
        event_id = f"e{len(self.events) + 1}"
        framed = f"id: {event_id}\nevent: message\ndata: ".encode() + data + b"\n\n"
        self.events.append((event_id, stream, framed))
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
                # Replay the rest of the stream that event belonged to, and only that stream.
                ids = [event_id for event_id, _, _ in self.events]
                stream = self.events[ids.index(last)][1]
                for _, of, framed in self.events[ids.index(last) + 1:]:
                    if of == stream:
                        request.write(framed)
                if stream != "get":
                    return b""  # a call's stream ends once its response is out
            if self.end_streams_at_once:
                return b""
            self.streams.append(request)
            return NOT_DONE_YET
        assert isinstance(body, dict)
        if body.get("method") == "tools/call" and self.hold_calls:
            self.held.append((request, session, body))
            return NOT_DONE_YET
        return self.post_answer(request, session, body)

    def release(self) -> None:
        """Answer the held calls now, as the server is then (a restarted one refuses their session)."""
        held, self.held = self.held, []
        for request, session, body in held:
            answer = self.post_answer(request, session, body)
            if isinstance(answer, bytes):
                request.write(answer)
                request.finish()

    def post_answer(self, request: Request, session: str | None, body: dict[str, Any]) -> bytes | int:
        """The answer to one POSTed message."""
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
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if body["method"] == "tools/call" and self.cut_after_first_event:
            request.setHeader("Content-Type", "text/event-stream")
            progress = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}'
            request.write(self.event(progress, f"call-{body['id']}"))
            self.event(response, f"call-{body['id']}")  # kept for a resumption, never sent on this stream
            return b""
        if self.sse:
            request.setHeader("Content-Type", "text/event-stream")
            return b": hello\n\n" + self.event(response, f"call-{body['id']}")
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

    def test_get_stream_that_keeps_ending_is_reopened_with_a_growing_delay(self) -> None:
        """The first reopen is immediate; a stream that ends at once again waits 0.5 s, then 1 s, ... (no spin)."""
        server = FakeStreamableServer()
        server.offer_stream = True
        server.end_streams_at_once = True
        reactor = FakeProcessReactor()
        host = MCPHost(reactor, [ServerConfig("remote", transport="http", url="http://mcp.test/mcp")],
                       http_client=StubTreq(server))
        host.startService()

        def gets() -> int:
            return sum(1 for method, _, _ in server.requests if method == "GET")

        self.assertEqual(gets(), 2, "opened, ended, reopened at once")
        reactor.advance(0.4)
        self.assertEqual(gets(), 2)
        reactor.advance(0.1)
        self.assertEqual(gets(), 3)
        reactor.advance(0.9)
        self.assertEqual(gets(), 3)
        reactor.advance(0.1)
        self.assertEqual(gets(), 4)
        self.assertEqual(host.status()[0]["state"], "ready", "a stream that ends is not a lost session")
        self.successResultOf(host.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])

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


class DownableClient:
    """StubTreq in front of the fake server, or, while ``down``, a host that refuses connections."""

    def __init__(self, server: FakeStreamableServer) -> None:
        self.stub = StubTreq(server)
        self.down = False
        self._request: Any = getattr(self.stub, "request")  # noqa: B009 (StubTreq builds its methods at run time)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        if self.down:
            return fail(ConnectionRefusedError())
        result: Deferred[Any] = self._request(method, url, **kwargs)
        return result


class SessionLossTests(SynchronousTestCase):
    """Each signal a restarted (or vanished) server gives, and what the host does about it, on a Clock."""

    def setUp(self) -> None:
        """A fake server that offers a GET stream, a host with a 1 s first backoff, and the clock."""
        self.server = FakeStreamableServer()
        self.server.offer_stream = True
        self.client = DownableClient(self.server)
        self.reactor = FakeProcessReactor()
        self.host = MCPHost(
            self.reactor,
            [ServerConfig("remote", transport="http", url="http://mcp.test/mcp", timeout=30)],
            http_client=self.client,
            initial_backoff=1.0,
        )
        self.host.startService()
        self.flush()
        self.assertEqual(self.status()["state"], "ready")
        self.reactor.advance(5)  # ready long enough that a lost session is replaced at once

    def tearDown(self) -> None:
        """Stop the host; nothing may be left on the clock."""
        self.successResultOf(self.host.stopService())
        self.flush()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def flush(self) -> None:
        """Deliver what the fake server wrote to its open streams."""
        self.client.stub.flush()

    def status(self) -> dict[str, Any]:
        """The server's entry in the status list."""
        return self.host.status()[0]

    def add(self) -> Deferred[Any]:
        """Call remote__add(2, 3)."""
        return Deferred.fromCoroutine(self.host.call_tool("remote__add", {"a": 2, "b": 3}))

    def record_states(self) -> list[tuple[str, str | None]]:
        """Every (state, last_error) the status endpoint would show from now on, in order."""
        seen: list[tuple[str, str | None]] = []
        supervisor = self.host.supervisor("remote")
        listener = supervisor.on_change

        def changed(s: Any) -> None:
            status = self.status()
            if not seen or seen[-1][0] != status["state"]:
                seen.append((status["state"], status["last_error"]))
            if listener is not None:
                listener(s)

        supervisor.on_change = changed
        return seen

    def posts(self, method: str) -> list[dict[str, str]]:
        """Headers of every POST of ``method`` the server saw."""
        return [h for m, h, body in self.server.requests if m == "POST" and body.get("method") == method]

    def test_400_naming_the_session_resends_the_call(self) -> None:
        """The TypeScript SDK's 400 "No valid session ID provided" is a lost session: re-initialize, re-send."""
        self.server.offer_stream = False
        self.server.restart()
        errors = self.record_states()
        result = self.successResultOf(self.add())
        self.assertEqual(result.text, "5")
        calls = self.posts("tools/call")
        self.assertEqual([h["mcp-session-id"] for h in calls], ["session-1", "session-2"])
        self.assertEqual(self.server.calls_run, 1, "the refused call never ran; the re-sent one ran once")
        status = self.status()
        self.assertEqual((status["state"], status["restarts"]), ("ready", 1))
        self.assertEqual([state for state, _ in errors], ["starting", "ready"], "left ready at once")
        self.assertIn("No valid session ID provided", errors[0][1] or "")

    def test_404_resends_the_call(self) -> None:
        """A 404 on the session (what the specification says) is handled the same way."""
        self.server.reject = 404
        self.server.expired.add("session-1")
        self.assertEqual(self.successResultOf(self.add()).text, "5")
        self.assertEqual(self.server.calls_run, 1)
        self.assertEqual(self.status()["restarts"], 1)

    def test_400_about_something_else_fails_only_the_call(self) -> None:
        """A 400 that does not name the session is that call's error; the session stays."""
        self.server.fail_calls_with = 400
        error = self.failureResultOf(self.add(), ToolCallError).value
        self.assertIn("HTTP 400", str(error))
        self.assertEqual((self.status()["state"], self.status()["restarts"]), ("ready", 0))

    def test_get_stream_end_reveals_a_restart_without_a_call(self) -> None:
        """The GET stream ends; its reopen is refused with 400: a new session at once, and status says so."""
        states = self.record_states()
        self.server.restart()
        self.flush()
        self.assertEqual([state for state, _ in states], ["starting", "ready"])
        self.assertEqual(self.status()["state"], "ready")
        self.assertEqual(self.status()["restarts"], 1)
        gets = [h for m, h, _ in self.server.requests if m == "GET"]
        self.assertEqual(gets[-1]["mcp-session-id"], "session-2")
        self.assertEqual(self.successResultOf(self.add()).text, "5")

    def test_get_stream_end_with_the_server_gone(self) -> None:
        """The GET stream ends and the reopen is refused a connection: backing off at once, then back."""
        self.client.down = True
        self.server.restart()
        self.flush()
        status = self.status()
        self.assertEqual(status["state"], "backing_off")
        self.assertIn("Connection was refused", status["last_error"] or "")
        error = self.failureResultOf(self.add(), ToolCallError).value
        self.assertIn("not ready (backing_off)", str(error))
        self.client.down = False
        self.reactor.advance(1.0)
        self.flush()
        self.assertEqual(self.status()["state"], "ready")
        self.assertEqual(self.successResultOf(self.add()).text, "5")

    def test_connection_refused_call_waits_for_one_attempt(self) -> None:
        """A POST refused a connection never left: it is re-sent if the next attempt brings the server back."""
        self.server.offer_stream = False
        self.client.down = True
        call = self.add()
        self.assertNoResult(call)
        self.assertEqual(self.status()["state"], "backing_off")
        self.client.down = False
        self.server.restart()
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(call).text, "5")
        self.assertEqual(self.server.calls_run, 1)

    def test_connection_refused_call_fails_when_the_server_stays_down(self) -> None:
        """If the next attempt also finds nobody, the call fails with a clear error instead of waiting on."""
        self.server.offer_stream = False
        self.client.down = True
        call = self.add()
        self.reactor.advance(1.0)
        error = self.failureResultOf(call, ToolCallError).value
        self.assertIn("was not run", str(error))
        self.assertIn("Connection was refused", str(error))
        self.assertEqual(self.status()["state"], "backing_off")

    def test_refused_call_does_not_wait_past_its_timeout(self) -> None:
        """If the next attempt is due after the call's own timeout, the call fails at once, clearly."""
        self.successResultOf(self.host.stopService())
        self.host = MCPHost(
            self.reactor,
            [ServerConfig("remote", transport="http", url="http://mcp.test/mcp", timeout=0.5)],
            http_client=self.client,
            initial_backoff=1.0,
        )
        self.host.startService()
        self.flush()
        self.client.down = True
        error = self.failureResultOf(self.add(), ToolCallError).value
        self.assertIn("was not run", str(error))
        self.assertIn("not ready again (backing_off)", str(error))
        self.client.down = False
        self.reactor.advance(1.0)
        self.flush()
        self.assertEqual(self.status()["state"], "ready")

    def test_call_of_unknown_fate_is_not_resent(self) -> None:
        """A call whose connection broke after it was sent may have run: a clear error, no second send."""
        self.server.offer_stream = False
        self.server.break_calls = True
        call = self.add()
        self.flush()
        error = self.failureResultOf(call, ToolCallError).value
        self.assertIn("tool 'add' failed", str(error))
        self.assertIn("broke: Connection was closed cleanly", str(error))
        self.assertNotIn("<twisted.python.failure", str(error), "a reason a user can read")
        self.assertEqual(len(self.posts("tools/call")), 1)
        self.assertEqual(self.server.calls_run, 1)

    def test_quick_loss_after_ready_backs_off(self) -> None:
        """A server that forgets the session right after handing it out is retried with backoff, not at once."""
        self.server.offer_stream = False
        self.server.restart()
        self.successResultOf(self.add())
        self.server.restart()
        call = self.add()
        self.assertEqual(self.status()["state"], "backing_off")
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(call).text, "5")
        self.assertEqual(self.status()["restarts"], 2)

    def test_get_stream_resumes_with_last_event_id(self) -> None:
        """A GET stream whose events had ids is reopened with Last-Event-ID and the missed events replayed."""
        self.server.event_ids = True
        [stream] = self.server.streams
        self.server.tool_names = ["add", "multiply"]
        changed = b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'
        stream.write(self.server.event(changed))
        self.flush()
        self.server.event(b'{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"missed"}}')
        self.server.tool_names = ["add", "multiply", "divide"]
        self.server.event(changed)  # sent while the connection was down
        self.server.streams.remove(stream)
        stream.finish()
        self.flush()
        get = [h for m, h, _ in self.server.requests if m == "GET"][-1]
        self.assertEqual(get["last-event-id"], "e1")
        self.assertEqual(len(self.host.tools()), 3, "the replayed list_changed was acted on")
        self.assertEqual((self.status()["state"], self.status()["restarts"]), ("ready", 0))

    def test_post_response_stream_resumes_with_last_event_id(self) -> None:
        """A call's response stream that ends before the response is resumed by GET; the tool runs once."""
        self.server.event_ids = True
        self.server.cut_after_first_event = True
        call = self.add()
        self.flush()
        self.assertEqual(self.successResultOf(call).text, "5")
        get = [h for m, h, _ in self.server.requests if m == "GET"][-1]
        self.assertEqual(get["last-event-id"], "e1")
        self.assertEqual(self.server.calls_run, 1)

    def test_calls_in_flight_when_the_session_is_lost_are_each_resent(self) -> None:
        """Two calls still on their way when the loss is noticed are each refused, then re-sent; none is lost.

        The old connection is closed gracefully: its POSTs settle their own requests (refused, hence
        re-sent) instead of being cut off as of unknown fate.
        """
        self.server.hold_calls = True
        first, second = self.add(), self.add()
        self.server.restart()
        self.flush()
        self.assertEqual(self.status()["state"], "ready", "a new session was made on the GET stream's end")
        self.server.hold_calls = False
        self.server.release()
        self.flush()
        self.assertEqual((self.successResultOf(first).text, self.successResultOf(second).text), ("5", "5"))
        sessions = [h["mcp-session-id"] for h in self.posts("tools/call")]
        self.assertEqual(sessions, ["session-1", "session-1", "session-2", "session-2"])
        self.assertEqual(self.server.calls_run, 2)


class FakeLegacyServer(Resource):
    """A legacy HTTP+SSE MCP server: GET /sse names a per-session POST endpoint; answers go on the stream.

    ``forget()`` drops every session while keeping the streams open, as a restarted instance behind a
    proxy that keeps the client's stream would: a POST on a forgotten session is then answered 404.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0
        self.streams: dict[str, Request] = {}
        self.forgotten: list[Request] = []
        self.calls: list[str] = []

    def forget(self) -> None:
        """Forget every session (their streams stay open until the test ends)."""
        self.forgotten = list(self.streams.values())
        self.streams = {}

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.content is not None
        if request.method == b"GET":
            self.sessions += 1
            session = f"s{self.sessions}"
            request.setHeader("Content-Type", "text/event-stream")
            request.write(f"event: endpoint\ndata: /message?sessionId={session}\n\n".encode())
            self.streams[session] = request
            return NOT_DONE_YET
        session = request.args[b"sessionId"][0].decode()
        stream = self.streams.get(session)
        if stream is None:
            request.setResponseCode(404)
            return b"Could not find session"
        body = json.loads(request.content.read())
        if "id" in body and "method" in body:
            if body["method"] == "initialize":
                result: Any = {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "legacy", "version": "1"}}
            elif body["method"] == "tools/list":
                result = {"tools": [{"name": "add", "inputSchema": {"type": "object"}}]}
            else:
                self.calls.append(session)
                args = body["params"]["arguments"]
                result = {"content": [{"type": "text", "text": str(args["a"] + args["b"])}]}
            answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result})
            stream.write(f"event: message\ndata: {answer}\n\n".encode())
        request.setResponseCode(202)
        return b"Accepted"


class LegacySessionLossTests(SynchronousTestCase):
    """Legacy HTTP+SSE: a POST refused with 404 (session unknown) is a lost session, and its call is re-sent."""

    def test_404_on_the_endpoint_resends_the_call_on_a_new_stream(self) -> None:
        """The server forgets the session: the call's POST gets 404, the host reconnects, the call runs once."""
        server = FakeLegacyServer()
        stub = StubTreq(server)
        reactor = FakeProcessReactor()
        host = MCPHost(reactor, [ServerConfig("old", transport="sse", url="http://mcp.test/sse")],
                       http_client=stub)
        host.startService()
        stub.flush()
        self.assertEqual(host.status()[0]["state"], "ready")
        reactor.advance(5)
        server.forget()
        call = Deferred.fromCoroutine(host.call_tool("old__add", {"a": 2, "b": 3}))
        stub.flush()
        self.assertEqual(self.successResultOf(call).text, "5")
        self.assertEqual(server.calls, ["s2"], "refused on s1 unread, run once on s2")
        status = host.status()[0]
        self.assertEqual((status["state"], status["restarts"]), ("ready", 1))
        self.successResultOf(host.stopService())
        stub.flush()
