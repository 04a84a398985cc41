"""Chat routes through StubTreq: response shapes, SSE framing and replay, approvals, uploads, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from aichat.chat.streams import StreamRegistry
from aichat.chat.turn import ChatService
from aichat.config import ChatSettings
from aichat.llm.provider import LLMError, ToolCall
from aichat.llm.unconfigured import UnconfiguredProvider
from tests.support import build_api, inline_store, make_settings
from tests.test_api import USER, Client
from tests.test_chat import FakeTools, Script, ScriptedModel

OTHER = {"X-User-ID": "8"}


class Fixture:
    """An API with a chat service over a scripted model and fake tools."""

    def __init__(self, tmp_path: Path, *scripts: Script, yaml_text: str = "", model: Any = None) -> None:
        settings = make_settings(tmp_path, yaml_text)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        store = inline_store(settings.database.path)
        self.model = ScriptedModel(*scripts)
        self.streams = StreamRegistry(self.clock, 60)
        provider = model if model is not None else self.model
        chat = ChatService(self.clock, store, provider, FakeTools(), settings.chat, "sys", self.streams)
        _, resource = build_api(settings, store, self.clock, chat=chat)
        self.client = Client(resource)

    def raw(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> tuple[int, bytes, Any]:
        """A request returning the raw body (for SSE)."""
        return self.client.raw(method, path, headers, body)


def sse_events(body: bytes, after: int = 0) -> list[dict[str, Any]]:
    """Decode ``event: message`` frames; every frame must use that event name and carry the next ``id``
    (counting from ``after``, the ``Last-Event-ID`` sent)."""
    events: list[dict[str, Any]] = []
    for frame in body.decode().split("\n\n"):
        if not frame.strip() or frame.startswith(":"):
            continue
        lines = frame.split("\n")
        assert lines[0] == "event: message"
        assert lines[1] == f"id: {after + len(events) + 1}"
        assert lines[2].startswith("data: ")
        events.append(json.loads(lines[2][len("data: "):]))
    return events


def test_send_returns_final_text_and_real_session(tmp_path: Path) -> None:
    """Non-streaming send creates a session when none is given and returns its real id."""
    f = Fixture(tmp_path, Script(["Hi ", "there"]))
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": "hello"}, USER)
    assert status == 200
    assert body["message"]["content"] == "Hi there"
    assert body["message"]["role"] == "assistant"
    assert body["message"]["id"].startswith("assistant_")
    session_id = body["session_id"]
    assert f.client.call("GET", f"/v1/chat/sessions/{session_id}", headers=USER)[0] == 200
    assert f.client.call("GET", f"/v1/chat/sessions/{session_id}", headers=OTHER)[0] == 404


def test_send_validation_and_unknown_session(tmp_path: Path) -> None:
    """Missing message is 400; an unknown session id is 404 (never silently replaced)."""
    f = Fixture(tmp_path)
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"session_id": "x"}, USER)
    assert status == 400 and "'message'" in body["error"]
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": "hi", "session_id": "nope"}, USER)
    assert (status, body) == (404, {"error": "Session not found"})
    assert f.client.call("POST", "/v1/chat/send", {"message": "hi"})[0] == 401


def test_upstream_failure_is_a_non_200_error(tmp_path: Path) -> None:
    """A provider error surfaces as 502 (504 for timeouts) with its message."""
    f = Fixture(tmp_path, Script(error=LLMError("rate limited", status=429)),
                Script(error=LLMError("no first byte", code="timeout")))
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": "hi"}, USER)
    assert (status, body) == (502, {"error": "Failed to process message: rate limited"})
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": "hi"}, USER)
    assert status == 504


def test_unconfigured_model_is_503_with_the_reason(tmp_path: Path) -> None:
    """A daemon started without a usable model (no API key) answers a turn 503 with the configuration
    problem, and a streaming turn's error event says the same; the user's message is kept."""
    reason = "OpenAI API key is required (set OPENAI_API_KEY or AICHAT_API_KEY environment variable)"
    f = Fixture(tmp_path, model=UnconfiguredProvider("openai", "gpt-4o-mini", reason))
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": "hi"}, USER)
    assert (status, body) == (503, {"error": f"Failed to process message: {reason}"})
    status, handle, _ = f.client.call("POST", "/v1/chat/send?streaming=true", {"message": "again"}, USER)
    assert status == 200
    status, raw, _ = f.raw("GET", handle["stream_url"], USER)
    assert sse_events(raw)[-1] == {**sse_events(raw)[-1], "type": "error"}
    assert reason in sse_events(raw)[-1]["error"]
    status, listing, _ = f.client.call("GET", f"/v1/chat/sessions/{handle['session_id']}/messages", headers=USER)
    assert [m["content"] for m in listing["messages"]] == ["again"]


def test_streaming_send_then_sse_replays_everything(tmp_path: Path) -> None:
    """send?streaming=true returns a handle; the SSE stream replays from the start, twice, owner only."""
    f = Fixture(tmp_path, Script(["a", "b"]))
    status, handle, _ = f.client.call("POST", "/v1/chat/send?streaming=true", {"message": "hi"}, USER)
    assert status == 200
    assert handle["stream_id"].startswith("stream_7_")
    assert handle["stream_url"] == f"/v1/chat/stream/{handle['stream_id']}"
    for _ in range(2):
        status, body, headers = f.raw("GET", handle["stream_url"], USER)
        assert status == 200
        assert headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
        assert headers.getRawHeaders("cache-control") == ["no-cache"]
        assert headers.getRawHeaders("x-accel-buffering") == ["no"]
        events = sse_events(body)
        assert [(e["type"], e.get("content")) for e in events] == [("message", "a"), ("message", "b"), ("done", None)]
        assert {e["session_id"] for e in events} == {handle["session_id"]}
    status, body, _ = f.raw("GET", handle["stream_url"], OTHER)
    assert status == 404


def test_last_event_id_resumes_after_that_event(tmp_path: Path) -> None:
    """A client reconnecting with ``Last-Event-ID: n`` (SQLite, one instance) gets exactly the events after
    the n-th, numbered on; after the last one it gets none; an id that is not an ASCII number of ours is 400 JSON."""
    f = Fixture(tmp_path, Script(["a", "b", "c"]))
    status, handle, _ = f.client.call("POST", "/v1/chat/send?streaming=true", {"message": "hi"}, USER)
    assert status == 200
    status, body, _ = f.raw("GET", handle["stream_url"], USER)
    everything = sse_events(body)
    assert len(everything) == 4
    for after in range(len(everything) + 1):
        status, body, _ = f.raw("GET", handle["stream_url"], {**USER, "Last-Event-ID": str(after)})
        assert status == 200
        assert sse_events(body, after) == everything[after:]
    for bad in ("x1", "\u00b2", "1" * 10):  # not a number, a Unicode digit int() refuses, not one of ours
        status, body, _ = f.raw("GET", handle["stream_url"], {**USER, "Last-Event-ID": bad})
        assert status == 400 and "Last-Event-ID" in json.loads(body)["error"]


def test_legacy_stream_endpoint_is_off_by_default(tmp_path: Path) -> None:
    """A plain link must not start a turn: the legacy GET turn is 403 JSON saying how to enable it."""
    f = Fixture(tmp_path, Script(["x"]))
    status, body, _ = f.raw("GET", "/v1/chat/stream?message=hello", USER)
    assert status == 403
    assert "chat.legacy_stream_get" in json.loads(body)["error"]
    assert f.model.requests == []


def test_legacy_stream_endpoint(tmp_path: Path) -> None:
    """Opted in, GET /v1/chat/stream?message= runs a turn as SSE; without message it is 400 JSON."""
    f = Fixture(tmp_path, Script(["x"]), yaml_text="chat:\n  legacy_stream_get: true\n")
    status, body, _ = f.raw("GET", "/v1/chat/stream?message=hello", USER)
    assert status == 200
    assert [e["type"] for e in sse_events(body)] == ["message", "done"]
    status, body, _ = f.raw("GET", "/v1/chat/stream", USER)
    assert status == 400 and json.loads(body) == {"error": "message parameter is required"}


def test_approval_via_chat_command_and_endpoint(tmp_path: Path) -> None:
    """The approval id comes back in the response; both the command and the endpoint resolve approvals."""
    calls = [ToolCall("c1", "everything__echo", '{"a": 1}')]
    f = Fixture(tmp_path, Script([], calls), Script(["ran it"]), Script([], calls), Script(["skipped"]),
                yaml_text="chat:\n  title_generation: false\n")
    _, first, _ = f.client.call("POST", "/v1/chat/send", {"message": "go"}, USER)
    request_id = first["approval_request"]["request_id"]
    assert first["approval_request"]["tool_calls"][0]["id"] == "c1"
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": f"[APPROVE_TOOLS:{request_id}]"}, USER)
    assert status == 200
    assert body["message"]["content"] == "ran it"
    assert body["message"]["tool_executions"][0]["result"] == 'echo {"a": 1}'
    assert body["session_id"] == first["session_id"]
    _, second, _ = f.client.call("POST", "/v1/chat/send", {"message": "again", "session_id": first["session_id"]}, USER)
    request_id = second["approval_request"]["request_id"]
    url = f"/v1/chat/approvals/{request_id}"
    assert f.client.call("POST", url, {"approve": True}, OTHER)[0] == 404
    assert f.client.call("POST", url, {"approve": "yes"}, USER)[0] == 400
    assert f.client.call("POST", url, {"approve": True, "tool_call_ids": [1]}, USER)[0] == 400
    status, handle, _ = f.client.call("POST", url + "?streaming=true", {"approve": False}, USER)
    assert status == 200
    _, body, _ = f.raw("GET", handle["stream_url"], USER)
    contents = [e.get("content") for e in sse_events(body)]
    assert "❌ Tool execution was denied by user." in contents
    assert contents[-2:] == ["skipped", None]
    status, body, _ = f.client.call("POST", "/v1/chat/send", {"message": f"[DENY_TOOLS:{request_id}]"}, USER)
    assert status == 409


def multipart(fields: dict[str, str], files: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """Encode a multipart/form-data body."""
    boundary = "----aichat-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for field_name, filename, mime, data in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
                f"Content-Type: {mime}\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_send_with_files_stores_attachments_and_shows_text_to_model(tmp_path: Path) -> None:
    """file* parts become attachments; text reaches the model; non-file fields are ignored as files."""
    f = Fixture(tmp_path, Script(["read it"]))
    body, content_type = multipart(
        {"message": "summarize"},
        [("file", "a.txt", "text/plain", b"alpha beta"), ("file2", "b.bin", "application/octet-stream", b"\x00\x01"),
         ("other", "c.txt", "text/plain", b"ignored")],
    )
    status, raw, _ = f.raw("POST", "/v1/chat/send-with-files", {**USER, "Content-Type": content_type}, body)
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["message"]["content"] == "read it"
    sent = f.model.requests[0][0][-1]["content"]
    assert "--- File: a.txt (Size: 10 bytes, Type: text/plain) ---\nalpha beta" in sent
    assert "b.bin" in sent and "ignored" not in sent
    _, listing, _ = f.client.call("GET", f"/v1/chat/sessions/{answer['session_id']}/messages", headers=USER)
    attachments = listing["messages"][0]["attachments"]
    assert [(a["filename"], a["size"]) for a in attachments] == [("a.txt", 10), ("b.bin", 2)]


def test_send_with_files_errors(tmp_path: Path) -> None:
    """Missing message, oversized file and wrong content type are clear 4xx errors."""
    f = Fixture(tmp_path, yaml_text="limits:\n  max_file_bytes: 2048\n")
    body, content_type = multipart({"session_id": ""}, [])
    status, raw, _ = f.raw("POST", "/v1/chat/send-with-files", {**USER, "Content-Type": content_type}, body)
    assert (status, json.loads(raw)) == (400, {"error": "message field is required"})
    body, content_type = multipart({"message": "x"}, [("file", "big.txt", "text/plain", b"x" * 4096)])
    status, raw, _ = f.raw("POST", "/v1/chat/send-with-files", {**USER, "Content-Type": content_type}, body)
    assert status == 400 and "File too large" in json.loads(raw)["error"]
    status, raw, _ = f.raw("POST", "/v1/chat/send-with-files", {**USER, "Content-Type": "application/json"}, b"{}")
    assert status == 415


@pytest.mark.parametrize("path", ["/v1/chat/mcp/tools", "/api/v1/mcp/servers/status"])
def test_mcp_routes_without_host_are_503(tmp_path: Path, path: str) -> None:
    """Without an MCP host the MCP routes say so with 503 JSON."""
    f = Fixture(tmp_path)
    status, body, _ = f.client.call("GET", path)
    assert (status, body) == (503, {"error": "MCP support is not running"})


def test_settings_defaults_for_chat() -> None:
    """The chat defaults the issue names: 10 tool rounds, approval always."""
    settings = ChatSettings()
    assert (settings.max_tool_rounds, settings.approval.policy, settings.keepalive_seconds) == (10, "always", 15.0)


def test_openai_streams_through_stubtreq_are_whole_and_leave_no_timer(tmp_path: Path) -> None:
    """In process (StubTreq), a paced chat completions stream is written whole: role chunk, deltas, finish,
    ``[DONE]``; its keep-alive timer is stopped when the response ends."""
    f = Fixture(tmp_path, Script(["a", "b"]))
    body = json.dumps({"model": "scripted-1", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    status, raw, headers = f.raw(
        "POST", "/v1/chat/completions", {**USER, "Content-Type": "application/json"}, body.encode()
    )
    assert status == 200 and headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    data = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not f.clock.getDelayedCalls()
