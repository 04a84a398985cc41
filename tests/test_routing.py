"""Route classes, their guards and body limits: ``API.mount``, ``@authorized``, ``@operator_only``,
``@body_limit`` with the channel's ``request_target``, the ``Page`` helper and the one ``ChatError``
translation, through StubTreq and over a memory transport with the daemon's own site."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from aichat.api import API, build_resource, route_classes
from aichat.api.app import json_response
from aichat.api.errors import APIError, BadRequest, from_chat
from aichat.api.identity import Identity
from aichat.api.pagination import Page
from aichat.api.routing import BodyLimits, authorized, body_limit, operator_only
from aichat.api.site import APIChannel, APISite
from aichat.chat.turn import ChatError
from tests.support import inline_store, make_settings
from tests.test_api import TOKEN, USER, Client

ADMIN = "operator-token-for-routing-01"
#: Routes that answer without an identity: the reference's open ones, and the machines'.
OPEN = {
    ("GET", "/health"),
    ("GET", "/v1/chat/health"),
    ("GET", "/health/ready"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/chat/mcp/tools"),
    ("GET", "/api/v1/mcp/tools"),
    ("GET", "/v1/chat/mcp/servers/status"),
    ("GET", "/api/v1/mcp/servers/status"),
}


@dataclass
class Probe:
    """A route class of guarded handlers that record who reached them."""

    identity: Identity
    seen: list[str] = field(default_factory=list)
    app = Klein()

    @app.route("/probe/user/<string:name>", methods=["GET"])
    @authorized
    async def user(self, request: IRequest, user: str, name: str) -> bytes:
        self.seen.append(f"{user}:{name}")
        return json_response(request, {"user": user, "name": name})

    @app.route("/probe/operator", methods=["POST"])
    @operator_only
    async def operator(self, request: IRequest) -> bytes:
        self.seen.append("operator")
        return json_response(request, {"ok": True})

    @app.route("/probe/upload", methods=["POST"])
    @body_limit(lambda limits: limits.max_upload_bytes)
    @authorized
    async def upload(self, request: IRequest, user: str) -> bytes:
        return json_response(request, {"read": len(request.content.read())})

    @app.route("/probe/refused", methods=["GET"])
    async def refused(self, request: IRequest) -> bytes:
        raise ChatError("approval request x was already approved", 409)


def api_for(tmp_path: Path, yaml_text: str = "") -> API:
    settings = make_settings(
        tmp_path,
        f"auth:\n  tokens:\n    - {{token: {TOKEN}, user_id: 42}}\n  admin_tokens: [{ADMIN}]\n" + yaml_text,
    )
    return API(settings=settings, store=inline_store(settings.database.path), clock=Clock(), version="test")


@pytest.fixture
def probe(tmp_path: Path) -> tuple[API, Probe, Client]:
    api = api_for(tmp_path)
    probe = Probe(api.identity)
    assert api.mount(probe) == ["/probe/user/<string:name>", "/probe/operator", "/probe/upload", "/probe/refused"]
    return api, probe, Client(build_resource(api))


def test_authorized_hands_the_handler_its_user(probe: tuple[API, Probe, Client]) -> None:
    """A token's user and a trusted proxy's X-User-ID reach the handler, after the request, with the path's
    parameters."""
    _, routes, client = probe
    assert client.call("GET", "/probe/user/a", headers={"Authorization": f"Bearer {TOKEN}"})[:2] == (
        200, {"user": "42", "name": "a"}
    )
    assert client.call("GET", "/probe/user/b", headers=USER)[:2] == (200, {"user": "7", "name": "b"})
    assert routes.seen == ["42:a", "7:b"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Authentication required: missing or invalid user ID"),
        ({"X-User-ID": "0"}, "Authentication required: missing or invalid user ID"),
        ({"Authorization": "Bearer not-a-token"}, "Authentication required: invalid bearer token"),
        ({"Authorization": "Basic eDp5"}, "Authentication required: unsupported Authorization scheme"),
    ],
)
def test_authorized_refuses_with_401_json_before_the_handler(
    probe: tuple[API, Probe, Client], headers: dict[str, str], message: str
) -> None:
    """No acceptable identity: 401 JSON naming why, and the handler never runs."""
    _, routes, client = probe
    status, body, response_headers = client.call("GET", "/probe/user/a", headers=headers)
    assert (status, body["error"]) == (401, message)
    assert response_headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    assert routes.seen == []


def test_operator_only_refuses_users_and_proxied_callers(probe: tuple[API, Probe, Client]) -> None:
    """A user (proxy header or user token) is 403, a proxied caller without identity 401; an admin token or a
    direct local call passes."""
    _, routes, client = probe
    assert client.call("POST", "/probe/operator", headers=USER)[0] == 403
    assert client.call("POST", "/probe/operator", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 403
    status, body, _ = client.call("POST", "/probe/operator", headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 401 and "admin_tokens" in body["error"]
    assert routes.seen == []
    assert client.call("POST", "/probe/operator", headers={"Authorization": f"Bearer {ADMIN}"})[0] == 200
    assert client.call("POST", "/probe/operator")[0] == 200
    assert routes.seen == ["operator", "operator"]


def test_a_chat_error_is_answered_with_its_status(probe: tuple[API, Probe, Client]) -> None:
    """A ChatError that reaches the error path is the client's error, not a 500."""
    _, _, client = probe
    assert client.call("GET", "/probe/refused")[:2] == (409, {"error": "approval request x was already approved"})
    error = from_chat(ChatError("Session not found", 404))
    assert isinstance(error, APIError) and (error.status, error.message) == (404, "Session not found")


def test_every_route_class_is_mounted(tmp_path: Path) -> None:
    """Each route class's rules are in the one app, under its class's endpoints; nothing else is."""
    api = api_for(tmp_path)
    build_resource(api)
    classes = route_classes(api)
    assert len(classes) == 9
    mounted = {(str(rule.endpoint), rule.rule) for rule in api.app.url_map.iter_rules()}
    expected = {
        (f"{type(routes).__name__}.{rule.endpoint}", rule.rule)
        for routes in classes
        for rule in type(routes).app.url_map.iter_rules()  # type: ignore[attr-defined]
    }
    assert mounted == expected
    assert len(mounted) == 30
    assert {name.split(".")[0] for name, _ in mounted} == {type(routes).__name__ for routes in classes}


def test_every_route_but_the_open_ones_needs_an_identity(tmp_path: Path) -> None:
    """A caller without identity (through a proxy, so not a local operator) is refused on every route that is
    not open: 401 JSON from ``@authorized``, ``@operator_only`` and the metrics guard alike."""
    api = api_for(tmp_path, "chat:\n  legacy_stream_get: true\n")
    client = Client(build_resource(api))
    checked = 0
    for rule in api.app.url_map.iter_rules():
        path = re.sub(r"<[^>]+>", "x", rule.rule)
        if rule.rule == "/v1/chat/stream":
            path += "?message=hi"
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            status, body, _ = client.call(method, path, headers={"X-Forwarded-For": "203.0.113.9"})
            if (method, rule.rule) in OPEN:
                assert status != 401, (method, rule.rule)
                continue
            assert status == 401, (method, rule.rule, status, body)
            assert "error" in body
            checked += 1
    assert checked == 30 - len(OPEN)


def connect(api: API) -> tuple[APIChannel, StringTransport]:
    """A channel of the daemon's site for ``api``, its body limits from the routes, on a memory transport."""
    site = APISite(build_resource(api), api.body_limit, reactor=Clock())
    peer = IPv4Address("TCP", "127.0.0.1", 5555)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    return channel, transport


def head(path: bytes, length: int) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nX-User-ID: 7\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def test_request_target_is_the_request_line_s_target(tmp_path: Path) -> None:
    """The seam the body limit reads: empty before a request line, then the target as sent."""
    channel, _ = connect(api_for(tmp_path))
    assert channel.request_target == b""
    channel.dataReceived(b"POST /v1/chat/send-with-files?streaming=true HTTP/1.1\r\nHost: x\r\n")
    assert channel.request_target == b"/v1/chat/send-with-files?streaming=true"


def test_a_body_over_its_route_s_limit_is_413_before_it_is_read(tmp_path: Path) -> None:
    """The upload route declares limits.max_upload_bytes; every other route has limits.max_body_bytes."""
    api = api_for(tmp_path, "limits:\n  max_body_bytes: 2000\n  max_upload_bytes: 5000\n")
    channel, transport = connect(api)
    channel.dataReceived(head(b"/v1/chat/sessions", 2001))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"the limit is 2000 bytes" in transport.value()

    channel, transport = connect(api)
    channel.dataReceived(head(b"/v1/chat/send-with-files", 5001))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"the limit is 5000 bytes" in transport.value()

    channel, transport = connect(api)
    channel.dataReceived(head(b"/v1/chat/send-with-files?streaming=true", 4000) + b"x" * 4000)
    reply = transport.value()
    assert not reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"multipart/form-data" in reply  # read whole and answered by the route: a JSON body is 415


def test_a_declared_limit_applies_to_its_own_route(tmp_path: Path) -> None:
    """``@body_limit`` on a route class of one's own: its route takes the upload limit, its neighbours don't."""
    api = api_for(tmp_path, "limits:\n  max_body_bytes: 1024\n  max_upload_bytes: 3000\n")
    api.mount(Probe(api.identity))
    assert (api.body_limit(b"/probe/upload"), api.body_limit(b"/probe/operator")) == (3000, 1024)
    channel, transport = connect(api)
    channel.dataReceived(head(b"/probe/upload", 2000) + b"y" * 2000)
    assert json.loads(transport.value().partition(b"\r\n\r\n")[2].split(b"\r\n")[1]) == {"read": 2000}


def test_body_limits_match_the_path_only() -> None:
    """The query is ignored, the path is percent-decoded; a path that is not UTF-8 or matches nothing gets the
    default."""
    limits = BodyLimits(10)
    assert limits(b"/anything") == 10
    limits.declare("/v1/chat/send-with-files", 99)
    limits.declare("/files/<string:name>", 77)
    assert limits(b"/v1/chat/send-with-files") == 99
    assert limits(b"/v1/chat/send-with-files?streaming=true") == 99
    assert limits(b"/v1/chat/send%2Dwith%2Dfiles") == 99
    assert limits(b"/files/a%20b") == 77
    assert limits(b"/v1/chat/send") == 10
    assert limits(b"/v1/chat/send-with-files/extra") == 10
    assert limits(b"/files/\xff") == 10
    assert limits(b"") == 10


def page_of(default: int, **args: str) -> Page:
    request = DummyRequest([b""])
    request.args = {name.encode(): [value.encode()] for name, value in args.items()}
    return Page.of(cast(IRequest, request), default)


def test_page_reads_the_reference_s_pagination() -> None:
    """Page and limit from the query, defaults for what is not an ASCII integer or out of range, 400 past
    64-bit offsets; the body says which page it is."""
    assert page_of(20) == Page(1, 20, 0)
    assert page_of(20, page="3", limit="10") == Page(3, 10, 20)
    assert page_of(50, page="²", limit="101") == Page(1, 50, 0)
    assert page_of(50, page="-4", limit="0") == Page(1, 50, 0)
    with pytest.raises(BadRequest):
        page_of(50, page="9" * 20)
    with pytest.raises(BadRequest):
        page_of(100, page="92233720368547760")
    assert Page(2, 5, 5).body("sessions", iter([{"id": "a"}])) == {
        "sessions": [{"id": "a"}],
        "pagination": {"page": 2, "limit": 5, "offset": 5},
    }
