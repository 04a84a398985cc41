"""The real daemon process on PostgreSQL: the chat flow with a real MCP server and approvals, kept across a
restart; ``-validate`` and start-up refusing a database they cannot use with the database's own reason; and
the database going away and coming back while the daemon runs."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgcluster import PASSWORD, Cluster
from tests.support import BIN, daemon_env, free_port
from tests.test_chat_e2e import ECHO, ECHO_RESULT, MODULES, SUM, SUM_RESULT, Chat, roles, text
from tests.test_daemon import start, write_daemon_config

pytestmark = pytest.mark.slow


def pg_config(folder: Path, port: int, url: str, extra: str = "") -> Path:
    """A daemon config like the SQLite tests' but on the PostgreSQL database at ``url``."""
    config = write_daemon_config(folder, port, extra)
    sqlite_lines = f"database:\n  path: {folder / 'state' / 'aichat.db'}\n"
    config.write_text(
        config.read_text().replace(sqlite_lines, f"database:\n  dsn: {url}\n  connect_timeout_seconds: 2\n")
    )
    return config


def launch_pg(
    folder: Path, url: str, extra: str = "", servers: bool = True, upstream_url: str | None = None
) -> Chat:
    """A daemon on ``url`` with server-everything, waiting until its tools are offered; with
    ``upstream_url``, asking that OpenAI-compatible upstream instead of the mock model."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = pg_config(folder, port, url, extra)
    if upstream_url is not None:
        llm = f"llm:\n  provider: openai\n  base_url: {upstream_url}\n  api_key: sk-test\n  max_retries: 0\n"
        config.write_text(config.read_text().replace("llm:\n  provider: mock\n", llm))
    if servers:
        everything = {"command": "node", "args": [str(MODULES / "server-everything/dist/index.js"), "stdio"]}
        (folder / "mcp-servers.json").write_text(json.dumps({"mcpServers": {"everything": everything}}))
    chat = Chat(folder, config, port, start(folder, [str(BIN / "aichat-backend"), "-config", str(config)], port))
    if servers:
        try:
            chat.wait_for_tools("everything__echo")
        except AssertionError:
            chat.close()
            raise
    return chat


@pytest.fixture
def pg_chat(tmp_path: Path, pg_url: str) -> Iterator[Chat]:
    chat = launch_pg(tmp_path, pg_url, "chat:\n  approval:\n    policy: always\n")
    yield chat
    chat.close()


def test_chat_flow_on_postgres_survives_a_restart(pg_chat: Chat) -> None:
    """A turn asks for approval, the approved calls run on server-everything, the model answers over SSE;
    everything is stored in PostgreSQL and served the same after a restart. The log shows no password."""
    first = pg_chat.ok(pg_chat.send(f"{ECHO}\n{SUM}"))
    request = first["approval_request"]
    session = first["session_id"]
    done = pg_chat.ok(pg_chat.request("POST", f"/v1/chat/approvals/{request['request_id']}", body={"approve": True}))
    assert done["message"]["content"] == f"Mock summary of 2 tool result(s): {ECHO_RESULT} | {SUM_RESULT}"
    handle = pg_chat.ok(pg_chat.send("and now in words", session_id=session, streaming=True))
    status, events = pg_chat.events(handle["stream_url"])
    assert status == 200 and events[-1]["type"] == "done"
    assert "and now in words" in text(events)
    before = pg_chat.messages(session)
    assert roles(before) == ["user", "assistant", "tool", "tool", "assistant", "user", "assistant"]
    assert [m["tool_call_id"] for m in before[2:4]] == [c["id"] for c in before[1]["tool_calls"]]

    pg_chat.restart()
    assert pg_chat.messages(session) == before
    status, _ = pg_chat.request("GET", f"/v1/chat/sessions/{session}", user="2")
    assert status == 404
    log = pg_chat.daemon.log.read_text()
    assert "postgres:***@127.0.0.1" in log
    assert PASSWORD not in log
    assert "Traceback" not in log


def bad_urls(cluster: Cluster) -> list[tuple[str, str]]:
    """URLs the daemon cannot use, with the reason the database gives for each."""
    return [
        (cluster.url(password="wrong-password-1"), 'password authentication failed for user "postgres"'),
        (cluster.url("no_such_database"), 'database "no_such_database" does not exist'),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/x", "Connection refused"),
    ]


def test_validate_connects_and_reports_the_database_reason(tmp_path: Path, pg_cluster: Cluster, pg_url: str) -> None:
    """``-validate`` shows a usable URL masked and exits 0; wrong password, unknown database and nothing
    listening exit 1 with the database's reason and never the password."""
    config = pg_config(tmp_path, free_port(), pg_url)
    result = subprocess.run(
        [str(BIN / "aichat-backend"), "-config", str(config), "-validate"],
        env=daemon_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"postgresql://postgres:***@127.0.0.1:{pg_cluster.port}/" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    flagged = subprocess.run(
        [str(BIN / "aichat-backend"), "-env-only", "-validate", "-llm-provider", "mock", "-database-url", pg_url],
        env=daemon_env(), capture_output=True, text=True, timeout=60,
    )
    assert flagged.returncode == 0, flagged.stderr
    assert "(PostgreSQL, pool 10" in flagged.stdout and PASSWORD not in flagged.stdout
    for url, reason in bad_urls(pg_cluster):
        result = subprocess.run(
            [str(BIN / "aichat-backend"), "-env-only", "-validate", "-llm-provider", "mock"],
            env=daemon_env(AICHAT_DATABASE_URL=url), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 1, result.stdout
        assert reason in result.stderr
        password = url.split(":")[2].split("@")[0]
        assert password not in result.stdout + result.stderr


def test_start_up_fails_with_the_database_reason(tmp_path: Path, pg_cluster: Cluster) -> None:
    """The daemon exits 1 at start-up on a database it cannot use; the log has the reason, no password."""
    for index, (url, reason) in enumerate(bad_urls(pg_cluster)):
        folder = tmp_path / str(index)
        folder.mkdir()
        config = pg_config(folder, free_port(), url)
        result = subprocess.run(
            [str(BIN / "aichat-backend"), "-config", str(config)], env=daemon_env(), capture_output=True, timeout=60
        )
        assert result.returncode == 1
        log = (folder / "log" / "aichat-backend.log").read_text()
        assert "Start-up failed: cannot connect to database" in log
        assert reason in log
        password = url.split(":")[2].split("@")[0]
        assert password not in log + result.stdout.decode()
        assert "Traceback" not in log


def test_database_outage_is_503_then_recovers_without_a_restart(tmp_path: Path) -> None:
    """With the server stopped, requests that need the database answer 503 JSON within the connect
    timeout, /health says so, and a new turn ends with an error event; once the server is back the same
    daemon serves again."""
    cluster = Cluster()
    chat: Chat | None = None
    try:
        url = cluster.create_database()
        chat = launch_pg(tmp_path, url, "chat:\n  title_generation: false\n", servers=False)
        created = chat.ok(chat.send("hello"))
        session = created["session_id"]
        cluster.stop_server()

        started = time.monotonic()
        status, body = chat.request("GET", "/v1/chat/sessions")
        assert (status, body["error"]) == (503, "Database unavailable; try again shortly")
        assert body["request_id"]
        assert time.monotonic() - started < 2 + 1.5
        status, body = chat.request("GET", "/health", user=None)
        assert status == 503 and body["status"] == "unavailable"
        status, body = chat.request("GET", f"/v1/chat/sessions/{session}/messages")
        assert status == 503
        handle = chat.ok(chat.send("while it is down", streaming=True))
        status, events = chat.events(handle["stream_url"])
        assert status == 200 and events[-1]["type"] == "error", events

        cluster.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body = chat.request("GET", "/health", user=None)
            if status == 200:
                break
            time.sleep(0.2)
        assert (status, body["status"]) == (200, "ok")
        again = chat.ok(chat.send("back again", session_id=session))
        assert again["session_id"] == session
        assert [m["content"] for m in chat.messages(session) if m["role"] == "user"] == ["hello", "back again"]
        log = chat.daemon.log.read_text()
        assert "Traceback" not in log
    finally:
        if chat is not None:
            chat.close()
        cluster.stop()
