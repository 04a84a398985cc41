"""The daemon as a real process: started by twistd and by aichat-backend, over a real listening port."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import BIN, ROOT, daemon_env, free_port, wait_for_http

pytestmark = pytest.mark.slow


@dataclass
class Daemon:
    """A running daemon process and where it listens and logs."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def write_daemon_config(folder: Path, port: int, extra: str = "") -> Path:
    """A config for a test daemon: loopback, mock LLM, SQLite and a log file in ``folder``."""
    config = folder / "config.yaml"
    servers = folder / "mcp-servers.json"
    servers.write_text('{"mcpServers": {}}')
    config.write_text(
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  shutdown_grace_seconds: 2\n"
        f"database:\n  path: {folder / 'state' / 'aichat.db'}\n"
        "llm:\n  provider: mock\n"
        f"mcp:\n  servers_file: {servers}\n"
        f"logging:\n  file: {folder / 'log' / 'aichat-backend.log'}\n  level: info\n" + extra
    )
    return config


def start(folder: Path, command: list[str], port: int) -> Daemon:
    """Start a daemon process and wait for /health."""
    process = subprocess.Popen(
        command, cwd=folder, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    daemon = Daemon(process, port, folder / "log" / "aichat-backend.log")
    try:
        wait_for_http(daemon.base + "/health", process=process)
    except AssertionError:
        process.kill()
        output = process.communicate()[0].decode(errors="replace")
        log = daemon.log.read_text() if daemon.log.exists() else ""
        raise AssertionError(f"daemon did not start:\n{output}\n{log}") from None
    return daemon


@pytest.fixture(params=["twistd", "aichat-backend"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """The daemon started the two supported ways, stopped afterwards."""
    port = free_port()
    config = write_daemon_config(tmp_path, port)
    if request.param == "twistd":
        command = [str(BIN / "twistd"), "-n", "--pidfile=", "aichat-backend", "--config", str(config)]
    else:
        command = [str(BIN / "aichat-backend"), "-config", str(config)]
    running = start(tmp_path, command, port)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def get_json(
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 5,
) -> tuple[int, object]:
    """A JSON request over the real port; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serves_health_and_sessions_then_stops_cleanly(daemon: Daemon) -> None:
    """The daemon answers /health and the sessions API, and exits 0 on SIGTERM with a clean log."""
    status, body = get_json(daemon.base + "/health")
    assert status == 200
    assert isinstance(body, dict)
    assert body["status"] == "ok"
    headers = {"X-User-ID": "3", "Content-Type": "application/json"}
    status, created = get_json(daemon.base + "/v1/chat/sessions", headers, "POST", b'{"title": "real"}')
    assert status == 201
    assert isinstance(created, dict)
    status, listing = get_json(daemon.base + "/v1/chat/sessions", headers)
    assert isinstance(listing, dict)
    assert [s["title"] for s in listing["sessions"]] == ["real"]
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "Listening on 127.0.0.1:" in log
    assert "Stopped" in log
    assert "Traceback" not in log
    assert daemon.process.stdout is not None
    console = daemon.process.stdout.read().decode()
    assert "Listening on 127.0.0.1:" in console, "start-up is announced on stderr for the journal"
    assert "Stopped" in console
    assert "GET /health" not in console, "access lines go to the log file only"


def test_oversized_body_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A declared Content-Length over the limit gets 413 at once, without sending the body."""
    port = free_port()
    config = write_daemon_config(tmp_path, port, "limits:\n  max_body_bytes: 2048\n")
    running = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/sessions HTTP/1.1\r\nHost: x\r\nX-User-ID: 1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
            )
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413 ")
        assert b'"error": "Request body too large: the limit is 2048 bytes"' in reply
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/sessions HTTP/1.1\r\nHost: x\r\nX-User-ID: 1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(3):
                sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413 ")
        status, _ = get_json(
            f"http://127.0.0.1:{port}/v1/chat/sessions",
            {"X-User-ID": "1", "Content-Type": "application/json"},
            "POST",
            b'{"title": "' + b"x" * 1000 + b'"}',
        )
        assert status == 201
    finally:
        assert running.stop() == 0


def test_sighup_reopens_moved_log_file(tmp_path: Path) -> None:
    """After logrotate moves the log and SIGHUP arrives, later lines land in the new file."""
    port = free_port()
    config = write_daemon_config(tmp_path, port)
    running = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    try:
        rotated = running.log.with_suffix(".log.1")
        running.log.rename(rotated)
        urllib.request.urlopen(running.base + "/health?before", timeout=5).read()
        running.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not running.log.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        urllib.request.urlopen(running.base + "/health?after", timeout=5).read()
    finally:
        assert running.stop() == 0
    old, new = rotated.read_text(), running.log.read_text()
    assert "GET /health?before" in old
    assert "GET /health?before" not in new
    assert "GET /health?after" in new
    assert "GET /health?after" not in old
    assert "SIGHUP: log file reopened" in new
    assert "Stopped" in new


def test_json_log_lines_have_no_record_separator(tmp_path: Path) -> None:
    """logging.format json writes one JSON object per line and no RS byte."""
    port = free_port()
    config = write_daemon_config(tmp_path, port)
    config.write_text(config.read_text().replace("level: info", "level: info\n  format: json"))
    running = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    assert running.stop() == 0
    raw = running.log.read_bytes()
    assert b"\x1e" not in raw
    records = [json.loads(line) for line in raw.decode().splitlines()]
    listening = [r for r in records if r["message"].startswith("Listening on")]
    assert listening
    assert listening[0]["port"] == port
    assert listening[0]["level"] == "info"


def test_bad_configuration_fails_fast_with_clear_error(tmp_path: Path) -> None:
    """A database path that cannot be created stops start-up with the reason and exit code 1."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    port = free_port()
    config = write_daemon_config(tmp_path, port)
    config.write_text(config.read_text().replace(str(tmp_path / "state" / "aichat.db"), str(blocker / "x.db")))
    result = subprocess.run(
        [str(BIN / "aichat-backend"), "-config", str(config)], env=daemon_env(), capture_output=True, timeout=30
    )
    assert result.returncode == 1
    log = (tmp_path / "log" / "aichat-backend.log").read_text()
    assert "Start-up failed: cannot use database" in log
    assert "Traceback" not in log


def test_sigterm_lets_an_in_flight_turn_finish(tmp_path: Path) -> None:
    """SIGTERM stops listening but the chat turn already under way completes and is answered; exit 0."""
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [str(BIN / "python"), "-m", "tests.upstream", "--port", str(upstream_port), "--first-delay", "1.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert upstream.stdout is not None
        assert b"listening on" in upstream.stdout.readline()
        port = free_port()
        config = write_daemon_config(tmp_path, port, "chat:\n  title_generation: false\n")
        config.write_text(config.read_text().replace(
            "llm:\n  provider: mock\n",
            f"llm:\n  provider: openai\n  base_url: http://127.0.0.1:{upstream_port}/v1\n  api_key: test\n",
        ))
        running = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
        answers: list[tuple[int, object]] = []
        sender = threading.Thread(target=lambda: answers.append(get_json(
            running.base + "/v1/chat/send", {"X-User-ID": "1", "Content-Type": "application/json"}, "POST",
            b'{"message": "still there"}',
        )))
        sender.start()
        time.sleep(0.5)
        running.process.send_signal(signal.SIGTERM)
        sender.join(15)
        assert running.process.wait(15) == 0
        assert len(answers) == 1
        status, body = answers[0]
        assert status == 200
        assert isinstance(body, dict) and body["message"]["content"] == "Echo: still there"
        with pytest.raises(urllib.error.URLError, match="Connection refused"):
            urllib.request.urlopen(running.base + "/health", timeout=2)
    finally:
        upstream.kill()
        upstream.wait()


def test_sighup_reloads_the_mcp_servers_file(tmp_path: Path) -> None:
    """SIGHUP starts a newly configured server; an invalid file is rejected and the running set stays."""
    port = free_port()
    config = write_daemon_config(tmp_path, port)
    running = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    servers = tmp_path / "mcp-servers.json"
    everything = ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"

    def tool_names() -> list[str]:
        status, body = get_json(running.base + "/api/v1/mcp/tools")
        assert status == 200 and isinstance(body, dict)
        return sorted(t["function_name"] for t in body["tools"])

    def wait_until(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    try:
        assert tool_names() == []
        entry = {"command": "node", "args": [str(everything), "stdio"]}
        servers.write_text(json.dumps({"mcpServers": {"everything": entry}}))
        running.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "everything__echo" in tool_names(), "everything's tools after SIGHUP")
        before = tool_names()
        servers.write_text("{not json")
        running.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: keeping the running MCP servers" in running.log.read_text(), "the rejection")
        assert tool_names() == before
    finally:
        assert running.stop() == 0


def test_malformed_multipart_gets_a_json_error(tmp_path: Path) -> None:
    """Multipart bodies are parsed by the route, so even a broken one is answered with JSON."""
    port = free_port()
    running = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(write_daemon_config(tmp_path, port))], port)
    try:
        for content_type, body, message in (
            ("multipart/form-data", b"no boundary at all", "Failed to parse multipart form"),
            ("multipart/form-data; boundary=xyz", b"--xyz\r\nbroken", "Failed to parse multipart form"),
        ):
            status, answer = get_json(
                running.base + "/v1/chat/send-with-files",
                {"X-User-ID": "1", "Content-Type": content_type},
                "POST",
                body,
            )
            assert status == 400
            assert isinstance(answer, dict) and answer["error"].startswith(message), answer
    finally:
        assert running.stop() == 0
