"""The daemon as a real process under hostile clients: SIGTERM with live streams, slow senders (slowloris),
oversized request heads, readers that never read, and the cap on readers per stream.

Each test runs the real daemon against the scripted upstream (``python -m tests.upstream``) over real
loopback sockets, as a client on the network would reach it.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import BIN, ROOT, free_port
from tests.test_daemon import Daemon, get_json, start, write_daemon_config

pytestmark = pytest.mark.slow

USER = {"X-User-ID": "5", "Content-Type": "application/json"}


@dataclass
class Upstream:
    """The scripted upstream as a process."""

    process: subprocess.Popen[bytes]
    port: int


def scripted_upstream(chunks: int, delay: float) -> Iterator[Upstream]:
    """The scripted upstream as a process streaming ``chunks`` deltas ``delay`` seconds apart."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "tests.upstream", "--port", str(port), "--chunks", str(chunks),
         "--delay", str(delay)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    assert b"listening on" in process.stdout.readline()
    yield Upstream(process, port)
    process.kill()
    process.wait()


@pytest.fixture
def slow_upstream() -> Iterator[Upstream]:
    """An upstream that streams 60 deltas 0.25 s apart: a turn lasts 15 s."""
    yield from scripted_upstream(60, 0.25)


@pytest.fixture
def fast_upstream() -> Iterator[Upstream]:
    """An upstream that streams 3000 deltas 1 ms apart: a large stream, fast, yet each turn lasts 3 s or more."""
    yield from scripted_upstream(3000, 0.001)


def daemon_on(tmp_path: Path, upstream: Upstream, chat: str = "", server: str = "") -> Daemon:
    """The daemon against ``upstream``, titles off, with extra ``chat`` and ``server`` settings."""
    port = free_port()
    config = write_daemon_config(tmp_path, port, "chat:\n  title_generation: false\n" + chat)
    config.write_text(config.read_text().replace(
        "llm:\n  provider: mock\n",
        f"llm:\n  provider: openai\n  base_url: http://127.0.0.1:{upstream.port}/v1\n  api_key: test\n",
    ).replace("  shutdown_grace_seconds: 2\n", "  shutdown_grace_seconds: 2\n" + server))
    return start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)


def stream_handle(daemon: Daemon, message: str) -> dict[str, str]:
    """Start a streaming turn; its handle."""
    status, body = get_json(daemon.base + "/v1/chat/send?streaming=true", USER, "POST",
                            json.dumps({"message": message}).encode())
    assert status == 200, body
    assert isinstance(body, dict)
    return body


@dataclass
class SSEClient:
    """Reads one stream on its own connection in a thread: events, and how the response ended."""

    port: int
    path: str
    events: list[dict[str, object]] = field(default_factory=list)
    ending: str = ""
    first: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", self.path, headers={"X-User-ID": "5"})
            response = connection.getresponse()
            buffer = b""
            while True:
                data = response.read1(65536)
                if not data:
                    self.ending = "complete"
                    break
                buffer += data
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    for line in frame.split(b"\n"):
                        if line.startswith(b"data: "):
                            self.events.append(json.loads(line[6:]))
                            self.first.set()
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            self.ending = f"broken: {type(e).__name__}"
        finally:
            self.first.set()
            connection.close()


def test_sigterm_ends_live_streams_with_an_error_event_and_keeps_what_was_said(
    tmp_path: Path, slow_upstream: Upstream
) -> None:
    """Streams still running when the grace ends each get an ``error`` event, then a complete response (no
    reset); the daemon exits 0; after a restart the user messages and partial replies are stored."""
    daemon = daemon_on(tmp_path, slow_upstream, chat="  max_stream_readers: 50\n")
    handles = [stream_handle(daemon, f"message {i} " + "word " * 5) for i in range(20)]
    clients = [SSEClient(daemon.port, handle["stream_url"]) for handle in handles]
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    for client in clients:
        assert client.first.wait(10)
    daemon.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(20)
    assert daemon.process.wait(20) == 0
    for client in clients:
        assert client.ending == "complete", (client.ending, client.events[-2:])
        assert client.events[-1]["type"] == "error"
        assert "shutting down" in str(client.events[-1]["error"])
        assert any(event["type"] == "message" for event in client.events)
    restarted = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(tmp_path / "config.yaml")],
                      daemon.port)
    try:
        for handle in handles:
            status, body = get_json(restarted.base + f"/v1/chat/sessions/{handle['session_id']}/messages", USER)
            assert status == 200
            assert isinstance(body, dict)
            roles = [m["role"] for m in body["messages"]]
            assert roles == ["user", "assistant"], roles
            assert body["messages"][1]["content"].startswith("Echo:")
    finally:
        restarted.stop()


def test_slow_senders_are_cut_at_the_request_deadline(tmp_path: Path, slow_upstream: Upstream) -> None:
    """A byte every 0.3 s keeps Twisted's idle timer alive; the request deadline (1 s) ends each with 408."""
    daemon = daemon_on(tmp_path, slow_upstream, server="  request_timeout_seconds: 1\n")
    try:
        sockets = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(50)]
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        started = time.monotonic()
        answers: dict[int, bytes] = {}
        for byte_index in range(len(request)):
            for number, sock in enumerate(sockets):
                if number in answers:
                    continue
                try:
                    sock.sendall(request[byte_index:byte_index + 1])
                except OSError:
                    sock.settimeout(2)
                    try:
                        answers[number] = sock.recv(4096) or b"closed"
                    except OSError:
                        answers[number] = b"reset"
            time.sleep(0.3)
            if time.monotonic() - started > 3:
                break
        for number, sock in enumerate(sockets):
            sock.settimeout(2)
            if number not in answers:
                try:
                    answers[number] = sock.recv(4096)
                except OSError:
                    answers[number] = b"reset"
            sock.close()
        assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers.values()), set(answers.values())
        status, _ = get_json(daemon.base + "/health")
        assert status == 200
    finally:
        daemon.stop()


def test_oversized_request_lines_and_headers_get_414_and_431(tmp_path: Path, slow_upstream: Upstream) -> None:
    """Past Twisted's limits a client gets a JSON answer saying which limit, not a closed connection."""
    daemon = daemon_on(tmp_path, slow_upstream)
    try:
        for head, status in (
            (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
        ):
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
                sock.sendall(head)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:80]
            assert "limit" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    finally:
        daemon.stop()


def test_readers_that_never_read_are_dropped_and_cost_others_nothing(tmp_path: Path, fast_upstream: Upstream) -> None:
    """Non-reading clients of a fast, large stream are dropped once they lag; the stream and another user's
    turn go on; a reader over the per-stream cap gets 429."""
    daemon = daemon_on(
        tmp_path, fast_upstream, chat="  max_stream_readers: 8\n  max_reader_lag_bytes: 65536\n"
    )
    try:
        handle = stream_handle(daemon, "x" * 2000)
        idle = []
        for _ in range(8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", daemon.port))
            sock.sendall(f"GET {handle['stream_url']} HTTP/1.1\r\nHost: x\r\nX-User-ID: 5\r\n\r\n".encode())
            idle.append(sock)
        time.sleep(0.5)
        status, body = get_json(daemon.base + handle["stream_url"], {"X-User-ID": "5"})
        assert status == 429 and isinstance(body, dict) and "Too many readers" in body["error"]
        other = {"X-User-ID": "6", "Content-Type": "application/json"}
        began = time.monotonic()
        status, answer = get_json(daemon.base + "/v1/chat/send", other, "POST", b'{"message": "hi"}', timeout=30)
        assert status == 200, answer
        assert time.monotonic() - began < 30
        deadline = time.monotonic() + 40
        closed = 0
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            received = b""
            try:
                while chunk := sock.recv(1 << 20):
                    received += chunk
                closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
            sock.close()
            if received:
                assert b"fell more than 65536 bytes behind" in received or b'"type":"done"' in received
        assert closed == 8
        log = daemon.log.read_text()
        assert "Dropping a stream reader" in log
    finally:
        daemon.stop()


def test_sigterm_answers_a_waiting_non_streaming_turn_with_503(tmp_path: Path, slow_upstream: Upstream) -> None:
    """A non-streaming turn still running at the end of the grace is answered 503 JSON saying why; the log
    has no traceback."""
    daemon = daemon_on(tmp_path, slow_upstream)
    answers: list[tuple[int, object]] = []

    def send() -> None:
        answers.append(get_json(daemon.base + "/v1/chat/send", USER, "POST", b'{"message": "long one"}', timeout=20))

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1)
    daemon.process.send_signal(signal.SIGTERM)
    sender.join(20)
    assert daemon.process.wait(20) == 0
    assert len(answers) == 1
    status, body = answers[0]
    assert status == 503
    assert isinstance(body, dict) and "shutting down" in str(body["error"])
    log = daemon.log.read_text()
    assert "Traceback" not in log and "Unhandled" not in log, log[-2000:]


def idle_post(port: int, path: str, body: dict[str, object], user: str) -> socket.socket:
    """A client that sends a request and then does not read (a 4 KiB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-User-ID: {user}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return sock


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or the deadline passes: an error)."""
    received = b""
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return received


def test_openai_streams_not_read_end_with_their_faces_error_and_cost_others_nothing(
    tmp_path: Path, fast_upstream: Upstream
) -> None:
    """Through a real port: a chat completions stream and a responses stream whose clients stop reading end,
    once chat.max_reader_lag_bytes wait unsent, with an error in each face's format; another user's request
    is answered meanwhile; the stored response's turn goes on and stores the whole answer."""
    daemon = daemon_on(tmp_path, fast_upstream, chat="  max_reader_lag_bytes: 65536\n")
    try:
        status, models = get_json(daemon.base + "/v1/models", {"X-User-ID": "5"})
        assert status == 200 and isinstance(models, dict)
        model = models["data"][0]["id"]
        text = "x" * 2000
        completions = idle_post(daemon.port, "/v1/chat/completions",
                                {"model": model, "stream": True, "messages": [{"role": "user", "content": text}]},
                                "5")
        responses = idle_post(daemon.port, "/v1/responses", {"model": model, "stream": True, "input": text}, "5")
        time.sleep(0.5)
        other = {"X-User-ID": "6", "Content-Type": "application/json"}
        began = time.monotonic()
        ask = {"model": model, "messages": [{"role": "user", "content": text}]}
        status, answer = get_json(daemon.base + "/v1/chat/completions", other, "POST", json.dumps(ask).encode(),
                                  timeout=30)
        assert status == 200 and isinstance(answer, dict), answer
        assert time.monotonic() - began < 30
        full = answer["choices"][0]["message"]["content"]
        deadline = time.monotonic() + 40
        chat_body = read_until_closed(completions, deadline)
        responses_body = read_until_closed(responses, deadline)
        assert b"[DONE]" not in chat_body
        last_chat = [line for line in chat_body.split(b"\n") if line.startswith(b"data: ")][-1]
        error = json.loads(last_chat[6:])["error"]
        assert error["code"] == "reader_lag" and "fell more than 65536 bytes behind" in error["message"]
        assert b"event: error\n" in responses_body and b"response.completed" not in responses_body
        last_event = [line for line in responses_body.split(b"\n") if line.startswith(b"data: ")][-1]
        assert json.loads(last_event[6:])["code"] == "reader_lag"
        session_id = json.loads(responses_body.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"]
        session_id = session_id.removeprefix("resp_").rsplit("_", 1)[0]
        stored: list[str] = []
        while time.monotonic() < deadline and not stored:
            status, page = get_json(daemon.base + f"/v1/chat/sessions/{session_id}/messages", {"X-User-ID": "5"})
            assert status == 200 and isinstance(page, dict)
            stored = [m["content"] for m in page["messages"] if m["role"] == "assistant"]
            time.sleep(0.2)
        assert stored == [full]
        log = daemon.log.read_text()
        assert log.count("Dropping an OpenAI stream reader") == 2
    finally:
        daemon.stop()
