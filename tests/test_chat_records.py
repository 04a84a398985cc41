"""The tool loop on records: a turn's calls are :class:`~aichat.llm.tools.ToolCall`, its tool runs end as
:class:`~aichat.llm.tools.Succeeded` or :class:`~aichat.llm.tools.Failed`, and the dict forms appear only
where they are stored or sent (tool messages, approvals, the reference's JSON, the model's context).
Scripted model, fake tools, the real SQLite store and a fake clock (the harness of :mod:`tests.test_chat`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from twisted.internet.task import Clock

from aichat.chat import events
from aichat.chat.approvals import ApprovalPolicy, approval_calls
from aichat.chat.context import to_openai
from aichat.chat.conversation import execution_row
from aichat.chat.streams import ReferencePresenter, StreamRegistry
from aichat.chat.turn import ToolScope, tool_spec
from aichat.config import ApprovalSettings
from aichat.llm.tools import Execution, Failed, Succeeded, ToolCall, ToolSpec
from aichat.store.base import APPROVAL_STATUSES, Approval, ApprovalStatus, Message, ToolExecution
from tests.test_chat import FakeTool, Script, call, done, make

TIMES = ("2026-01-02T03:04:05.000000Z", "2026-01-02T03:04:05.250000Z", 250)


def test_a_turn_runs_calls_as_records_and_stores_their_rows(tmp_path: Path) -> None:
    """The listener gets the calls and their outcomes as records; the session stores the calls and each
    execution as the reference's JSON, the failure's error as the tool message's text."""
    h = make(
        tmp_path,
        Script(calls=[call("a", "everything__echo", '{"m": 1}'), call("b", "everything__fail")]),
        Script(["Done."]),
        approval=ApprovalSettings(policy="never"),
        title_generation=False,
    )
    seen: list[events.TurnEvent] = []
    session = h.session()
    turn = h.service.start_message("1", session, "go", listener=seen.append)
    result = done(h.service.wait(turn))
    [answered] = [e for e in seen if isinstance(e, events.RoundAnswered) and e.tool_calls]
    assert answered.tool_calls == [
        ToolCall("a", "everything__echo", '{"m": 1}'), ToolCall("b", "everything__fail", "{}")
    ]
    [finished] = [e for e in seen if isinstance(e, events.ToolsFinished)]
    assert [type(e) for e in finished.executions] == [Succeeded, Failed]
    assert result.executions == finished.executions
    ok, bad = finished.executions
    assert isinstance(ok, Succeeded) and ok.result == 'echo {"m": 1}'
    assert isinstance(bad, Failed) and bad.error == "Tool returned an error: it broke"
    stored = h.history(session)
    assert stored[1].tool_calls == [c.to_openai() for c in answered.tool_calls]
    tools = [m for m in stored if m.role == "tool"]
    assert [(m.content, m.tool_executions) for m in tools] == [
        ('echo {"m": 1}', [ok.to_json()]),
        ("Tool returned an error: it broke", [bad.to_json()]),
    ]
    assert result.response()["message"]["tool_executions"] == [ok.to_json(), bad.to_json()]


def test_an_approval_stores_rows_and_gives_back_records(tmp_path: Path) -> None:
    """The approval keeps the calls as ``tool_calls`` rows, with the status it is in; the loop reads
    records back from it, and runs the approved one."""
    h = make(tmp_path, Script(calls=[call("a", "everything__echo", '{"m": 1}')]), Script(["ok"]),
             title_generation=False)
    turn = h.send(h.session(), "go")
    result = done(h.service.wait(turn))
    approval = result.approval
    assert approval is not None and approval.status == "pending"
    assert approval.tool_calls == [call("a", "everything__echo", '{"m": 1}').to_openai()]
    assert approval_calls(approval) == [call("a", "everything__echo", '{"m": 1}')]
    resumed = h.resolve(approval.id, True)
    assert [e.call for e in done(h.service.wait(resumed)).executions] == [call("a", "everything__echo", '{"m": 1}')]
    assert done(h.store.get_approval("1", approval.id)).status == "approved"


def test_approval_statuses_are_the_four_the_store_writes() -> None:
    assert APPROVAL_STATUSES == get_args(ApprovalStatus) == ("pending", "approved", "denied", "expired")
    rows: list[dict[str, Any]] = [{"id": "c", "function": {"name": "f", "arguments": "{}"}}, {"id": "bad"}]
    approval = Approval("ap", "s", "1", rows, "pending", TIMES[0], TIMES[1])
    assert approval_calls(approval) == [ToolCall("c", "f", "{}")]


def test_the_context_marks_only_failed_results_as_errors() -> None:
    """The model is told a result failed when its stored execution is a failure, not otherwise."""
    ok = Succeeded(ToolCall("a", "f", "{}"), "fine", *TIMES)
    bad = Failed(ToolCall("b", "f", "{}"), "broke", *TIMES)
    good_message = Message("m1", "s", "tool", "fine", tool_call_id="a", tool_executions=[ok.to_json()])
    bad_message = Message("m2", "s", "tool", "broke", tool_call_id="b", tool_executions=[bad.to_json()])
    assert to_openai(good_message) == {"role": "tool", "tool_call_id": "a", "content": "fine"}
    assert to_openai(bad_message) == {"role": "tool", "tool_call_id": "b", "content": "broke", "is_error": True}


def test_the_reference_stream_words_outcomes_from_the_records() -> None:
    """"successful", "failed" or "partially failed" from the records; the event carries their JSON."""
    registry = StreamRegistry(Clock(), 60)
    stream = registry.create("st", "1", "s")
    presenter = ReferencePresenter(stream)
    ok = Succeeded(ToolCall("a", "f", "{}"), "fine", *TIMES)
    bad = Failed(ToolCall("b", "f", "{}"), "broke", *TIMES)
    batches: list[list[Execution]] = [[ok], [bad], [ok, bad]]
    for executions in batches:
        presenter(events.ToolsFinished([e.call for e in executions], executions))
    assert [e.content for e in stream.events] == [
        "Executed 1 tool(s) (successful)",
        "Executed 1 tool(s) (failed)",
        "Executed 2 tool(s) (partially failed)",
    ]
    assert stream.events[2].tool_executions == [ok.to_json(), bad.to_json()]


def test_an_execution_row_is_the_stored_form_of_the_record() -> None:
    """A chat completion's executions are stored as the same row the reference JSON would give."""
    for execution in (Succeeded(ToolCall("a", "f", '{"x": 1}'), "fine", *TIMES),
                      Failed(ToolCall("b", "f", "{}"), "broke", *TIMES)):
        row = execution_row("1", "chatcmpl_x", execution)
        expected = ToolExecution.of("1", "chatcmpl_x", execution.to_json())
        assert (row.tool_call_id, row.tool_name, row.arguments, row.result, row.error, row.start_time,
                row.end_time, row.duration_ms) == (
            expected.tool_call_id, expected.tool_name, expected.arguments, expected.result, expected.error,
            expected.start_time, expected.end_time, expected.duration_ms)


def test_mcp_tools_and_client_tools_are_offered_as_specs() -> None:
    """An MCP tool becomes a spec under its model-facing name; a client's tools are specs too."""
    tool = FakeTool("echo", "everything", description="Echoes", input_schema={"type": "object"})
    assert tool_spec(tool) == ToolSpec("everything__echo", "Echoes (everything)", {"type": "object"})
    assert tool_spec(FakeTool("x", "s", description="", input_schema={})) == ToolSpec(
        "s__x", "x (s)", {"type": "object", "properties": {}}
    )
    scope = ToolScope(ApprovalPolicy("never"), client_tools=[ToolSpec("w")])
    assert scope.client_names == frozenset({"w"})
