"""Chat turns without a network: a scripted model, fake tools, the real SQLite store and a fake clock."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from aichat.chat.approvals import ApprovalPolicy, parse_command
from aichat.chat.context import NOT_EXECUTED, build_messages, user_content
from aichat.chat.streams import Event, StreamError, StreamRegistry
from aichat.chat.titles import clean_title, fallback_title
from aichat.chat.turn import ChatError, ChatService, Turn
from aichat.config import ApprovalSettings, ChatSettings
from aichat.llm.provider import Completion, LLMError, ToolCall
from aichat.llm.tools import ToolSpec
from aichat.store import Attachment, History, Message, Session, new_id
from aichat.store.sqlite import SQLiteStore
from tests.support import inline_store

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Script:
    """What the scripted model does on one call: stream ``deltas``, then return calls or raise."""

    deltas: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    error: LLMError | None = None
    finish_reason: str | None = "stop"


class ScriptedModel:
    """A provider that plays scripts in order and records every request."""

    name = "scripted"
    model = "scripted-1"

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.requests: list[tuple[list[dict[str, Any]], Sequence[ToolSpec] | None]] = []

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolSpec] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        self.requests.append((messages, tools))
        script = self.scripts.pop(0) if self.scripts else Script(["Fine."])
        for delta in script.deltas:
            if on_text is not None:
                on_text(delta)
        if script.error is not None:
            raise script.error
        return Completion("".join(script.deltas), script.calls, script.finish_reason, None, self.model)

    async def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True)
class FakeTool:
    """A tool as the MCP host describes it."""

    name: str
    server: str
    description: str = "a tool"
    input_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    @property
    def function_name(self) -> str:
        return f"{self.server}__{self.name}"


@dataclass(frozen=True)
class Result:
    """A tool result."""

    text: str
    is_error: bool = False


class FakeTools:
    """Tools that answer at once, recording calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._tools = [FakeTool("echo", "everything"), FakeTool("fail", "everything"), FakeTool("read", "fs")]

    def tools(self) -> list[FakeTool]:
        return self._tools

    async def call_tool(self, function_name: str, arguments: dict[str, Any]) -> Result:
        self.calls.append((function_name, arguments))
        if function_name == "everything__fail":
            return Result("it broke", is_error=True)
        if function_name not in {t.function_name for t in self._tools}:
            raise KeyError(f"tool not found: {function_name}")
        return Result(f"echo {json.dumps(arguments, sort_keys=True)}")


def call(call_id: str, name: str, arguments: str = "{}") -> ToolCall:
    """A model tool call."""
    return ToolCall(call_id, name, arguments)


@dataclass
class Harness:
    """A chat service over an inline store, with the clock, model and tools it uses."""

    service: ChatService
    store: SQLiteStore
    clock: Clock
    model: ScriptedModel
    tools: FakeTools

    def session(self, user: str = "1") -> Session:
        return self.service.new_session(user)

    def send(self, session: Session, text: str, user: str = "1", history: History | None = None) -> Turn:
        return self.service.start_message(user, session, text, history=history)

    def resolve(self, approval_id: str, approve: bool, ids: list[str] | None = None, user: str = "1") -> Turn:
        return done(self.service.start_resolution(user, approval_id, approve, ids))

    def history(self, session: Session) -> list[Message]:
        return done(self.store.history(session.id))


def done(coroutine: Any) -> Any:
    """Run a coroutine that completes synchronously; return its result or raise its error."""
    d = Deferred.fromCoroutine(coroutine)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "completes synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def make(tmp_path: Path, *scripts: Script, **chat: Any) -> Harness:
    """A harness with ``scripts`` for the model and ``chat`` settings overrides."""
    clock = Clock()
    clock.advance(NOW.timestamp())
    store = inline_store(str(tmp_path / "chat.db"))
    model = ScriptedModel(*scripts)
    tools = FakeTools()
    settings = ChatSettings(**chat)
    service = ChatService(clock, store, model, tools, settings, "You help.", StreamRegistry(clock, 60), now=lambda: NOW)
    return Harness(service, store, clock, model, tools)


def kinds(record: Turn) -> list[str]:
    """The event types of a turn's stream."""
    return [e.type for e in record.stream.events]


# -- context -------------------------------------------------------------------------------------


def test_context_repairs_unanswered_calls_and_drops_orphans() -> None:
    """Every assistant tool call gets a result; tool messages without a call are dropped."""
    calls = [{"id": "a", "type": "function", "function": {"name": "x", "arguments": "{}"}},
             {"id": "b", "type": "function", "function": {"name": "y", "arguments": "{}"}}]
    history = [
        Message("m0", "s", "tool", "orphan", tool_call_id="zz"),
        Message("m1", "s", "user", "hi"),
        Message("m2", "s", "assistant", "", tool_calls=calls),
        Message("m3", "s", "tool", "result a", tool_call_id="a"),
        Message("m4", "s", "tool_approval", "legacy"),
        Message("m5", "s", "user", "next"),
    ]
    messages = build_messages("Prompt", history, 10_000, NOW)
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Prompt\n\nCURRENT CONTEXT:\n- Current time (UTC): 2026-01-02T03:04:05Z")
    assert "from 2026-01-01T15:04:05Z to 2026-01-02T03:04:05Z" in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "tool", "tool", "user"]
    assert messages[3] == {"role": "tool", "tool_call_id": "a", "content": "result a"}
    assert messages[4] == {"role": "tool", "tool_call_id": "b", "content": NOT_EXECUTED}
    assert messages[2] == {"role": "assistant", "content": "", "tool_calls": calls}


def test_context_never_sends_what_a_server_rejects() -> None:
    """Assistant content is a string, ``""`` beside tool calls (llama.cpp answers 500 to ``null``); an empty
    assistant message without tool calls (stored by an older version from an empty answer) is not sent."""
    calls = [{"id": "a", "type": "function", "function": {"name": "x", "arguments": "{}"}}]
    history = [
        Message("1", "s", "user", "hi"),
        Message("2", "s", "assistant", ""),
        Message("3", "s", "user", "again"),
        Message("4", "s", "assistant", "", tool_calls=calls),
        Message("5", "s", "tool", "done", tool_call_id="a"),
        Message("6", "s", "assistant", " \n"),
        Message("7", "s", "assistant", "Fine."),
    ]
    messages = build_messages("", history, 10_000, NOW)
    assert [(m["role"], m.get("content")) for m in messages] == [
        ("user", "hi"), ("user", "again"), ("assistant", ""), ("tool", "done"), ("assistant", "Fine.")]
    assert all(isinstance(m["content"], str) for m in messages)


def test_context_trims_oldest_without_splitting_tool_groups() -> None:
    """The budget keeps the newest messages; a tool call and its results go or stay together."""
    call_ = [{"id": "c", "type": "function", "function": {"name": "t", "arguments": "{}"}}]
    history = [
        Message("1", "s", "user", "u" * 100),
        Message("2", "s", "assistant", "", tool_calls=call_),
        Message("3", "s", "tool", "r" * 100, tool_call_id="c"),
        Message("4", "s", "assistant", "a" * 50),
        Message("5", "s", "user", "v" * 50),
    ]
    kept = build_messages("", history, 160, NOW)
    assert [m["role"] for m in kept] == ["assistant", "user"]
    kept = build_messages("", history, 210, NOW)
    assert [m["role"] for m in kept] == ["assistant", "tool", "assistant", "user"]
    assert [m["role"] for m in build_messages("", history, 1, NOW)] == ["user"]


def test_attachments_become_text_or_image_parts() -> None:
    """Text files are inlined (cut at 50 000 characters), images become image parts, others are described."""
    text = Attachment("1", "notes.md", "text/markdown", 5, base64.b64encode(b"hello").decode())
    big = Attachment("2", "big.json", "application/json", 60_000, base64.b64encode(b"x" * 60_000).decode())
    image = Attachment("3", "p.png", "image/png", 3, "AAAA")
    binary = Attachment("4", "a.bin", "application/octet-stream", 3, "AAAA")
    content = user_content("look", [text, big, image, binary])
    assert isinstance(content, list)
    inline = content[0]["text"]
    header = "--- File: notes.md (Size: 5 bytes, Type: text/markdown) ---"
    assert inline.startswith(f"look\n\nAttached files:\n{header}\nhello")
    assert "x" * 50_000 + "\n... (content truncated)" in inline
    assert "[Binary file - content not displayed]" in inline
    assert content[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert user_content("plain", []) == "plain"


# -- titles, commands, policy ------------------------------------------------------------------


def test_title_rules_count_characters_not_bytes() -> None:
    """Titles are trimmed, unquoted and cut at 50 characters; short ones fall back to the first words."""
    assert clean_title('  "Slow queries on MySQL"  ', "x") == "Slow queries on MySQL"
    long = "é" * 60
    assert clean_title(long, "x") == "é" * 47 + "..."
    assert clean_title("Hi", "why is my database slow today again please") == "why is my database slow today..."
    assert clean_title("Untitled", "short question") == "short question"
    assert fallback_title("") == "New Chat"
    assert fallback_title("a" * 45) == "New Chat"
    assert fallback_title("one two three four five six seven") == "one two three four five six..."


def test_approval_commands_and_policy() -> None:
    """The reference's approval commands parse; the policy asks per call."""
    assert parse_command(" [APPROVE_TOOLS:approval_1-2] ") is not None
    command = parse_command("[DENY_TOOLS:approval_x]")
    assert command is not None and not command.approve and command.request_id == "approval_x"
    assert parse_command("please [APPROVE_TOOLS:x]") is None
    assert ApprovalPolicy("always").needs_approval("s__t", "s", "t")
    assert not ApprovalPolicy("never").needs_approval("s__t", "s", "t")
    auto = ApprovalPolicy("auto", ("everything/*", "fs__read"))
    assert not auto.needs_approval("everything__echo", "everything", "echo")
    assert not auto.needs_approval("fs__read", "fs", "read")
    assert auto.needs_approval("fs__write", "fs", "write")


# -- streams -------------------------------------------------------------------------------------


def test_stream_replays_to_late_subscribers_and_is_removed_after_keep() -> None:
    """Late and second subscribers get every event; the stream is removed keep_seconds after it ends."""
    clock = Clock()
    registry = StreamRegistry(clock, 30)
    stream = registry.create("s1", "1", "sess")
    early: list[Event] = []
    stream.subscribe(early.append)
    stream.emit(Event("message", "sess", content="a"))
    late: list[Event] = []
    stream.subscribe(late.append)
    stream.emit(Event("done", "sess"))
    stream.emit(Event("message", "sess", content="ignored after done"))
    assert [e.content for e in early] == [e.content for e in late] == ["a", ""]
    with pytest.raises(StreamError):
        registry.get("s1", "2")
    clock.advance(29)
    assert registry.get("s1", "1") is stream
    clock.advance(1)
    with pytest.raises(StreamError):
        registry.get("s1", "1")
    assert Event("done", "sess", synthetic=True).to_json() == {"type": "done", "session_id": "sess"}


# -- turns -----------------------------------------------------------------------------------------


def test_plain_turn_streams_and_stores(tmp_path: Path) -> None:
    """Text deltas are forwarded; user and assistant messages are stored; the response has the real id."""
    h = make(tmp_path, Script(["Hel", "lo"]))
    session = h.session()
    record = h.send(session, "hi")
    assert kinds(record) == ["message", "message", "done"]
    assert record.result.response()["message"]["content"] == "Hello"
    assert record.result.response()["session_id"] == session.id
    assert [(m.role, m.content) for m in h.history(session)] == [("user", "hi"), ("assistant", "Hello")]
    sent, tools = h.model.requests[0]
    assert sent[-1] == {"role": "user", "content": "hi"}
    assert tools is not None and [t.to_openai()["function"]["name"] for t in tools] == [
        "everything__echo", "everything__fail", "fs__read"]


class HeldWrites:
    """Holds the store's commits until :meth:`release`, as a slow disk would."""

    def __init__(self, store: SQLiteStore) -> None:
        self._real = store.pool.runInteraction
        self.held: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []
        store.pool.runInteraction = self._hold  # type: ignore[method-assign]

    def _hold(self, work: Any, *args: Any) -> Deferred[Any]:
        waiting: Deferred[Any] = Deferred()
        self.held.append((work, args, waiting))
        return waiting

    def release(self) -> None:
        """Commit everything held so far, and what those commits queue next, in order."""
        while self.held:
            work, args, waiting = self.held.pop(0)
            self._real(work, *args).chainDeferred(waiting)


def test_model_is_asked_while_the_message_commits(tmp_path: Path) -> None:
    """The model is asked before the user's message is on disk (the commit overlaps its time to first token),
    but the answer is stored, and the turn ends, only after the message is committed."""
    h = make(tmp_path, Script(["Hi"]))
    session = h.session()
    writes = HeldWrites(h.store)
    record = h.send(session, "hello")
    assert len(h.model.requests) == 1
    assert kinds(record) == ["message"]
    assert len(writes.held) == 1 and h.history(session) == []
    writes.release()
    assert kinds(record) == ["message", "done"]
    assert [(m.role, m.content) for m in h.history(session)] == [("user", "hello"), ("assistant", "Hi")]


def test_new_session_turn_does_not_wait_for_the_session_commit(tmp_path: Path) -> None:
    """A message without a session id asks the model before its new session is on disk; the session, the
    message and the answer are stored in that order once the commits run."""
    h = make(tmp_path, Script(["Hi"]))
    writes = HeldWrites(h.store)
    session, history = done(h.service.resume("1", ""))
    record = h.send(session, "hello", history=history)
    assert len(h.model.requests) == 1 and kinds(record) == ["message"]
    assert done(h.store.get_session("1", session.id)) is None
    writes.release()
    assert kinds(record) == ["message", "done"]
    stored = done(h.store.get_session("1", session.id))
    assert stored is not None and stored.id == session.id
    assert [(m.role, m.content) for m in h.history(session)] == [("user", "hello"), ("assistant", "Hi")]


def test_message_that_cannot_be_stored_fails_the_turn(tmp_path: Path) -> None:
    """If the user's message cannot be committed, the turn ends with an error event and nothing the model
    said is stored."""
    h = make(tmp_path, Script(["Hi"]))
    session = h.session()
    done(h.store.delete_session("1", session.id))
    record = h.send(session, "hello")
    assert kinds(record) == ["message", "error"]
    assert record.result.error_status == 500
    assert h.history(session) == []


def test_history_is_reloaded_from_the_store(tmp_path: Path) -> None:
    """A new service over the same database (a restart) sends the earlier exchange to the model."""
    h = make(tmp_path, Script(["one"]))
    session = h.session()
    h.send(session, "first")
    Deferred.fromCoroutine(h.store.close())  # the first service stops: one daemon per SQLite file
    again = make(tmp_path, Script(["two"]))
    again.send(session, "second")
    sent = [m["content"] for m in again.model.requests[0][0][1:]]
    assert sent == ["first", "one", "second"]


def test_tool_call_waits_for_approval_then_runs(tmp_path: Path) -> None:
    """With policy always, calls wait; approving runs them, stores results by call id and continues."""
    h = make(tmp_path, Script(["Let me check. "], [call("c1", "everything__echo", '{"m": 1}')]), Script(["Done."]))
    session = h.session()
    record = h.send(session, "echo please")
    assert kinds(record)[-2:] == ["tool_approval_request", "done"]
    assert record.result.approval is not None
    request_id = record.result.approval.id
    assert h.tools.calls == []
    resumed = h.resolve(request_id, True)
    assert h.tools.calls == [("everything__echo", {"m": 1})]
    assert kinds(resumed) == ["tool_execution", "message", "message", "done"]
    assert resumed.result.response()["message"]["content"] == "Done."
    assert resumed.result.executions[0].to_json()["result"] == 'echo {"m": 1}'
    follow_up = h.model.requests[1][0]
    assert follow_up[-2]["tool_calls"][0]["id"] == "c1"
    assert follow_up[-1] == {"role": "tool", "tool_call_id": "c1", "content": 'echo {"m": 1}'}
    with pytest.raises(ChatError) as again:
        h.resolve(request_id, True)
    assert again.value.status == 409


def test_denial_is_fed_back_to_the_model(tmp_path: Path) -> None:
    """Denying stores a refusal for each call and lets the model answer."""
    h = make(tmp_path, Script([], [call("c1", "everything__echo")]), Script(["Understood."]))
    session = h.session()
    request_id = h.send(session, "x").result.approval.id  # type: ignore[union-attr]
    resumed = h.resolve(request_id, False)
    assert h.tools.calls == []
    assert resumed.result.response()["message"]["content"] == "Understood."
    assert h.model.requests[1][0][-1] == {
        "role": "tool", "tool_call_id": "c1", "content": "Tool execution was denied by the user."}
    assert "❌ Tool execution was denied by user." in [e.content for e in resumed.stream.events]


def test_selective_approval_runs_only_the_chosen_calls(tmp_path: Path) -> None:
    """tool_call_ids approves a subset; the others are refused; unknown ids are 400."""
    calls = [call("a", "everything__echo", '{"n": 1}'), call("b", "everything__echo", '{"n": 2}')]
    h = make(tmp_path, Script([], calls), Script(["ok"]))
    session = h.session()
    request_id = h.send(session, "x").result.approval.id  # type: ignore[union-attr]
    with pytest.raises(ChatError) as bad:
        h.resolve(request_id, True, ["zzz"])
    assert bad.value.status == 400
    h.resolve(request_id, True, ["b"])
    assert h.tools.calls == [("everything__echo", {"n": 2})]
    results = {m.tool_call_id: m.content for m in h.history(session) if m.role == "tool"}
    assert results == {"a": "Tool execution was denied by the user.", "b": 'echo {"n": 2}'}


def test_auto_approval_runs_matching_tools_at_once(tmp_path: Path) -> None:
    """With policy auto, matching calls run without asking; the rest wait."""
    calls = [call("a", "everything__echo"), call("b", "fs__read")]
    h = make(
        tmp_path, Script([], calls), Script(["ok"]),
        approval=ApprovalSettings(policy="auto", auto_approve=("everything/*",)),
    )
    record = h.send(h.session(), "x")
    assert h.tools.calls == [("everything__echo", {})]
    assert record.result.approval is not None
    assert [c["id"] for c in record.result.approval.tool_calls] == ["b"]


def test_tool_errors_go_back_to_the_model(tmp_path: Path) -> None:
    """isError results, unknown tools and bad JSON arguments become results the model reads."""
    calls = [call("a", "everything__fail"), call("b", "nope__tool"), call("c", "everything__echo", "{bad")]
    h = make(tmp_path, Script([], calls), Script(["noted"]), approval=ApprovalSettings(policy="never"))
    record = h.send(h.session(), "x")
    assert kinds(record)[-1] == "done"
    errors = [e.to_json()["error"] for e in record.result.executions]
    assert errors[0] == "Tool returned an error: it broke"
    assert errors[1].startswith("Error executing tool:") and "nope__tool" in errors[1]
    assert errors[2].startswith("Error executing tool: failed to parse tool arguments")
    tool_event = next(e for e in record.stream.events if e.type == "tool_execution")
    assert tool_event.content == "Executed 3 tool(s) (failed)"
    assert [m["content"] for m in h.model.requests[1][0] if m["role"] == "tool"] == errors


def test_round_cap_stops_the_loop_with_a_clear_message(tmp_path: Path) -> None:
    """After max_tool_rounds the next calls are not executed and the turn ends with a notice."""
    looping = [Script([], [call(f"c{i}", "everything__echo")]) for i in range(5)]
    h = make(tmp_path, *looping, max_tool_rounds=2, approval=ApprovalSettings(policy="never"))
    session = h.session()
    record = h.send(session, "loop")
    assert len(h.tools.calls) == 2
    assert kinds(record)[-1] == "done"
    assert "Stopped after 2 tool rounds" in record.result.response()["message"]["content"]
    unanswered = [m for m in h.history(session) if m.role == "tool" and m.tool_call_id == "c2"]
    assert unanswered[0].content == "Tool call was not executed: the tool round limit was reached."


def test_some_or_all_tool_calls_failing_are_worded_apart(tmp_path: Path) -> None:
    """"partially failed" only when some calls failed and some did not; one call that failed is "failed"."""
    h = make(
        tmp_path,
        Script([], [call("a", "everything__fail")]), Script(["noted"]),
        Script([], [call("b", "everything__fail"), call("c", "everything__echo")]), Script(["noted"]),
        approval=ApprovalSettings(policy="never"), title_generation=False,
    )
    session = h.session()
    outcomes = []
    for _ in range(2):
        record = h.send(session, "x")
        outcomes.append(next(e.content for e in record.stream.events if e.type == "tool_execution"))
    assert outcomes == ["Executed 1 tool(s) (failed)", "Executed 2 tool(s) (partially failed)"]


def test_empty_answer_is_an_error_and_never_poisons_the_session(tmp_path: Path) -> None:
    """A completion with no text and no tool calls ends the turn with an ``error`` event and stores no empty
    assistant message; the next turn sends a history every server accepts and works."""
    h = make(tmp_path, Script([]), Script([" \n"]), Script(["Back."]), title_generation=False)
    session = h.session()
    first = h.send(session, "hello")
    assert kinds(first) == ["error"]
    assert first.result.error == "Failed to process message: the model returned an empty answer (finish reason: stop)"
    assert first.result.error_status == 502
    assert [(m.role, m.content) for m in h.history(session)] == [("user", "hello")]
    assert kinds(h.send(session, "hello?"))[-1] == "error"
    third = h.send(session, "still there?")
    assert kinds(third) == ["message", "done"]
    sent = h.model.requests[2][0]
    assert [(m["role"], m["content"]) for m in sent[1:]] == [
        ("user", "hello"), ("user", "hello?"), ("user", "still there?")]


def test_empty_answer_cut_short_says_so(tmp_path: Path) -> None:
    """An empty answer without a finish reason (llama.cpp's stream interrupted by another request: only
    ``[DONE]``) tells the user the server cut it short."""
    h = make(tmp_path, Script([], finish_reason=None), title_generation=False)
    record = h.send(h.session(), "hello")
    assert record.result.error == (
        "Failed to process message: the model returned an empty answer (no finish reason: the server cut the "
        "stream short)"
    )


def test_session_already_holding_an_empty_answer_works_again(tmp_path: Path) -> None:
    """A session in which an older version stored ``""`` as the answer is not stuck: that message is never
    sent again."""
    h = make(tmp_path, Script(["Works."]), title_generation=False)
    session = h.session()
    done(h.store.add_message(Message("u1", session.id, "user", "hello")))
    done(h.store.add_message(Message("a1", session.id, "assistant", "")))
    assert kinds(h.send(session, "again")) == ["message", "done"]
    sent = h.model.requests[0][0]
    assert [m["role"] for m in sent] == ["system", "user", "user"]


def test_upstream_failure_mid_stream_keeps_what_was_said(tmp_path: Path) -> None:
    """A stream that breaks ends with an error event and the partial answer is stored."""
    h = make(tmp_path, Script(["partial "], error=LLMError("upstream reset", started=True, code="connection")))
    session = h.session()
    record = h.send(session, "x")
    assert kinds(record) == ["message", "error"]
    assert record.stream.events[-1].error == "Failed to process message: upstream reset"
    assert record.result.error_status == 502
    assert [(m.role, m.content) for m in h.history(session)] == [("user", "x"), ("assistant", "partial ")]


def test_approvals_are_user_bound_and_expire(tmp_path: Path) -> None:
    """Another user's approval is 404; an expired one is 409 and is marked expired."""
    h = make(tmp_path, Script([], [call("a", "everything__echo")]), approval=ApprovalSettings(expire_seconds=60))
    request_id = h.send(h.session(), "x").result.approval.id  # type: ignore[union-attr]
    with pytest.raises(ChatError) as other:
        h.resolve(request_id, True, user="2")
    assert other.value.status == 404
    h.clock.advance(61)
    with pytest.raises(ChatError) as late:
        h.resolve(request_id, True)
    assert late.value.status == 409 and "expired" in late.value.message
    stored = done(h.store.get_approval("1", request_id))
    assert stored.status == "expired"


def test_unknown_session_is_404_and_busy_session_is_409(tmp_path: Path) -> None:
    """A session id the user does not own is 404; a second turn while one runs is 409."""
    h = make(tmp_path)
    with pytest.raises(ChatError) as missing:
        done(h.service.resume("1", "no-such-session"))
    assert missing.value.status == 404
    session = h.session()
    h.service._running[session.id] = Deferred()
    with pytest.raises(ChatError) as busy:
        h.send(session, "x")
    assert busy.value.status == 409


def test_title_generated_after_first_exchange(tmp_path: Path) -> None:
    """The first exchange gets a model-written title; later exchanges keep it."""
    h = make(tmp_path, Script(["Answer."]), Script(['"Database Latency Help"']), Script(["More."]))
    session = h.session()
    assert session.title.startswith("Chat - Jan 2, 2026 at ")
    h.send(session, "why is it slow")
    assert done(h.store.get_session("1", session.id)).title == "Database Latency Help"
    h.send(session, "and now?")
    assert done(h.store.get_session("1", session.id)).title == "Database Latency Help"
    assert len(h.model.requests) == 3


def test_a_long_session_sends_the_context_the_whole_history_gives(tmp_path: Path) -> None:
    """A session far over the context budget is read as its tail, yet the model gets what it got when the
    whole history was read: the newest units that fit, trimmed the same way."""
    h = make(tmp_path, Script(["Fine."]), history_budget_chars=300, title_generation=False)
    session = done(h.store.create_session("1", "long"))
    for n in range(60):
        done(h.store.add_message(Message(new_id("user"), session.id, "user", f"question number {n}")))
        done(h.store.add_message(Message(new_id("assistant"), session.id, "assistant", f"answer number {n}")))
    before = done(h.store.history(session.id))
    h.send(session, "and the last one?")
    sent = h.model.requests[0][0]
    expected = build_messages("You help.", [*before, Message("u", session.id, "user", "and the last one?")], 300, NOW)
    assert sent == expected and 4 < len(sent) < 40


def test_no_title_when_the_tail_does_not_reach_the_first_turn(tmp_path: Path) -> None:
    """A later turn whose last round's tail holds one user message (older turns cut by the budget) is not
    taken for the first turn: the session keeps its title and the model is not asked for one."""
    h = make(
        tmp_path,
        Script([], [call("c1", "everything__echo", '{"m": 1}')]),
        Script(["Long answer."]),
        Script(["Never Asked Title"]),
        history_budget_chars=50,
        approval=ApprovalSettings(policy="never"),
    )
    session = h.session()
    done(h.store.add_message(Message(new_id("user"), session.id, "user", "first question")))
    done(h.store.add_message(Message(new_id("assistant"), session.id, "assistant", "first answer")))
    h.send(session, "x" * 60)
    assert len(h.model.requests) == 2
    assert done(h.store.get_session("1", session.id)).title == session.title


def test_title_is_asked_only_after_the_turn_is_done(tmp_path: Path) -> None:
    """The title request starts after the turn's stream has ended, never while the user still waits for it
    (a server serving one request at a time would make the turn wait for the title)."""
    h = make(tmp_path, Script(["Answer."]), Script(["Slow Queries Explained"]))
    streams: list[Any] = []
    create = h.service.streams.create

    def creating(*args: Any) -> Any:
        streams.append(create(*args))
        return streams[-1]

    h.service.streams.create = creating  # type: ignore[method-assign,assignment]
    seen_when_asked: list[list[str]] = []
    complete = h.model.complete

    async def observed(messages: list[dict[str, Any]], tools: Any = None, **kwargs: Any) -> Completion:
        seen_when_asked.append([e.type for e in streams[0].events])
        return await complete(messages, tools, **kwargs)

    h.model.complete = observed  # type: ignore[method-assign]
    session = h.session()
    h.send(session, "why is it slow")
    assert seen_when_asked == [[], ["message", "done"]]
    assert done(h.store.get_session("1", session.id)).title == "Slow Queries Explained"


def test_first_turn_ending_at_the_round_cap_gets_a_title(tmp_path: Path) -> None:
    """A first turn stopped by chat.max_tool_rounds still titles its session, from the user's message."""
    looping = [Script([], [call(f"c{i}", "everything__echo")]) for i in range(2)]
    h = make(tmp_path, *looping, Script(["Echo Loop Check"]), max_tool_rounds=1,
             approval=ApprovalSettings(policy="never"))
    session = h.session()
    record = h.send(session, "echo until stopped")
    assert "Stopped after 1 tool rounds" in record.result.response()["message"]["content"]
    assert done(h.store.get_session("1", session.id)).title == "Echo Loop Check"
    title_request, tools = h.model.requests[-1]
    assert tools is None
    assert "User: echo until stopped" in title_request[0]["content"]


def test_turn_deadline_cancels_and_reports(tmp_path: Path) -> None:
    """A turn that outlives stream_max_seconds is cancelled and its stream ends with an error."""
    h = make(tmp_path, stream_max_seconds=5)
    never: Deferred[Completion] = Deferred()

    async def hang(*args: Any, **kwargs: Any) -> Completion:
        return await never

    h.model.complete = hang  # type: ignore[method-assign]
    session = h.session()
    record = h.send(session, "x")
    assert kinds(record) == []
    h.clock.advance(5)
    assert kinds(record) == ["error"]
    assert record.result.error == "The turn was cancelled"
    assert session.id not in h.service._running


def test_session_is_held_while_an_approval_is_being_resolved(tmp_path: Path) -> None:
    """A message sent while an approval's decision is being stored is 409, and the approval still runs."""
    h = make(tmp_path, Script([], [call("a", "everything__echo")]), Script(["ran"]), Script(["late"]))
    session = h.session()
    request_id = h.send(session, "x").result.approval.id  # type: ignore[union-attr]
    stored: Deferred[bool] = Deferred()
    real = h.store.resolve_approval

    async def slow_resolve(approval_id: str, status: str) -> bool:
        await stored
        return await real(approval_id, status)

    h.store.resolve_approval = slow_resolve  # type: ignore[method-assign]
    resolving = Deferred.fromCoroutine(h.service.start_resolution("1", request_id, True))
    with pytest.raises(ChatError) as busy:
        h.send(session, "meanwhile")
    assert busy.value.status == 409
    stored.callback(True)
    record = done(resolving_result(resolving))
    assert kinds(record)[-1] == "done"
    assert h.tools.calls == [("everything__echo", {})]


async def resolving_result(resolving: Deferred[Turn]) -> Turn:
    """Await a Deferred inside a coroutine, for :func:`done`."""
    return await resolving


def test_mock_provider_sessions_are_titled_from_the_user_message(tmp_path: Path) -> None:
    """With the offline mock, the title is the user's first words rather than the mock's canned reply."""
    h = make(tmp_path, Script(["Mock answer."]))
    h.model.name = "mock"
    session = h.session()
    h.send(session, "how do I tune innodb buffer pool size for a big server")
    assert done(h.store.get_session("1", session.id)).title == "how do I tune innodb buffer..."
    assert len(h.model.requests) == 1
