"""End-to-end chat turns through the real daemon process, with the real npm MCP servers.

Three daemons are shared by the tests of this module (each started once):

- ``approving``: the offline mock model, approval policy ``always``, server-everything and
  server-filesystem (on a temporary folder): approval, denial, selective approval, two users kept apart;
- ``auto``: the mock model, policy ``auto`` with server-everything's ``echo`` and ``get-sum``
  auto-approved, a round cap of 3: auto-approval, the round cap, a restart between request and approval;
- ``openai``: the OpenAI client against :mod:`tests.upstream` (run in this process on a private reactor
  in a thread, so its received requests can be read and its replies scripted): a tool turn on the wire
  format, stream replay, an upstream failure mid-stream, files, clearing the history.

The mock model calls tools when the user's message has ``call <function> <json>`` lines and repeats
them for ever with ``loop`` (see :mod:`aichat.llm.mock`). Every wait polls with a deadline.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.threads import blockingCallFromThread

from tests.support import BIN, ROOT, free_port
from tests.test_daemon import Daemon, start, write_daemon_config
from tests.upstream import ReceivedRequest, Reset, Script, Sleep, Stall, Upstream, error_reply, text_stream, tool_stream

pytestmark = pytest.mark.slow

MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
TIMEOUT = 20.0
ECHO = 'call everything__echo {"message": "hi"}'
SUM = 'call everything__get-sum {"a": 2, "b": 3}'
ECHO_RESULT = "everything__echo: Echo: hi"
SUM_RESULT = "everything__get-sum: The sum of 2 and 3 is 5."
DENIED = "Tool execution was denied by the user."
EXPIRE_SECONDS = 4

Json = dict[str, Any]


# -- the daemon -------------------------------------------------------------------------------------


@dataclass
class Chat:
    """A daemon under test: its folder and config, the running process, and JSON/SSE helpers."""

    folder: Path
    config: Path
    port: int
    daemon: Daemon

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        user: str | None = "1",
        body: Json | None = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Json]:
        """One request; HTTP errors are returned, not raised."""
        headers = {"Content-Type": content_type}
        if user is not None:
            headers["X-User-ID"] = user
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def send(self, message: str, user: str = "1", session_id: str = "", streaming: bool = False) -> tuple[int, Json]:
        """``POST /v1/chat/send``."""
        body = {"message": message, **({"session_id": session_id} if session_id else {})}
        return self.request("POST", "/v1/chat/send" + ("?streaming=true" if streaming else ""), user, body)

    def ok(self, status_and_body: tuple[int, Json]) -> Json:
        """The body of a 200 answer (fails with the body otherwise)."""
        status, body = status_and_body
        assert status == 200, body
        return body

    def messages(self, session_id: str, user: str = "1") -> list[Json]:
        """What the session stored, oldest first."""
        listing = self.ok(self.request("GET", f"/v1/chat/sessions/{session_id}/messages?limit=100", user))
        messages: list[Json] = listing["messages"]
        return messages

    def events(
        self, path: str, user: str = "1", limit: int | None = None, pings: list[bytes] | None = None
    ) -> tuple[int, list[Json]]:
        """Read an SSE stream until ``done``/``error``, the end, or ``limit`` events (then hang up); comment
        lines (keep-alives) go to ``pings``."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            connection.request("GET", path, headers={"X-User-ID": user})
            response = connection.getresponse()
            if response.status != 200:
                return response.status, [json.loads(response.read())]
            assert response.getheader("Content-Type", "").startswith("text/event-stream")
            assert response.getheader("Cache-Control") == "no-cache"
            assert response.getheader("X-Accel-Buffering") == "no"
            events: list[Json] = []
            while limit is None or len(events) < limit:
                line = response.readline()
                if not line:
                    break
                if line.startswith(b":") and pings is not None:
                    pings.append(line.rstrip())
                elif line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    events.append(event)
                    if event["type"] in ("done", "error"):
                        break
            return 200, events
        finally:
            connection.close()

    def wait_for_tools(self, *names: str) -> None:
        """Poll the tool list until the MCP servers offer ``names``."""
        deadline = time.monotonic() + TIMEOUT
        offered: set[str] = set()
        while time.monotonic() < deadline:
            status, body = self.request("GET", "/v1/chat/mcp/tools", None)
            offered = {tool["function_name"] for tool in body.get("tools", [])} if status == 200 else set()
            if set(names) <= offered:
                return
            time.sleep(0.05)
        raise AssertionError(f"MCP tools {names} not offered within {TIMEOUT}s; offered: {sorted(offered)}")

    def restart(self) -> None:
        """Stop with SIGTERM (exit 0 expected) and start again on the same port and database."""
        assert self.daemon.stop() == 0
        self.daemon = start(self.folder, [str(BIN / "aichat-backend"), "-config", str(self.config)], self.port)

    def close(self) -> None:
        """Stop the daemon; kill it if it does not stop."""
        try:
            self.daemon.stop()
        except Exception:
            self.daemon.process.kill()
            self.daemon.process.wait()


def launch(folder: Path, chat_yaml: str, llm_yaml: str = "", filesystem: Path | None = None) -> Chat:
    """Start a daemon in ``folder`` with server-everything (and server-filesystem on ``filesystem``)."""
    if not (MODULES / "server-everything").is_dir():
        pytest.fail("node_modules is missing: run `npm ci` (or `make setup`) first")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_daemon_config(folder, port, chat_yaml)
    if llm_yaml:
        config.write_text(config.read_text().replace("llm:\n  provider: mock\n", llm_yaml))
    servers: Json = {
        "everything": {"command": "node", "args": [str(MODULES / "server-everything/dist/index.js"), "stdio"]}
    }
    if filesystem is not None:
        servers["filesystem"] = {
            "command": "node",
            "args": [str(MODULES / "server-filesystem/dist/index.js"), str(filesystem)],
        }
    (folder / "mcp-servers.json").write_text(json.dumps({"mcpServers": servers}))
    daemon = start(folder, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    chat = Chat(folder, config, port, daemon)
    try:
        chat.wait_for_tools("everything__echo", *(["filesystem__read_text_file"] if filesystem else []))
    except AssertionError:
        chat.close()
        raise
    return chat


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder server-filesystem may read and write."""
    folder = tmp_path_factory.mktemp("files").resolve()
    (folder / "notes.txt").write_text("the code word is marmalade\n")
    return folder


@pytest.fixture(scope="module")
def approving(tmp_path_factory: pytest.TempPathFactory, files: Path) -> Iterator[Chat]:
    """Mock model, every tool call needs approval, approvals expire after ``EXPIRE_SECONDS``."""
    chat = launch(
        tmp_path_factory.mktemp("approving"),
        f"chat:\n  approval:\n    policy: always\n    expire_seconds: {EXPIRE_SECONDS}\n",
        filesystem=files,
    )
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def auto(tmp_path_factory: pytest.TempPathFactory, files: Path) -> Iterator[Chat]:
    """Mock model, ``echo`` and ``get-sum`` auto-approved, a round cap of 3."""
    chat = launch(
        tmp_path_factory.mktemp("auto"),
        "chat:\n  max_tool_rounds: 3\n  approval:\n    policy: auto\n"
        '    auto_approve: ["everything/echo", "everything__get-sum"]\n',
        filesystem=files,
    )
    yield chat
    chat.close()


# -- the upstream, in this process --------------------------------------------------------------------


class ThreadedUpstream:
    """:class:`tests.upstream.Upstream` on a private reactor running in a thread."""

    def __init__(self) -> None:
        self.reactor = EPollReactor()
        self.upstream = Upstream(self.reactor)
        self.upstream.listen()
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, name="upstream", daemon=True
        )
        self.thread.start()

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    def push(self, *scripts: Script) -> None:
        """Queue scripts for the next requests (the responder answers when the queue is empty)."""
        blockingCallFromThread(self.reactor, self.upstream.push, *scripts)

    def requests(self) -> list[ReceivedRequest]:
        """The requests received so far."""
        found: list[ReceivedRequest] = blockingCallFromThread(self.reactor, lambda: list(self.upstream.requests))
        return found

    def mark(self) -> Callable[[], list[Json]]:
        """A function returning the bodies of the requests received from now on."""
        already = len(self.requests())
        return lambda: [r.body for r in self.requests()[already:]]

    def stop(self) -> None:
        stopped = threading.Event()

        def stopping() -> None:
            Deferred.fromCoroutine(self.upstream.stop()).addBoth(lambda _: stopped.set())

        self.reactor.callFromThread(stopping)
        stopped.wait(10)
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    """The scripted OpenAI-wire-format server."""
    running = ThreadedUpstream()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def openai(tmp_path_factory: pytest.TempPathFactory, upstream: ThreadedUpstream) -> Iterator[Chat]:
    """The OpenAI client against the upstream: no retries, a 2 s deadline to the first byte, no titles,
    keep-alives every 0.1 s; server-everything auto-approved."""
    chat = launch(
        tmp_path_factory.mktemp("openai"),
        "chat:\n  title_generation: false\n  keepalive_seconds: 0.1\n  legacy_stream_get: true\n"
        '  approval:\n    policy: auto\n    auto_approve: ["everything/*"]\n',
        f"llm:\n  provider: openai\n  base_url: {upstream.base_url}\n  api_key: sk-test\n  max_retries: 0\n"
        "  timeout_seconds: 2\n",
    )
    yield chat
    chat.close()


def user_id() -> str:
    """A user of its own for one test."""
    return str(uuid.uuid4().int % 10**9 + 1)


def roles(messages: list[Json]) -> list[str]:
    return [m["role"] for m in messages]


def text(events: list[Json]) -> str:
    return "".join(e.get("content", "") for e in events if e["type"] == "message")


# -- approvals ---------------------------------------------------------------------------------------


def test_approved_calls_run_on_the_mcp_server_and_the_model_answers(approving: Chat) -> None:
    """Two calls wait for approval; approving them by the API runs both on server-everything, stores each
    result with its tool_call_id and the model's answer; the approval cannot be used twice."""
    first = approving.ok(approving.send(f"{ECHO}\n{SUM}"))
    request = first["approval_request"]
    assert [c["function"]["name"] for c in request["tool_calls"]] == ["everything__echo", "everything__get-sum"]
    assert request["processed"] is False
    assert first["message"]["content"] == ""
    assert "tool_executions" not in first["message"]
    session = first["session_id"]

    done = approving.ok(
        approving.request("POST", f"/v1/chat/approvals/{request['request_id']}", body={"approve": True})
    )
    assert done["session_id"] == session
    assert done["message"]["content"] == f"Mock summary of 2 tool result(s): {ECHO_RESULT} | {SUM_RESULT}"
    executions = done["message"]["tool_executions"]
    assert [(e["tool_name"], e["result"]) for e in executions] == [
        ("everything__echo", "Echo: hi"),
        ("everything__get-sum", "The sum of 2 and 3 is 5."),
    ]
    assert "approval_request" not in done

    stored = approving.messages(session)
    assert roles(stored) == ["user", "assistant", "tool", "tool", "assistant"]
    call_ids = [c["id"] for c in stored[1]["tool_calls"]]
    assert [m["tool_call_id"] for m in stored[2:4]] == call_ids
    assert stored[2]["tool_executions"][0]["result"] == "Echo: hi"
    assert stored[4]["content"] == done["message"]["content"]

    status, again = approving.request("POST", f"/v1/chat/approvals/{request['request_id']}", body={"approve": True})
    assert status == 409, again


def test_chat_command_approves_a_filesystem_call_with_a_stream(approving: Chat, files: Path) -> None:
    """``[APPROVE_TOOLS:<id>]`` with ``?streaming=true`` returns a stream handle; the SSE stream carries the
    server-filesystem result, the model's answer word by word, then ``done``."""
    call = f'call filesystem__read_text_file {{"path": "{files / "notes.txt"}"}}'
    status, handle = approving.send(call, streaming=True)
    assert status == 200, handle
    assert handle["stream_url"] == f"/v1/chat/stream/{handle['stream_id']}"
    status, events = approving.events(handle["stream_url"])
    assert status == 200
    assert [e["type"] for e in events] == ["tool_approval_request", "done"]
    request_id = events[0]["request_id"]
    assert events[0]["tool_calls"][0]["function"]["name"] == "filesystem__read_text_file"

    handle = approving.ok(approving.send(f"[APPROVE_TOOLS:{request_id}]", streaming=True))
    assert handle["session_id"] == events[0]["session_id"]
    status, events = approving.events(handle["stream_url"])
    assert status == 200
    assert events[0]["type"] == "tool_execution"
    assert events[0]["tool_executions"][0]["result"] == "the code word is marmalade\n"
    assert events[-1]["type"] == "done"
    assert "Mock summary of 1 tool result(s): filesystem__read_text_file: the code word is marmalade" in text(events)


def test_denial_is_fed_back_and_the_model_answers(approving: Chat) -> None:
    """``[DENY_TOOLS:<id>]`` runs nothing, stores a denial as the call's result, and the model answers."""
    first = approving.ok(approving.send(ECHO))
    request = first["approval_request"]
    denied = approving.ok(approving.send(f"[DENY_TOOLS:{request['request_id']}]"))
    assert denied["session_id"] == first["session_id"]
    assert denied["message"]["content"] == f"Mock summary of 1 tool result(s): everything__echo: {DENIED}"
    assert "tool_executions" not in denied["message"]
    stored = approving.messages(first["session_id"])
    assert roles(stored) == ["user", "assistant", "tool", "assistant"]
    assert stored[2]["tool_call_id"] == request["tool_calls"][0]["id"]
    assert stored[2]["content"] == DENIED
    assert "tool_executions" not in stored[2]


def test_selective_approval_runs_only_the_chosen_calls(approving: Chat) -> None:
    """Approving a subset of ``tool_call_ids`` runs those calls and refuses the others; ids that are not in
    the request are a 400 and leave it pending."""
    first = approving.ok(approving.send(f"{ECHO}\n{SUM}"))
    request = first["approval_request"]
    echo_id, sum_id = (c["id"] for c in request["tool_calls"])
    path = f"/v1/chat/approvals/{request['request_id']}"
    status, body = approving.request("POST", path, body={"approve": True, "tool_call_ids": ["call_nope"]})
    assert status == 400, body
    done = approving.ok(approving.request("POST", path, body={"approve": True, "tool_call_ids": [sum_id]}))
    assert [e["id"] for e in done["message"]["tool_executions"]] == [sum_id]
    assert done["message"]["content"] == f"Mock summary of 2 tool result(s): everything__echo: {DENIED} | {SUM_RESULT}"
    stored = approving.messages(first["session_id"])
    results = {m["tool_call_id"]: m["content"] for m in stored if m["role"] == "tool"}
    assert results == {echo_id: DENIED, sum_id: "The sum of 2 and 3 is 5."}


def test_tool_error_goes_back_to_the_model_as_a_result(approving: Chat, files: Path) -> None:
    """A call the MCP server refuses (a path outside server-filesystem's folder) is recorded as a failed
    execution and given to the model as the call's result; the turn ends normally with the model's answer."""
    outside = files.parent / "outside.txt"
    first = approving.ok(approving.send(f'call filesystem__read_text_file {{"path": "{outside}"}}'))
    done = approving.ok(
        approving.request(
            "POST", f"/v1/chat/approvals/{first['approval_request']['request_id']}", body={"approve": True}
        )
    )
    [execution] = done["message"]["tool_executions"]
    assert execution["result"] == ""
    assert "outside allowed directories" in execution["error"]
    assert done["message"]["content"].startswith("Mock summary of 1 tool result(s): filesystem__read_text_file: ")
    assert "outside allowed directories" in done["message"]["content"]
    stored = approving.messages(first["session_id"])
    assert roles(stored) == ["user", "assistant", "tool", "assistant"]
    assert stored[2]["content"] == execution["error"]


def test_expired_approval_cannot_be_resolved(approving: Chat) -> None:
    """Once ``chat.approval.expire_seconds`` have passed, approving is a 409 and the call never runs."""
    first = approving.ok(approving.send(ECHO))
    request = first["approval_request"]
    expires = datetime.strptime(request["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert expires > datetime.now(UTC)
    deadline = time.monotonic() + EXPIRE_SECONDS + TIMEOUT
    while datetime.now(UTC) <= expires and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body = approving.request("POST", f"/v1/chat/approvals/{request['request_id']}", body={"approve": True})
    assert status == 409, body
    assert "expired" in body["error"]
    assert roles(approving.messages(first["session_id"])) == ["user", "assistant"]


def test_two_users_are_kept_apart(approving: Chat) -> None:
    """Another user's session, messages, stream and approval are all 404 (by the API and by chat command),
    and none of those attempts resolves the owner's approval; an unknown session id is 404, not replaced."""
    owner, other = user_id(), user_id()
    handle = approving.ok(approving.send(ECHO, user=owner, streaming=True))
    session, stream_url = handle["session_id"], handle["stream_url"]
    _, events = approving.events(stream_url, owner)
    request_id = events[0]["request_id"]

    assert approving.events(stream_url, other)[0] == 404
    assert approving.request("GET", f"/v1/chat/sessions/{session}", other)[0] == 404
    assert approving.request("GET", f"/v1/chat/sessions/{session}/messages", other)[0] == 404
    assert approving.send("hello", user=other, session_id=session)[0] == 404
    assert approving.request("POST", f"/v1/chat/approvals/{request_id}", other, {"approve": True})[0] == 404
    assert approving.send(f"[APPROVE_TOOLS:{request_id}]", user=other)[0] == 404
    assert approving.send(f"[DENY_TOOLS:{request_id}]", user=other)[0] == 404
    assert approving.request("DELETE", f"/v1/chat/clear?session_id={session}", other)[0] == 404
    assert approving.send("hello", user=owner, session_id=str(uuid.uuid4()))[0] == 404
    listing = approving.ok(approving.request("GET", "/v1/chat/sessions", other))
    assert session not in [s["id"] for s in listing["sessions"]]

    done = approving.ok(approving.request("POST", f"/v1/chat/approvals/{request_id}", owner, {"approve": True}))
    assert done["message"]["tool_executions"][0]["result"] == "Echo: hi"
    assert roles(approving.messages(session, owner)) == ["user", "assistant", "tool", "assistant"]


# -- auto-approval, the round cap, restart -----------------------------------------------------------


def test_auto_approved_calls_run_at_once_and_others_still_ask(auto: Chat, files: Path) -> None:
    """Under policy ``auto`` the listed tools run without asking; in a mixed round the listed call runs and
    only the other one waits for approval, and the answer covers both results."""
    done = auto.ok(auto.send(f"{ECHO}\n{SUM}"))
    assert "approval_request" not in done
    assert done["message"]["content"] == f"Mock summary of 2 tool result(s): {ECHO_RESULT} | {SUM_RESULT}"
    assert len(done["message"]["tool_executions"]) == 2

    listing = f'call filesystem__list_directory {{"path": "{files}"}}'
    mixed = auto.ok(auto.send(f"{ECHO}\n{listing}"))
    assert [e["tool_name"] for e in mixed["message"]["tool_executions"]] == ["everything__echo"]
    request = mixed["approval_request"]
    assert [c["function"]["name"] for c in request["tool_calls"]] == ["filesystem__list_directory"]
    done = auto.ok(auto.request("POST", f"/v1/chat/approvals/{request['request_id']}", body={"approve": True}))
    assert done["message"]["content"].startswith(f"Mock summary of 2 tool result(s): {ECHO_RESULT} | ")
    assert "[FILE] notes.txt" in done["message"]["content"]


def test_round_cap_stops_a_model_that_keeps_calling_tools(auto: Chat) -> None:
    """A model that calls a tool after every result is stopped after ``chat.max_tool_rounds`` rounds with a
    clear message; the last calls are answered as not executed, so the history stays valid."""
    done = auto.ok(auto.send('loop everything__echo {"message": "again"}'))
    message = done["message"]
    assert len(message["tool_executions"]) == 3
    assert "Stopped after 3 tool rounds (chat.max_tool_rounds)" in message["content"]
    stored = auto.messages(done["session_id"])
    calls = [m for m in stored if m["role"] == "assistant" and m.get("tool_calls")]
    assert len(calls) == 4
    results = [m for m in stored if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == [m["tool_calls"][0]["id"] for m in calls]
    assert results[-1]["content"] == "Tool call was not executed: the tool round limit was reached."
    assert stored[-1]["role"] == "assistant"
    assert "Stopped after 3 tool rounds" in stored[-1]["content"]


def test_pending_approval_survives_a_restart(auto: Chat, files: Path) -> None:
    """An approval asked for before a restart is still pending after it and, once approved, runs the call
    (a real file is written) and the model answers in the same session."""
    target = files / "written.txt"
    call = f'call filesystem__write_file {{"path": "{target}", "content": "after restart"}}'
    first = auto.ok(auto.send(call))
    request_id = first["approval_request"]["request_id"]
    assert not target.exists()

    auto.restart()
    auto.wait_for_tools("filesystem__write_file")

    done = auto.ok(auto.send(f"[APPROVE_TOOLS:{request_id}]"))
    assert done["session_id"] == first["session_id"]
    assert target.read_text() == "after restart"
    assert done["message"]["content"].startswith("Mock summary of 1 tool result(s): filesystem__write_file: ")
    assert roles(auto.messages(first["session_id"])) == ["user", "assistant", "tool", "assistant"]


# -- the OpenAI client against the upstream ----------------------------------------------------------


def test_openai_tool_turn_on_the_wire_format(openai: Chat, upstream: ThreadedUpstream) -> None:
    """Parallel tool calls split across deltas by index are assembled and run on server-everything; the
    follow-up request carries the assistant ``tool_calls`` and one ``tool`` message per ``tool_call_id``."""
    since = upstream.mark()
    upstream.push(
        tool_stream(
            [
                ("call_a", "everything__echo", '{"message": "split"}'),
                ("call_b", "everything__get-sum", '{"a": 40, "b": 2}'),
            ],
            pieces=4,
        ),
        text_stream(["The ", "answer ", "is ", "42."]),
    )
    done = openai.ok(openai.send("use the tools"))
    assert done["message"]["content"] == "The answer is 42."
    assert [(e["id"], e["result"]) for e in done["message"]["tool_executions"]] == [
        ("call_a", "Echo: split"),
        ("call_b", "The sum of 40 and 2 is 42."),
    ]

    first, follow_up = since()
    assert first["stream"] is True
    assert "everything__echo" in [t["function"]["name"] for t in first["tools"]]
    assert first["messages"][0]["role"] == "system"
    assert first["messages"][-1] == {"role": "user", "content": "use the tools"}
    assert follow_up["messages"][1:-3] == first["messages"][1:]
    assistant, *results = follow_up["messages"][-3:]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "everything__echo", "arguments": '{"message": "split"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "everything__get-sum", "arguments": '{"a": 40, "b": 2}'},
        },
    ]
    assert results == [
        {"role": "tool", "tool_call_id": "call_a", "content": "Echo: split"},
        {"role": "tool", "tool_call_id": "call_b", "content": "The sum of 40 and 2 is 42."},
    ]


def test_upstream_failure_mid_stream_is_an_error_event_and_the_partial_text_is_kept(
    openai: Chat, upstream: ThreadedUpstream
) -> None:
    """A connection reset after some text ends the stream with an ``error`` event (no ``done``) and the text
    received so far is stored; before any text, an upstream error answers a non-streaming send with 502 JSON
    (the upstream's message, never our key) and silence past ``llm.timeout_seconds`` with 504."""
    # The pause lets the text leave before the reset (an abort drops unsent bytes).
    upstream.push(text_stream(["Partial ", "answer"], done=False).plus(Sleep(0.2), Reset()))
    handle = openai.ok(openai.send("tell me", streaming=True))
    status, events = openai.events(handle["stream_url"])
    assert status == 200
    assert [e["type"] for e in events] == ["message", "message", "error"]
    assert text(events) == "Partial answer"
    assert events[-1]["error"].startswith("Failed to process message: ")
    stored = openai.messages(handle["session_id"])
    assert [(m["role"], m["content"]) for m in stored] == [("user", "tell me"), ("assistant", "Partial answer")]

    upstream.push(error_reply(500, "the model fell over"))
    status, body = openai.send("again", session_id=handle["session_id"])
    assert status == 502, body
    assert "the model fell over" in body["error"]
    assert "sk-test" not in body["error"]

    upstream.push(Script([Stall()]))
    status, body = openai.send("and again", session_id=handle["session_id"])
    assert status == 504, body
    assert body["error"].startswith("Failed to process message: ")


def test_stream_replays_from_the_start_for_reconnecting_and_late_clients(
    openai: Chat, upstream: ThreadedUpstream
) -> None:
    """A client that hangs up mid-stream and reconnects, a second client reading at the same time, and one that
    connects after the end all get every event from the first; keep-alive comments go out while the model is
    slow; the session is busy (409) until the turn ends, which goes on without readers and is stored whole."""
    parts = [f"w{n} " for n in range(12)]
    upstream.push(text_stream(parts, delay=0.05))
    handle = openai.ok(openai.send("slowly please", streaming=True))
    together: list[tuple[int, list[Json]]] = []
    reader = threading.Thread(target=lambda: together.append(openai.events(handle["stream_url"])))
    reader.start()
    status, early = openai.events(handle["stream_url"], limit=2)
    assert status == 200
    assert len(early) == 2
    status, busy = openai.send("me too", session_id=handle["session_id"])
    assert status == 409, busy
    pings: list[bytes] = []
    status, reconnected = openai.events(handle["stream_url"], pings=pings)
    assert reconnected[:2] == early
    assert text(reconnected) == "".join(parts)
    assert reconnected[-1]["type"] == "done"
    assert pings
    assert set(pings) == {b": ping"}
    reader.join(TIMEOUT)
    assert together == [(200, reconnected)]
    status, late = openai.events(handle["stream_url"])
    assert late == reconnected
    stored = openai.messages(handle["session_id"])
    assert stored[-1]["content"] == "".join(parts)


def test_legacy_stream_runs_a_turn_in_one_request(openai: Chat, upstream: ThreadedUpstream) -> None:
    """``GET /v1/chat/stream?message=`` starts a turn and streams it in the same response, tool calls included."""
    upstream.push(tool_stream([("call_l", "everything__echo", '{"message": "legacy"}')]), text_stream(["Fine."]))
    status, events = openai.events("/v1/chat/stream?message=go")
    assert status == 200
    assert [e["type"] for e in events] == ["tool_execution", "message", "message", "done"]
    assert events[0]["tool_executions"][0]["result"] == "Echo: legacy"
    assert events[2]["content"] == "Fine."


def test_send_with_files_gives_text_files_to_the_model(openai: Chat, upstream: ThreadedUpstream) -> None:
    """A multipart send puts a text file's content in the user message the model receives; a file over
    10 MiB is a 400 with the reference's message and reaches no model."""
    boundary = "----e2e" + uuid.uuid4().hex

    def multipart(fields: dict[str, str], filename: str, content: bytes) -> bytes:
        out = b""
        for name, value in fields.items():
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file1"; filename="{filename}"\r\n'
                "Content-Type: text/plain\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
        return out + f"--{boundary}--\r\n".encode()

    since = upstream.mark()
    content_type = f"multipart/form-data; boundary={boundary}"
    body = multipart({"message": "what is the code word?"}, "notes.txt", b"the code word is marmalade\n")
    status, done = openai.request("POST", "/v1/chat/send-with-files", raw=body, content_type=content_type)
    assert status == 200, done
    [sent] = since()
    user = sent["messages"][-1]
    assert user["role"] == "user"
    assert user["content"].startswith("what is the code word?")
    assert "--- File: notes.txt (Size: 27 bytes, Type: text/plain) ---" in user["content"]
    assert "the code word is marmalade" in user["content"]
    assert "marmalade" in done["message"]["content"]

    streamed = openai.ok(
        openai.request(
            "POST",
            "/v1/chat/send-with-files?streaming=true",
            raw=multipart({"message": "and now?", "session_id": done["session_id"]}, "more.txt", b"quince jelly"),
            content_type=content_type,
        )
    )
    assert streamed["session_id"] == done["session_id"]
    status, events = openai.events(streamed["stream_url"])
    assert events[-1]["type"] == "done"
    assert "quince jelly" in text(events)

    since = upstream.mark()
    big = multipart({"message": "too big", "session_id": done["session_id"]}, "big.txt", b"x" * (10 * 1024 * 1024 + 1))
    status, error = openai.request("POST", "/v1/chat/send-with-files", raw=big, content_type=content_type)
    assert status == 400, error
    assert error["error"] == "File too large. Maximum size is 10MB per file."
    assert since() == []


def test_clear_removes_the_history_the_model_sees(openai: Chat, upstream: ThreadedUpstream) -> None:
    """After ``DELETE /v1/chat/clear`` the next request to the model has no earlier message of the session."""
    first = openai.ok(openai.send("remember the word alpha"))
    session = first["session_id"]
    since = upstream.mark()
    openai.ok(openai.send("what was the word?", session_id=session))
    [before] = since()
    assert [m["content"] for m in before["messages"][1:]] == [
        "remember the word alpha",
        "Echo: remember the word alpha",
        "what was the word?",
    ]

    status, cleared = openai.request("DELETE", f"/v1/chat/clear?session_id={session}")
    assert status == 200, cleared
    assert openai.messages(session) == []
    since = upstream.mark()
    openai.ok(openai.send("and now?", session_id=session))
    [after] = since()
    assert [m["role"] for m in after["messages"]] == ["system", "user"]
    assert after["messages"][1]["content"] == "and now?"
    assert roles(openai.messages(session)) == ["user", "assistant"]


# -- Claude and Gemini, each against its scripted upstream ----------------------------------------------


class WireUpstream(ThreadedUpstream):
    """A scripted upstream of another wire format on a private reactor in a thread."""

    def __init__(self, wire: Any) -> None:
        self.reactor = EPollReactor()
        self.upstream = Upstream(self.reactor, wire=wire, api_key="sk-wire-e2e")
        self.upstream.listen()
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, name="upstream", daemon=True
        )
        self.thread.start()


@pytest.mark.parametrize("provider", ["claude", "gemini"])
def test_native_provider_tool_turn_with_approval(tmp_path_factory: pytest.TempPathFactory, provider: str) -> None:
    """Claude and Gemini through the real daemon with server-everything: the model's parallel tool calls
    wait for approval, run on the MCP server once approved, their results go back in the provider's own
    format (tool_result blocks / functionResponse parts), and the final answer is stored."""
    from tests.upstream_claude import ClaudeWire, ToolUse, claude_stream
    from tests.upstream_gemini import Call, GeminiWire, gemini_stream

    if provider == "claude":
        upstream = WireUpstream(ClaudeWire())
        first = claude_stream(
            "Checking. ",
            ToolUse("toolu_1", "everything__echo", '{"message": "native"}'),
            ToolUse("toolu_2", "everything__get-sum", '{"a": 40, "b": 2}'),
        )
        final = claude_stream("The answer is 42.")
    else:
        upstream = WireUpstream(GeminiWire())
        first = gemini_stream(
            ["Checking. "],
            [Call("everything__echo", {"message": "native"}, id="fc-1", signature="c2ln"),
             Call("everything__get-sum", {"a": 40, "b": 2}, id="fc-2")],
            calls_per_event=2,
        )
        final = gemini_stream(["The answer is 42."])
    try:
        chat = launch(
            tmp_path_factory.mktemp(provider),
            "chat:\n  title_generation: false\n  approval:\n    policy: always\n",
            f"llm:\n  provider: {provider}\n  base_url: {upstream.upstream.root_url}\n  api_key: sk-wire-e2e\n"
            "  model: test-model\n  max_retries: 0\n  timeout_seconds: 5\n",
        )
        try:
            upstream.push(first, final)
            user = user_id()
            asked = chat.ok(chat.send("use the tools", user=user))
            request = asked["approval_request"]
            assert [c["function"]["name"] for c in request["tool_calls"]] == ["everything__echo", "everything__get-sum"]
            done = chat.ok(
                chat.request("POST", f"/v1/chat/approvals/{request['request_id']}", user, {"approve": True})
            )
            assert done["message"]["content"] == "The answer is 42."
            follow_up = upstream.requests()[-1].body
            if provider == "claude":
                results = follow_up["messages"][-1]["content"]
                assert [(r["tool_use_id"], r["content"]) for r in results] == [
                    ("toolu_1", "Echo: native"), ("toolu_2", "The sum of 40 and 2 is 42.")
                ]
            else:
                parts = follow_up["contents"][-1]["parts"]
                assert [(p["functionResponse"]["name"], p["functionResponse"]["response"]) for p in parts] == [
                    ("everything__echo", {"result": "Echo: native"}),
                    ("everything__get-sum", {"result": "The sum of 40 and 2 is 42."}),
                ]
                assert follow_up["contents"][-2]["parts"][1]["thoughtSignature"] == "c2ln"
            assert roles(chat.messages(done["session_id"], user))[-1] == "assistant"
        finally:
            chat.close()
    finally:
        upstream.stop()
