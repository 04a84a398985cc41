"""The tool loop's records (:mod:`aichat.llm.tools`): each one's round trip through the JSON it is stored
or sent as, and how every codec writes it (Chat Completions, Anthropic Messages, Gemini); a failed
execution against a successful one, wherever the difference shows."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from aichat.llm import anthropic, gemini
from aichat.llm.openai import OpenAIProvider, wire_messages
from aichat.llm.tools import (
    EMPTY_SCHEMA,
    Failed,
    Succeeded,
    ToolCall,
    ToolSpec,
    calls_from_openai,
    execution_from_json,
    specs_from_openai,
)
from tests.llm.fakes import FakeHTTP

SCHEMA = {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}
ECHO = ToolSpec("everything__echo", "Echoes back the input", SCHEMA)
BARE = ToolSpec("get_weather")
CALL = ToolCall("call_1", "everything__echo", '{"message": "hi"}')
SIGNED = ToolCall("call_2", "everything__echo", '{"message": "x"}', signature="sig-g")
TIMES = ("2026-01-02T03:04:05.000000Z", "2026-01-02T03:04:05.250000Z", 250)


def history(*results: dict[str, Any]) -> list[dict[str, Any]]:
    """A user question, the assistant's two calls and the given tool results (neutral history)."""
    return [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [CALL.to_openai(), SIGNED.to_openai()]},
        *results,
    ]


# -- ToolCall ------------------------------------------------------------------------------------------


def test_a_call_round_trips_through_its_chat_completions_entry() -> None:
    """``to_openai`` writes the stored ``tool_calls`` entry; ``from_openai`` reads back the same record, the
    thought signature included."""
    assert CALL.to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "everything__echo", "arguments": '{"message": "hi"}'},
    }
    assert SIGNED.to_openai()["extra_content"] == {"google": {"thought_signature": "sig-g"}}
    assert ToolCall.from_openai(CALL.to_openai()) == CALL
    assert ToolCall.from_openai(SIGNED.to_openai()) == SIGNED


def test_calls_read_from_rows_are_normalised_and_malformed_rows_left_out() -> None:
    """Object arguments become JSON text, empty ones ``{}``; entries without a ``function`` are skipped."""
    rows = [
        {"id": "a", "function": {"name": "f", "arguments": {"x": 1}}},
        {"id": "b"},
        "junk",
        {"id": "c", "function": {"name": "g", "arguments": "  "}},
    ]
    assert calls_from_openai(rows) == [ToolCall("a", "f", '{"x": 1}'), ToolCall("c", "g", "{}")]
    assert calls_from_openai(None) == []
    assert calls_from_openai({"id": "a"}) == []


def test_parsed_arguments_keep_text_that_is_not_an_object() -> None:
    assert CALL.parsed_arguments() == {"message": "hi"}
    assert ToolCall("c", "f", "not json").parsed_arguments() == {"input": "not json"}
    assert ToolCall("c", "f", "[1]").parsed_arguments() == {"input": [1]}


def test_each_codec_writes_a_call_in_its_own_shape() -> None:
    """Chat Completions drops the signature; Anthropic sends a ``tool_use`` block with the parsed input;
    Gemini a ``functionCall`` part with the call's signature, or the placeholder for a foreign call."""
    [_, assistant] = wire_messages(history())
    assert assistant["tool_calls"] == [CALL.to_openai(), {k: v for k, v in SIGNED.to_openai().items()
                                                          if k != "extra_content"}]
    [_, claude] = anthropic.wire_messages(history())
    assert claude == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "everything__echo", "input": {"message": "hi"}},
            {"type": "tool_use", "id": "call_2", "name": "everything__echo", "input": {"message": "x"}},
        ],
    }
    [_, model] = gemini.wire_contents(history())
    assert model["parts"] == [
        {"functionCall": {"id": "call_1", "name": "everything__echo", "args": {"message": "hi"}},
         "thoughtSignature": gemini.FOREIGN_SIGNATURE},
        {"functionCall": {"id": "call_2", "name": "everything__echo", "args": {"message": "x"}},
         "thoughtSignature": "sig-g"},
    ]


# -- ToolSpec ------------------------------------------------------------------------------------------


def test_a_spec_round_trips_through_its_function_tool() -> None:
    """A description the tool came without stays absent on the Chat Completions wire."""
    assert ECHO.to_openai() == {
        "type": "function",
        "function": {"name": "everything__echo", "description": "Echoes back the input", "parameters": SCHEMA},
    }
    assert BARE.to_openai() == {"type": "function", "function": {"name": "get_weather", "parameters": EMPTY_SCHEMA}}
    for spec in (ECHO, BARE, ToolSpec("f", "", {})):
        assert ToolSpec.from_openai(spec.to_openai()) == spec


def test_specs_read_from_a_request_keep_only_function_tools() -> None:
    tools = [ECHO.to_openai(), {"type": "mcp", "server_label": "x"}, {"function": {"name": 3}}, BARE.to_openai()]
    assert specs_from_openai(tools) == [ECHO, BARE]
    assert specs_from_openai(None) == []


def test_each_codec_writes_the_tools_offered_in_its_own_shape() -> None:
    """OpenAI: function tools; Anthropic: ``input_schema``; Gemini: ``parametersJsonSchema`` declarations.
    A tool without a description or a schema is sent ``""`` and an empty object schema where one is
    required."""
    empty = ToolSpec("f", None, {})
    openai_body = OpenAIProvider(reactor=Clock(), model="m", http=FakeHTTP()).request_body(
        [{"role": "user", "content": "x"}], [ECHO, empty]
    )
    assert openai_body["tools"] == [ECHO.to_openai(), {"type": "function", "function": {"name": "f", "parameters": {}}}]
    claude_body = anthropic.request_body("m", [{"role": "user", "content": "x"}], [ECHO, empty])
    assert claude_body["tools"] == [
        {"name": "everything__echo", "description": "Echoes back the input", "input_schema": SCHEMA},
        {"name": "f", "description": "", "input_schema": EMPTY_SCHEMA},
    ]
    gemini_body = gemini.request_body([{"role": "user", "content": "x"}], [ECHO, empty])
    assert gemini_body["tools"] == [
        {
            "functionDeclarations": [
                {"name": "everything__echo", "description": "Echoes back the input", "parametersJsonSchema": SCHEMA},
                {"name": "f", "description": "", "parametersJsonSchema": EMPTY_SCHEMA},
            ]
        }
    ]
    assert "tools" not in gemini.request_body([{"role": "user", "content": "x"}], [])
    assert json.loads(json.dumps(claude_body)) == claude_body


# -- Execution -----------------------------------------------------------------------------------------


def test_succeeded_and_failed_render_as_the_reference_tool_execution() -> None:
    """A success has its result and no ``error`` key; a failure an empty result and its error, in the
    reference's key order."""
    ok = Succeeded(CALL, "echo hi", *TIMES)
    bad = Failed(CALL, "Tool returned an error: boom", *TIMES)
    assert ok.to_json() == {
        "id": "call_1",
        "tool_name": "everything__echo",
        "arguments": '{"message": "hi"}',
        "result": "echo hi",
        "start_time": TIMES[0],
        "end_time": TIMES[1],
        "duration_ms": 250,
    }
    assert "error" not in ok.to_json()
    assert list(bad.to_json()) == ["id", "tool_name", "arguments", "result", "error", "start_time", "end_time",
                                   "duration_ms"]
    assert (bad.to_json()["result"], bad.to_json()["error"]) == ("", "Tool returned an error: boom")
    assert (ok.content, bad.content) == ("echo hi", "Tool returned an error: boom")


def test_executions_round_trip_through_their_stored_rows() -> None:
    """A stored row reads back as the record it was written from; an ``error`` makes it a failure."""
    ok = Succeeded(CALL, "echo hi", *TIMES)
    bad = Failed(CALL, "nope", *TIMES)
    assert execution_from_json(ok.to_json()) == ok
    assert execution_from_json(bad.to_json()) == bad
    assert isinstance(execution_from_json({"id": "x", "error": "e"}), Failed)
    lenient = execution_from_json({"id": "x", "tool_name": "t", "result": "r", "duration_ms": "soon"})
    assert lenient == Succeeded(ToolCall("x", "t", "{}"), "r", "", "", 0)


def test_each_codec_tells_the_model_which_results_failed() -> None:
    """Anthropic marks a failed ``tool_result`` ``is_error``; Gemini answers ``{error}`` instead of
    ``{result}``; Chat Completions has no such field and leaves it out."""
    results = history(
        {"role": "tool", "tool_call_id": "call_1", "content": "echo hi"},
        {"role": "tool", "tool_call_id": "call_2", "content": "nope", "is_error": True},
    )
    assert all("is_error" not in m for m in wire_messages(results))
    claude = anthropic.wire_messages(results)[-1]["content"]
    assert [block.get("is_error") for block in claude] == [None, True]
    contents = gemini.wire_contents(results)[-1]["parts"]
    assert [part["functionResponse"]["response"] for part in contents] == [{"result": "echo hi"}, {"error": "nope"}]
