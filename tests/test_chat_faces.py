"""The one tool loop as the OpenAI faces drive it: tool scopes over the approval policy, turns kept in
memory, calls handed to the client, and the events a face's listener receives. Scripted model, fake tools,
the real SQLite store and a fake clock (the harness of :mod:`tests.test_chat`)."""

from __future__ import annotations

from pathlib import Path

from aichat.chat import events
from aichat.chat.approvals import ApprovalPolicy
from aichat.chat.turn import ToolScope, TurnState
from aichat.config import ApprovalSettings
from aichat.llm.tools import specs_from_openai
from tests.test_chat import FakeTool, Script, call, done, make

ECHO = FakeTool("echo", "everything")


def test_a_scope_can_ask_for_more_approvals_never_fewer() -> None:
    always = ToolScope(ApprovalPolicy("always"), ask=lambda tool: False)
    assert always.needs_approval("everything__echo", ECHO)
    never = ToolScope(ApprovalPolicy("never"), ask=lambda tool: True)
    assert never.needs_approval("everything__echo", ECHO)
    auto = ToolScope(ApprovalPolicy("auto", ("everything/*",)), ask=lambda tool: False)
    assert not auto.needs_approval("everything__echo", ECHO)
    assert auto.needs_approval("fs__read", FakeTool("read", "fs"))


def test_stateless_turn_runs_tools_and_stores_nothing(tmp_path: Path) -> None:
    h = make(
        tmp_path,
        Script(calls=[call("c1", "everything__echo", '{"m": 1}')]),
        Script(["Done."]),
        approval=ApprovalSettings(policy="never"),
    )
    seen: list[events.TurnEvent] = []
    scope = ToolScope(h.service.policy)
    turn = h.service.start_stateless("1", [{"role": "user", "content": "go"}], scope, seen.append)
    result = done(h.service.wait(turn))
    assert turn.state is TurnState.ANSWERED
    assert "".join(result.text) == "Done."
    assert h.tools.calls == [("everything__echo", {"m": 1})]
    assert [type(e).__name__ for e in seen] == [
        "RoundAnswered",
        "ToolStarted",
        "ToolsFinished",
        "Continuing",
        "TextDelta",
        "RoundAnswered",
        "Finished",
    ]
    second_request = h.model.requests[1][0]
    assert second_request[0]["role"] == "system"  # the daemon's prompt: the client sent none
    assert second_request[-1] == {"role": "tool", "tool_call_id": "c1", "content": 'echo {"m": 1}'}
    assert done(h.store.list_sessions("1", 10, 0)) == []
    assert done(h.store.list_tool_executions(None, None, 10, 0)) == []


def test_a_stateless_turn_with_a_request_id_stores_its_executions(tmp_path: Path) -> None:
    """Given a request id (a chat completion's), the turn keeps no session but stores each execution, with
    its error, under the user and that id, as a chat turn stores them on its tool messages."""
    h = make(
        tmp_path,
        Script(calls=[call("c1", "everything__echo", '{"m": 1}'), call("c2", "everything__echo", "not json")]),
        Script(["Done."]),
        approval=ApprovalSettings(policy="never"),
    )
    scope = ToolScope(h.service.policy)
    turn = h.service.start_stateless("1", [{"role": "user", "content": "go"}], scope, lambda e: None,
                                     request_id="chatcmpl_x")
    result = done(h.service.wait(turn))
    stored = done(h.store.list_tool_executions("1", "chatcmpl_x", 10, 0))
    assert sorted((e.tool_call_id, e.result, e.error is not None) for e in stored) == [
        ("c1", 'echo {"m": 1}', False), ("c2", "", True)
    ]
    assert [e.to_json()["id"] for e in result.executions] == ["c1", "c2"]
    assert done(h.store.list_sessions("1", 10, 0)) == []


def test_client_tool_calls_end_the_turn_unrun(tmp_path: Path) -> None:
    h = make(tmp_path, Script(calls=[call("c1", "get_weather", "{}")]), approval=ApprovalSettings(policy="never"))
    client = specs_from_openai(
        [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    )
    scope = ToolScope(h.service.policy, client_tools=client)
    turn = h.service.start_stateless("1", [{"role": "user", "content": "weather?"}], scope, lambda e: None)
    result = done(h.service.wait(turn))
    assert turn.state is TurnState.CLIENT_TOOLS
    assert [c.to_openai()["function"]["name"] for c in result.client_calls] == ["get_weather"]
    assert result.finish_reason == "tool_calls"
    assert h.tools.calls == []
    assert "get_weather" in {t.to_openai()["function"]["name"] for t in h.model.requests[0][1] or []}


def test_a_known_tool_not_offered_is_never_run(tmp_path: Path) -> None:
    """A model that calls a tool its scope did not offer gets an error result; the tool is not called."""
    h = make(
        tmp_path,
        Script(calls=[call("c1", "fs__read", "{}")]),
        Script(["ok"]),
        approval=ApprovalSettings(policy="never"),
    )
    scope = ToolScope(h.service.policy, offers=lambda tool: tool.server == "everything")
    turn = h.service.start_stateless("1", [{"role": "user", "content": "read"}], scope, lambda e: None)
    result = done(h.service.wait(turn))
    assert h.tools.calls == []
    assert result.executions[0].to_json()["error"] == "Error executing tool: tool not offered to this request: fs__read"
    assert {t.to_openai()["function"]["name"] for t in h.model.requests[0][1] or []} == {
        "everything__echo", "everything__fail"}
