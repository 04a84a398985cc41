"""Several real daemons on one real PostgreSQL, a client sending each request to a different instance:
streams read anywhere (live, by several readers at once), resumed anywhere with ``Last-Event-ID``,
approvals decided anywhere exactly once, busy sessions seen everywhere, history current everywhere, and
an instance killed with ``kill -9`` mid-turn. Also: a second daemon on one SQLite file refuses to start."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import BIN, daemon_env, free_port
from tests.test_chat_e2e import ECHO, SUM, Chat, ThreadedUpstream, roles, user_id
from tests.test_daemon import start, write_daemon_config
from tests.test_daemon_postgres import launch_pg
from tests.upstream import text_stream

pytestmark = pytest.mark.slow

Json = dict[str, Any]
LEASE = 2.0
TIMEOUT = 30.0


def launch_instance(folder: Path, url: str, upstream: ThreadedUpstream) -> Chat:
    """A daemon on ``url`` asking the scripted upstream, with server-everything and approvals always asked."""
    extra = (
        "chat:\n  title_generation: false\n  keepalive_seconds: 0.2\n"
        f"  turn_lease_seconds: {LEASE}\n  approval:\n    policy: always\n"
    )
    return launch_pg(folder, url, extra, upstream_url=upstream.base_url)


@dataclass
class Cluster:
    """Instances on one database and the upstream they all ask."""

    upstream: ThreadedUpstream
    instances: list[Chat]


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    running = ThreadedUpstream()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory, pg_cluster: Any, upstream: ThreadedUpstream) -> Iterator[Cluster]:
    """Three instances (different ports) on one new database."""
    url = pg_cluster.create_database()
    folder = tmp_path_factory.mktemp("trio")
    instances: list[Chat] = []
    try:
        for name in "abc":
            instances.append(launch_instance(folder / name, url, upstream))
        yield Cluster(upstream, instances)
    finally:
        for instance in instances:
            instance.close()
        for instance in instances:
            assert "Traceback" not in instance.daemon.log.read_text()


def read_sse(chat: Chat, path: str, user: str, last_event_id: int | None = None) -> list[tuple[int, Json]]:
    """An SSE stream as (id, event) pairs until ``done``/``error``; ``last_event_id`` resumes after it."""
    headers = {"X-User-ID": user}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    connection = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=TIMEOUT)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        found: list[tuple[int, Json]] = []
        event_id: int | None = None
        while True:
            line = response.readline()
            if not line:
                return found
            if line.startswith(b"id:"):
                event_id = int(line[3:])
            elif line.startswith(b"data:"):
                assert event_id is not None
                event = json.loads(line[5:])
                found.append((event_id, event))
                event_id = None
                if event["type"] in ("done", "error"):
                    return found
    finally:
        connection.close()


def read_at_once(readers: list[tuple[Chat, str]], user: str) -> list[list[tuple[int, Json]]]:
    """Read several streams (instance, path) at the same time, on threads."""
    results: list[list[tuple[int, Json]]] = [[] for _ in readers]

    def read(index: int, chat: Chat, path: str) -> None:
        results[index] = read_sse(chat, path, user)

    threads = [threading.Thread(target=read, args=(i, chat, path)) for i, (chat, path) in enumerate(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    return results


def create_session(chat: Chat, user: str) -> str:
    status, body = chat.request("POST", "/v1/chat/sessions", user, {"title": "many instances"})
    assert status == 201, body
    return str(body["id"])


def slow_words(count: int, delay: float) -> Any:
    return text_stream([f"w{n} " for n in range(count)], delay=delay)


def test_each_request_on_another_instance(trio: Cluster) -> None:
    """Session created on the first, turn started on the second, its stream read on the third and the first
    at once; approval on the first, its live continuation read on the third and second; messages read on
    the second; resume with ``Last-Event-ID`` on the third gives exactly the events after that id."""
    a, b, c = trio.instances
    user = user_id()
    session = create_session(a, user)
    handle = b.ok(b.send(f"{ECHO}\n{SUM}", user, session, streaming=True))
    on_c, on_a = read_at_once([(c, handle["stream_url"]), (a, handle["stream_url"])], user)
    assert on_c == on_a
    assert [event["type"] for _, event in on_c][-2:] == ["tool_approval_request", "done"]
    assert [event_id for event_id, _ in on_c] == list(range(1, len(on_c) + 1))
    request_id = on_c[-2][1]["request_id"]

    trio.upstream.push(slow_words(20, 0.03))
    approved = a.ok(a.request("POST", f"/v1/chat/approvals/{request_id}?streaming=true", user, {"approve": True}))
    live_c, live_b = read_at_once([(c, approved["stream_url"]), (b, approved["stream_url"])], user)
    assert live_c == live_b
    kinds = [event["type"] for _, event in live_c]
    assert kinds[0] == "tool_execution" and kinds[-1] == "done"
    results = [e["result"] for e in live_c[0][1]["tool_executions"]]
    assert results == ["Echo: hi", "The sum of 2 and 3 is 5."]
    said = "".join(e.get("content", "") for _, e in live_c if e["type"] == "message")
    assert said.endswith("".join(f"w{n} " for n in range(20)))

    stored = b.messages(session, user)
    assert roles(stored) == ["user", "assistant", "tool", "tool", "assistant"]
    assert stored[-1]["content"] == "".join(f"w{n} " for n in range(20))

    for after in (1, 2, len(live_c) - 1):
        resumed = read_sse(c, approved["stream_url"], user, last_event_id=after)
        assert resumed == live_c[after:]
    status, _ = c.request("GET", approved["stream_url"], user=user_id())
    assert status == 404


def test_a_session_busy_on_one_instance_is_409_on_another(trio: Cluster) -> None:
    """While a turn runs on the first instance, a message to its session on the second is 409 (streamed or
    not) and nothing of it is stored; once the turn is over the second instance takes the next one."""
    a, b, _ = trio.instances
    user = user_id()
    session = create_session(a, user)
    trio.upstream.push(slow_words(15, 0.1))
    running = a.ok(a.send("take your time", user, session, streaming=True))
    for streaming in (True, False):
        status, body = b.send("me too", user, session, streaming=streaming)
        assert (status, body["error"]) == (409, "A turn is already running in this session")
        assert body["request_id"]
    events = read_sse(b, running["stream_url"], user)
    assert events[-1][1]["type"] == "done"
    after = b.ok(b.send("now me", user, session))
    assert after["message"]["content"] == "Echo: now me"
    assert [m["content"] for m in a.messages(session, user) if m["role"] == "user"] == ["take your time", "now me"]


def test_history_stored_through_one_instance_is_in_the_next_turn_on_another(trio: Cluster) -> None:
    """A message stored through the second instance is in the context the first sends to the model next."""
    a, b, c = trio.instances
    user = user_id()
    session = create_session(c, user)
    a.ok(a.send("first, on a", user, session))
    b.ok(b.send("second, on b", user, session))
    sent = trio.upstream.mark()
    a.ok(a.send("third, on a", user, session))
    context = [(m["role"], m["content"]) for m in sent()[-1]["messages"] if m["role"] != "system"]
    assert context == [
        ("user", "first, on a"),
        ("assistant", "Echo: first, on a"),
        ("user", "second, on b"),
        ("assistant", "Echo: second, on b"),
        ("user", "third, on a"),
    ]


def test_two_instances_racing_on_one_approval(trio: Cluster) -> None:
    """The same approval sent to two instances at the same moment (by the JSON route, or one of them by the
    ``[APPROVE_TOOLS:id]`` chat message): one 200, one 409, and the tool ran once (one tool result stored,
    one answer after it)."""
    a, b, c = trio.instances
    for attempt in range(4):
        user = user_id()
        first = a.ok(a.send(ECHO, user))
        request_id = first["approval_request"]["request_id"]
        barrier = threading.Barrier(2)
        statuses: dict[str, int] = {}

        def decide(chat: Chat, name: str, request_id: str = request_id, user: str = user,
                   barrier: threading.Barrier = barrier, statuses: dict[str, int] = statuses) -> None:
            barrier.wait()
            if name == "message":
                statuses[name] = chat.send(f"[APPROVE_TOOLS:{request_id}]", user)[0]
            else:
                statuses[name] = chat.request("POST", f"/v1/chat/approvals/{request_id}", user, {"approve": True})[0]

        deciders = [b, c] if attempt % 2 == 0 else [c, b]
        names = ["json", "message" if attempt >= 2 else "json too"]
        threads = [threading.Thread(target=decide, args=(chat, names[i])) for i, chat in enumerate(deciders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert sorted(statuses.values()) == [200, 409], statuses
        stored = a.messages(first["session_id"], user)
        assert roles(stored) == ["user", "assistant", "tool", "assistant"]


@pytest.fixture
def pair(tmp_path: Path, pg_url: str, upstream: ThreadedUpstream) -> Iterator[Cluster]:
    """Two instances on a new database (one of them is killed)."""
    instances: list[Chat] = []
    try:
        for name in "de":
            instances.append(launch_instance(tmp_path / name, pg_url, upstream))
        yield Cluster(upstream, instances)
    finally:
        for instance in instances:
            if instance.daemon.process.poll() is None:
                instance.close()


def test_kill_9_of_the_instance_running_a_turn(pair: Cluster) -> None:
    """The instance running a turn is killed mid-stream: within the lease the other instance ends the turn
    with an ``error`` event its reader gets, the user's message and the partial reply are stored, the session
    takes a new turn, and an approval the dead instance asked for is resolved on the live one."""
    doomed, alive = pair.instances
    user = user_id()
    waiting = doomed.ok(doomed.send(ECHO, user))
    request_id = waiting["approval_request"]["request_id"]

    pair.upstream.push(slow_words(100, 0.1))
    handle = doomed.ok(doomed.send("a long answer please", user, streaming=True))
    session = handle["session_id"]
    connection = http.client.HTTPConnection("127.0.0.1", alive.port, timeout=TIMEOUT)
    connection.request("GET", handle["stream_url"], headers={"X-User-ID": user})
    response = connection.getresponse()
    assert response.status == 200
    events: list[Json] = []
    killed_at = 0.0
    while True:
        line = response.readline()
        assert line, "the stream ended without a terminal event"
        if not line.startswith(b"data:"):
            continue
        events.append(json.loads(line[5:]))
        if len(events) == 5:
            doomed.daemon.process.send_signal(signal.SIGKILL)
            doomed.daemon.process.wait()
            killed_at = time.monotonic()
        if events[-1]["type"] in ("done", "error"):
            break
    connection.close()
    noticed = time.monotonic() - killed_at
    assert killed_at and events[-1]["type"] == "error"
    assert "lease expired" in events[-1]["error"]
    assert noticed <= LEASE + 0.5, noticed
    partial = "".join(e.get("content", "") for e in events if e["type"] == "message")
    assert partial.startswith("w0 w1 ") and len(partial) < len("".join(f"w{n} " for n in range(100)))
    stored = alive.messages(session, user)
    assert [(m["role"], m["content"]) for m in stored] == [("user", "a long answer please"), ("assistant", partial)]

    again = alive.ok(alive.send("are you there?", user, session))
    assert again["message"]["content"] == "Echo: are you there?"
    decided = alive.ok(alive.request("POST", f"/v1/chat/approvals/{request_id}", user, {"approve": True}))
    assert decided["message"]["tool_executions"][0]["result"] == "Echo: hi"


def test_a_second_daemon_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    """Two daemons cannot share a SQLite file: the second exits 1 saying why (and naming PostgreSQL)."""
    first_port = free_port()
    config = write_daemon_config(tmp_path, first_port)
    first = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], first_port)
    try:
        second = tmp_path / "second"
        second.mkdir()
        other = write_daemon_config(second, free_port())
        other.write_text(other.read_text().replace(str(second / "state"), str(tmp_path / "state")))
        result = subprocess.run(
            [str(BIN / "aichat-backend"), "-config", str(other)], env=daemon_env(), capture_output=True, timeout=60
        )
        assert result.returncode == 1
        log = (second / "log" / "aichat-backend.log").read_text()
        assert f"is in use by another aichat-backend (pid {first.process.pid})" in log
        assert "PostgreSQL" in log and "Traceback" not in log
        status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", first.base + "/health"],
                                capture_output=True, text=True, timeout=10).stdout
        assert status == "200"
    finally:
        first.stop()
