"""Metrics, request ids and readiness on a real daemon over a real port (mock model, no MCP servers)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests.support import free_port
from tests.test_daemon import BIN, Daemon, start, write_daemon_config

TOKEN = "metrics-token-0123456789"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with a metrics.token, for the module."""
    folder = tmp_path_factory.mktemp("metrics")
    port = free_port()
    config = write_daemon_config(folder, port, f"metrics:\n  token: {TOKEN}\n")
    running = start(folder, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    yield running
    running.stop()


def call(daemon: Daemon, method: str, path: str, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=20)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text``."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_a_turn_is_counted_and_scraped_from_loopback(daemon: Daemon) -> None:
    """A chat turn shows in the turn, token and HTTP metrics; loopback scrapes without a token."""
    status, _, _ = call(daemon, "POST", "/v1/chat/send", {"message": "hello"}, {"X-User-ID": "1"})
    assert status == 200
    status, headers, raw = call(daemon, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = raw.decode()
    assert sample(text, "aichat_chat_turns_started_total") >= 1
    assert sample(text, "aichat_chat_turns_finished_total", outcome="done") >= 1
    assert sample(text, "aichat_chat_turns_live") == 0
    assert sample(text, "gen_ai_server_time_to_first_token_seconds_count", gen_ai_provider_name="mock") >= 1
    assert sample(
        text, "http_server_request_duration_seconds_count",
        http_route="/v1/chat/send", http_request_method="POST", http_response_status_code="200",
    ) >= 1
    assert sample(text, "aichat_chat_approvals_pending") == 0
    assert sample(text, "db_client_operation_duration_seconds_count", db_system_name="sqlite",
                  db_operation_name="count_pending_approvals") >= 1
    assert "session" not in " ".join(line.split("{")[1] for line in text.splitlines() if "{" in line and
                                     not line.startswith("#")).replace("_session", "")


def test_a_proxied_scrape_needs_the_token(daemon: Daemon) -> None:
    """Through a proxy (X-Forwarded-For) the loopback peer is not enough; the metrics.token is."""
    status, headers, _ = call(daemon, "GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 401 and "bearer" in headers["www-authenticate"].lower()
    status, _, _ = call(daemon, "GET", "/metrics", headers={"X-Forwarded-For": "x", "Authorization": "Bearer nope"})
    assert status == 403
    status, _, raw = call(daemon, "GET", "/metrics",
                          headers={"X-Forwarded-For": "x", "Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"http_server_request_duration_seconds" in raw


def test_request_ids_in_headers_error_bodies_and_log_lines(daemon: Daemon) -> None:
    """The client's X-Request-ID comes back, is in the error body and in the log line of that request."""
    status, headers, raw = call(daemon, "GET", "/v1/chat/sessions/none", headers={"X-User-ID": "1",
                                                                                "X-Request-ID": "trace-42"})
    assert status == 404 and headers["x-request-id"] == "trace-42"
    assert json.loads(raw)["request_id"] == "trace-42"
    status, headers, _ = call(daemon, "GET", "/health", headers={"X-Request-ID": "bad id with spaces"})
    assert status == 200 and len(headers["x-request-id"]) == 32 and " " not in headers["x-request-id"]
    status, _, _ = call(daemon, "POST", "/v1/chat/send", {"message": "log me"},
                        {"X-User-ID": "1", "X-Request-ID": "trace-43"})
    assert status == 200
    lines = [line for line in daemon.log.read_text().splitlines() if "POST /v1/chat/send" in line]
    assert lines and lines[-1].endswith("[request_id=trace-43]")


def test_ready_once_the_database_answers(daemon: Daemon) -> None:
    """With no MCP servers, readiness is the database's."""
    status, _, raw = call(daemon, "GET", "/health/ready")
    body = json.loads(raw)
    assert status == 200 and body["status"] == "ready" and body["database"] == "ok" and body["reasons"] == []


def test_the_document_is_served(daemon: Daemon) -> None:
    """GET /openapi.json is the packaged document."""
    status, _, raw = call(daemon, "GET", "/openapi.json")
    assert status == 200 and json.loads(raw)["paths"]["/metrics"]
