"""The HTTP API through StubTreq: health, sessions, identity, the JSON error path and CORS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from aichat.api.app import API
from aichat.config import token_digest
from tests.support import build_api, inline_store, make_settings

USER = {"X-User-ID": "7"}
OTHER = {"X-User-ID": "8"}
TOKEN = "secret-token-for-tests-0001"


class Client:
    """A synchronous JSON client over StubTreq."""

    def __init__(self, resource: Any) -> None:
        self.treq: Any = StubTreq(resource)

    def raw(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> tuple[int, bytes, Any]:
        """Return (status, body bytes, response headers), the request and body read synchronously."""
        d = self.treq.request(method, "http://127.0.0.1" + path, data=body, headers=headers or {})
        self.treq.flush()
        responses: list[Any] = []
        d.addBoth(responses.append)
        content = self.treq.content(responses[0])
        self.treq.flush()
        out: list[bytes] = []
        content.addCallback(out.append)
        return responses[0].code, out[0], responses[0].headers

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """Return (status, decoded JSON body, response headers)."""
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        status, text, response_headers = self.raw(method, path, all_headers, data)
        return status, (json.loads(text) if text else None), response_headers


@pytest.fixture
def api_and_client(tmp_path: Path) -> tuple[API, Client]:
    """An API over a fresh inline SQLite store, with one bearer token configured for user 42."""
    settings = make_settings(
        tmp_path, f"auth:\n  tokens:\n    - {{token: {TOKEN}, user_id: 42}}\ncors:\n  origins: ['https://ui.example']\n"
    )
    clock = Clock()
    clock.advance(1_750_000_000)
    api, resource = build_api(settings, inline_store(settings.database.path), clock)
    return api, Client(resource)


@pytest.fixture
def client(api_and_client: tuple[API, Client]) -> Client:
    """Just the client."""
    return api_and_client[1]


def test_health_on_both_paths_without_auth(client: Client) -> None:
    """/health and /v1/chat/health answer the reference's shape with no identity."""
    for path in ("/health", "/v1/chat/health"):
        status, body, headers = client.call("GET", path)
        assert status == 200
        assert body == {"status": "ok", "timestamp": "2025-06-15T15:06:40Z", "version": "test"}
        assert headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]


def test_session_lifecycle(client: Client) -> None:
    """Create, get, list, rename, list messages, clear and delete with the reference's bodies."""
    status, created, _ = client.call("POST", "/v1/chat/sessions", {}, USER)
    assert status == 201
    assert created["title"] == "New Chat Session"
    assert created["user_id"] == "7"
    assert set(created) == {"id", "user_id", "title", "created_at", "updated_at"}
    sid = created["id"]
    assert client.call("GET", f"/v1/chat/sessions/{sid}", headers=USER)[1] == created
    status, listing, _ = client.call("GET", "/v1/chat/sessions", headers=USER)
    assert listing == {"sessions": [created], "pagination": {"page": 1, "limit": 20, "offset": 0}}
    status, body, _ = client.call("PUT", f"/v1/chat/sessions/{sid}", {"title": "Renamed"}, USER)
    assert (status, body) == (200, {"message": "Session updated successfully"})
    assert client.call("GET", f"/v1/chat/sessions/{sid}", headers=USER)[1]["title"] == "Renamed"
    status, body, _ = client.call("GET", f"/v1/chat/sessions/{sid}/messages", headers=USER)
    assert body == {"messages": [], "pagination": {"page": 1, "limit": 50, "offset": 0}}
    status, body, _ = client.call("DELETE", f"/v1/chat/sessions/{sid}/messages", headers=USER)
    assert (status, body) == (200, {"message": "Session messages cleared successfully"})
    status, body, _ = client.call("DELETE", f"/v1/chat/clear?session_id={sid}", headers=USER)
    assert (status, body) == (200, {"message": "Chat history cleared successfully"})
    status, body, _ = client.call("DELETE", f"/v1/chat/sessions/{sid}", headers=USER)
    assert (status, body) == (200, {"message": "Session deleted successfully"})
    assert client.call("GET", f"/v1/chat/sessions/{sid}", headers=USER)[:2] == (404, {"error": "Session not found"})


def test_pagination_rules(client: Client) -> None:
    """page < 1 becomes 1; limit outside 1..100 or non-numeric falls back to the default."""
    for title in ("a", "b", "c"):
        client.call("POST", "/v1/chat/sessions", {"title": title}, USER)
    _, body, _ = client.call("GET", "/v1/chat/sessions?page=2&limit=2", headers=USER)
    assert [s["title"] for s in body["sessions"]] == ["a"]
    assert body["pagination"] == {"page": 2, "limit": 2, "offset": 2}
    for query, expected in (("page=0&limit=500", (1, 20)), ("page=x&limit=y", (1, 20)), ("page=-3&limit=0", (1, 20))):
        _, body, _ = client.call("GET", f"/v1/chat/sessions?{query}", headers=USER)
        assert (body["pagination"]["page"], body["pagination"]["limit"]) == expected
    sid = body["sessions"][0]["id"]
    _, body, _ = client.call("GET", f"/v1/chat/sessions/{sid}/messages?limit=101", headers=USER)
    assert body["pagination"]["limit"] == 50


def test_other_users_session_is_404_everywhere(client: Client) -> None:
    """Per-user isolation: every route on another user's session answers 404 (never 500)."""
    sid = client.call("POST", "/v1/chat/sessions", {"title": "mine"}, USER)[1]["id"]
    for method, path, body in (
        ("GET", f"/v1/chat/sessions/{sid}", None),
        ("PUT", f"/v1/chat/sessions/{sid}", {"title": "x"}),
        ("DELETE", f"/v1/chat/sessions/{sid}", None),
        ("GET", f"/v1/chat/sessions/{sid}/messages", None),
        ("DELETE", f"/v1/chat/sessions/{sid}/messages", None),
        ("DELETE", f"/v1/chat/clear?session_id={sid}", None),
    ):
        status, answer, _ = client.call(method, path, body, OTHER)
        assert (status, answer) == (404, {"error": "Session not found"}), (method, path)
    assert client.call("GET", "/v1/chat/sessions", headers=OTHER)[1]["sessions"] == []
    assert client.call("GET", f"/v1/chat/sessions/{sid}", headers=USER)[0] == 200


@pytest.mark.parametrize("header", [None, "", "0", "-1", "+0", "abc", "1.5", "９", "1 2", "+", "9223372036854775808"])
def test_invalid_user_ids_are_401(client: Client, header: str | None) -> None:
    """Only base-10 integers > 0 are user ids; anything else on a user route is 401."""
    headers = {} if header is None else {"X-User-ID": header}
    status, body, _ = client.call("GET", "/v1/chat/sessions", headers=headers)
    assert status == 401
    assert body == {"error": "Authentication required: missing or invalid user ID"}


def test_bearer_tokens_map_to_users(client: Client) -> None:
    """A configured bearer token authenticates as its user; a wrong one is 401."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    created = client.call("POST", "/v1/chat/sessions", {"title": "t"}, auth)[1]
    assert created["user_id"] == "42"
    status, body, _ = client.call("GET", "/v1/chat/sessions", headers={"Authorization": "Bearer wrong"})
    assert (status, body) == (401, {"error": "Authentication required: invalid bearer token"})
    status, _, _ = client.call("GET", "/v1/chat/sessions", headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401


def test_x_user_id_only_from_trusted_proxies(tmp_path: Path) -> None:
    """With loopback not trusted, the X-User-ID header is refused with a message saying why."""
    settings = make_settings(tmp_path, "auth:\n  trusted_proxies: ['10.1.0.0/16']\n")
    _, resource = build_api(settings, inline_store(settings.database.path))
    status, body, _ = Client(resource).call("GET", "/v1/chat/sessions", headers=USER)
    assert status == 401
    assert "trusted proxies" in body["error"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"title": 5}', "field 'title' must be a string"),
        (b"", "a JSON object body is required"),
    ],
)
def test_bad_bodies_are_400_with_reason(client: Client, raw: bytes, message: str) -> None:
    """Malformed or mistyped bodies are 400 and say what is wrong."""
    status, body, _ = client.call("POST", "/v1/chat/sessions", headers={**USER, "Content-Type": "application/json"},
                                  raw=raw)
    assert status == 400
    assert message in body["error"]


def test_empty_title_on_rename_is_400(client: Client) -> None:
    """PUT with an empty title is the reference's 400 'Title is required'."""
    sid = client.call("POST", "/v1/chat/sessions", {}, USER)[1]["id"]
    assert client.call("PUT", f"/v1/chat/sessions/{sid}", {"title": " "}, USER)[:2] == (
        400,
        {"error": "Title is required"},
    )


def test_wrong_content_type_is_415(client: Client) -> None:
    """A form-encoded body on a JSON route is 415."""
    status, body, _ = client.call(
        "POST", "/v1/chat/sessions", headers={**USER, "Content-Type": "text/plain"}, raw=b"title=x"
    )
    assert status == 415
    assert "application/json" in body["error"]


def test_clear_requires_session_id(client: Client) -> None:
    """DELETE /v1/chat/clear without session_id is the reference's 400."""
    assert client.call("DELETE", "/v1/chat/clear", headers=USER)[:2] == (
        400,
        {"error": "session_id parameter is required"},
    )


def test_unknown_route_and_method_are_json(client: Client) -> None:
    """404 and 405 come as JSON errors, 405 with an Allow header."""
    assert client.call("GET", "/v1/chat/nothing-here")[:2] == (404, {"error": "Not found"})
    status, body, headers = client.call("PATCH", "/v1/chat/health")
    assert (status, body) == (405, {"error": "Method not allowed"})
    assert "GET" in headers.getRawHeaders("allow")[0]


def test_bugs_are_generic_500_with_logged_traceback(api_and_client: tuple[API, Client]) -> None:
    """An unexpected exception gives a generic 500 body; the traceback goes to the log only."""
    api, client = api_and_client

    @api.route("/boom", methods=["GET"])
    def boom(request: object) -> bytes:
        raise RuntimeError("internal detail")

    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        status, body, _ = client.call("GET", "/boom")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert (status, body) == (500, {"error": "Internal server error"})
    failures = [e for e in events if "log_failure" in e]
    assert failures
    assert "internal detail" in failures[0]["log_failure"].getTraceback()


def test_cors_preflight_and_headers(client: Client) -> None:
    """Allowed origins get CORS headers and a 204 preflight; others get none."""
    origin = {"Origin": "https://ui.example"}
    status, _, headers = client.call("OPTIONS", "/v1/chat/sessions", headers=origin)
    assert status == 204
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://ui.example"]
    assert "X-User-ID" in headers.getRawHeaders("access-control-allow-headers")[0]
    _, _, headers = client.call("GET", "/health", headers=origin)
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://ui.example"]
    assert headers.getRawHeaders("access-control-allow-credentials") == ["true"]
    _, _, headers = client.call("GET", "/health", headers={"Origin": "https://evil.example"})
    assert headers.getRawHeaders("access-control-allow-origin") is None


def _client_with(tmp_path: Path, yaml_text: str) -> Client:
    settings = make_settings(tmp_path, yaml_text)
    return Client(build_api(settings, inline_store(settings.database.path), Clock())[1])


def test_cors_is_off_by_default(tmp_path: Path) -> None:
    """With no origins configured, no page of another origin may read a response (PMM's UI is same-origin)."""
    client = _client_with(tmp_path, "")
    for method in ("GET", "OPTIONS"):
        _, _, headers = client.call(method, "/v1/chat/sessions", headers={"Origin": "https://evil.example", **USER})
        assert headers.getRawHeaders("access-control-allow-origin") is None
        assert headers.getRawHeaders("access-control-allow-credentials") is None


def test_cors_wildcard_never_allows_credentials(tmp_path: Path) -> None:
    """``*`` lets any page read public responses, never with the user's cookies."""
    client = _client_with(tmp_path, "cors:\n  origins: ['*']\n")
    status, _, headers = client.call("OPTIONS", "/v1/chat/sessions", headers={"Origin": "https://any.example"})
    assert status == 204
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert headers.getRawHeaders("access-control-allow-credentials") is None


def test_json_routes_need_a_json_content_type(client: Client) -> None:
    """A body without ``application/json`` (what a cross-site form can send without preflight) is 415."""
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {**USER, **({"Content-Type": content_type} if content_type else {})}
        status, body, _ = client.raw("POST", "/v1/chat/sessions", headers, b'{"title": "forged"}')
        assert status == 415, content_type
        assert "application/json" in json.loads(body)["error"]
    status, _, _ = client.call("GET", "/v1/chat/sessions", headers=USER)
    assert status == 200


@pytest.mark.parametrize(
    ("header", "user"), [("7", "7"), ("007", "7"), ("+7", "7"), ("9223372036854775807", "9223372036854775807")]
)
def test_reference_user_ids_are_accepted(client: Client, header: str, user: str) -> None:
    """Every id the reference's strconv.Atoi accepts works, normalised to its decimal form."""
    status, body, _ = client.call("POST", "/v1/chat/sessions", {}, {"X-User-ID": header})
    assert status == 201
    assert body["user_id"] == user


def test_token_digest_is_not_the_token() -> None:
    """Tokens are compared by SHA-256 digest."""
    assert token_digest(TOKEN) != TOKEN
    assert len(token_digest(TOKEN)) == 64


class FakeHost:
    """The MCP host part the restart route uses, recording restarts."""

    def __init__(self) -> None:
        self.restarted: list[str] = []

    async def restart(self, name: str) -> None:
        self.restarted.append(name)


ADMIN = "operator-token-for-tests-01"


def test_restarting_a_shared_mcp_server_is_an_operator_action(tmp_path: Path) -> None:
    """Users (through the proxy, or with their own token) get 403; an admin token or a local operator restarts."""
    settings = make_settings(
        tmp_path, f"auth:\n  tokens:\n    - {{token: {TOKEN}, user_id: 42}}\n  admin_tokens: [{ADMIN}]\n"
    )
    host = FakeHost()
    _, resource = build_api(settings, inline_store(settings.database.path), Clock(), mcp=host)
    client = Client(resource)
    path = "/api/v1/mcp/servers/everything/restart"
    assert client.call("POST", path, headers=USER)[0] == 403
    assert client.call("POST", path, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 403
    assert client.call("POST", path, headers={"X-Forwarded-For": "203.0.113.9"})[0] == 401
    assert host.restarted == []
    status, body, _ = client.call("POST", path, headers={"Authorization": f"Bearer {ADMIN}"})
    assert (status, body["server"]) == (200, "everything")
    assert client.call("POST", path)[0] == 200
    assert host.restarted == ["everything", "everything"]
