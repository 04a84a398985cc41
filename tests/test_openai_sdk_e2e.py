"""The OpenAI-compatible face through the official ``openai`` SDK, against the real daemon process with the
real npm MCP servers (server-everything, server-filesystem) and the offline mock model.

One daemon serves the module: policy ``auto`` with every server-everything tool auto-approved, so they run
server-side on ``/v1/chat/completions``, while server-filesystem's tools need a person (on chat completions
they are not offered; on ``/v1/responses`` they end in an ``mcp_approval_request``). Two users hold bearer
tokens, passed as the SDK's ``api_key``. The mock model calls the tools named by ``call <function> <json>``
lines of the last user message and summarises tool results (see :mod:`aichat.llm.mock`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.test_chat_e2e import ECHO, ECHO_RESULT, Chat, launch

pytestmark = pytest.mark.slow

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef0"
MODEL = "mock-model"
EXPIRE_SECONDS = 3
FACE_YAML = (
    "chat:\n  title_generation: false\n  max_tool_rounds: 3\n"
    f'  approval:\n    policy: auto\n    auto_approve: ["everything/*"]\n    expire_seconds: {EXPIRE_SECONDS}\n'
    f"auth:\n  tokens:\n    - {{token: {ALICE}, user_id: 41}}\n    - {{token: {BOB}, user_id: 42}}\n"
)


@pytest.fixture(scope="module")
def notes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("face-files").resolve()
    (folder / "notes.txt").write_text("the code word is marmalade\n")
    return folder


@pytest.fixture(scope="module")
def face(tmp_path_factory: pytest.TempPathFactory, notes: Path) -> Iterator[Chat]:
    chat = launch(tmp_path_factory.mktemp("face"), FACE_YAML, filesystem=notes)
    yield chat
    chat.close()


def client(face: Chat, key: str = ALICE) -> OpenAI:
    return OpenAI(base_url=face.base + "/v1", api_key=key, max_retries=0, timeout=20)


def read_call(notes: Path) -> str:
    return f'call filesystem__read_text_file {{"path": "{notes / "notes.txt"}"}}'


# -- models and errors --------------------------------------------------------------------------------


def test_models_lists_the_configured_model(face: Chat) -> None:
    """``models.list()`` names the configured model; ``models.retrieve`` of another is a NotFoundError."""
    models = client(face).models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client(face).models.retrieve("gpt-4o")


def test_sdk_raises_its_typed_errors(face: Chat) -> None:
    """A wrong key is AuthenticationError, an unknown model NotFoundError with code model_not_found, a bad
    field BadRequestError naming the param."""
    with pytest.raises(openai.AuthenticationError):
        client(face, "sk-wrong-0123456789abcdef").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.NotFoundError) as missing:
        client(face).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client(face).chat.completions.create(model=MODEL, messages=[])
    assert bad.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as unconfigured:
        client(face).responses.create(
            model=MODEL,
            input="hi",
            tools=[
                {
                    "type": "mcp",
                    "server_label": "github",
                    "server_url": "https://example.invalid/mcp",
                    "require_approval": "never",
                }
            ],
        )
    assert unconfigured.value.param == "tools[0].server_label"
    assert "operator configured" in unconfigured.value.message


# -- chat completions ---------------------------------------------------------------------------------


def test_chat_completion_runs_a_server_side_tool(face: Chat) -> None:
    """An auto-approved MCP tool runs on server-everything inside one request; the answer is the model's
    summary of the real result, usage is summed over both rounds."""
    answer = client(face).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ECHO}])
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == f"Mock summary of 1 tool result(s): {ECHO_RESULT}"
    assert choice.message.tool_calls is None
    assert answer.usage is not None and answer.usage.total_tokens > 0
    assert answer.model == MODEL


def test_streamed_chat_completion_with_usage(face: Chat) -> None:
    """Streamed: a role chunk first, content deltas only (no tool progress), a finish chunk, then the usage
    chunk with no choices."""
    chunks = list(
        client(face).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": ECHO}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"Mock summary of 1 tool result(s): {ECHO_RESULT}"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_keeps_the_round_cap(face: Chat) -> None:
    """A model that calls a server-side tool for ever is stopped by chat.max_tool_rounds, as a chat turn is."""
    answer = client(face).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'loop everything__echo {"message": "again"}'}]
    )
    content = answer.choices[0].message.content or ""
    assert "Stopped after 3 tool rounds (chat.max_tool_rounds)" in content
    assert answer.choices[0].finish_reason == "stop"


def test_tools_needing_approval_are_not_offered_on_chat_completions(face: Chat, notes: Path) -> None:
    """server-filesystem needs a person under the policy: the model is not offered it, so nothing runs."""
    answer = client(face).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": read_call(notes)}])
    content = answer.choices[0].message.content or ""
    assert content.startswith("Mock cannot call 'filesystem__read_text_file': no such tool")
    assert "marmalade" not in content


def test_client_tool_call_is_returned_to_the_client(face: Chat) -> None:
    """A call to a tool the client sent ends with finish_reason tool_calls; the client's result in a next
    request is answered."""
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    messages: list[Any] = [{"role": "user", "content": 'call get_weather {"city": "Paris"}'}]
    sdk = client(face)
    first = sdk.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    streamed = list(sdk.chat.completions.create(model=MODEL, messages=messages, tools=tools, stream=True))
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name if d.function else None) for d in deltas] == [(0, "get_weather")]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    second = sdk.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert second.choices[0].message.content == "Mock summary of 1 tool result(s): get_weather: sunny"


# -- responses ----------------------------------------------------------------------------------------


def mcp(server: str, require: Any = "never", **extra: Any) -> Any:
    return {"type": "mcp", "server_label": server, "require_approval": require, **extra}


def test_response_runs_an_mcp_call(face: Chat) -> None:
    """Output items: the server's tool list, the mcp_call with its real output, the model's message; the
    conversation is a session of the token's user."""
    response = client(face).responses.create(model=MODEL, input=ECHO, tools=[mcp("everything")])
    kinds = [item.type for item in response.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"]
    listing = response.output[0]
    assert listing.type == "mcp_list_tools" and "echo" in {t.name for t in listing.tools}
    call = response.output[1]
    assert call.type == "mcp_call"
    assert (call.server_label, call.name, call.output, call.error) == ("everything", "echo", "Echo: hi", None)
    assert response.output_text == f"Mock summary of 1 tool result(s): {ECHO_RESULT}"
    assert response.status == "completed"
    sessions = face.ok(face.request("GET", "/v1/chat/sessions", "41"))["sessions"]
    session_id = response.id.removeprefix("resp_").rpartition("_")[0]
    assert session_id in {s["id"] for s in sessions}


def test_approval_round_trip_and_exactly_once(face: Chat, notes: Path) -> None:
    """``require_approval: "never"`` cannot lift the operator's floor: the filesystem call asks; approving
    it with previous_response_id runs it on server-filesystem; the same approval cannot be used again, nor by
    another user."""
    sdk = client(face)
    tools = [mcp("filesystem", "never")]
    first = sdk.responses.create(model=MODEL, input=read_call(notes), tools=tools)
    requests = [item for item in first.output if item.type == "mcp_approval_request"]
    assert len(requests) == 1
    assert (requests[0].server_label, requests[0].name) == ("filesystem", "read_text_file")
    decision: Any = [{"type": "mcp_approval_response", "approval_request_id": requests[0].id, "approve": True}]

    with pytest.raises(openai.NotFoundError):
        client(face, BOB).responses.create(model=MODEL, previous_response_id=first.id, input=decision, tools=tools)

    second = sdk.responses.create(model=MODEL, previous_response_id=first.id, input=decision, tools=tools)
    calls = [item for item in second.output if item.type == "mcp_call"]
    assert [(c.name, c.output, c.approval_request_id) for c in calls] == [
        ("read_text_file", "the code word is marmalade\n", requests[0].id)
    ]
    assert "marmalade" in second.output_text
    with pytest.raises(openai.ConflictError):
        sdk.responses.create(model=MODEL, previous_response_id=first.id, input=decision, tools=tools)


def test_denied_approval_runs_nothing_and_the_model_answers(face: Chat, notes: Path) -> None:
    sdk = client(face)
    tools = [mcp("filesystem", "always")]
    first = sdk.responses.create(model=MODEL, input=read_call(notes), tools=tools)
    request = next(item for item in first.output if item.type == "mcp_approval_request")
    denied = sdk.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=tools,
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": False}],
    )
    assert [item.type for item in denied.output] == ["message"]
    assert "denied" in denied.output_text
    assert "marmalade" not in denied.output_text


def test_previous_response_id_continues_the_session_and_store_false_keeps_nothing(face: Chat) -> None:
    sdk = client(face, BOB)
    first = sdk.responses.create(model=MODEL, input="remember apricot")
    second = sdk.responses.create(model=MODEL, input="and plum", previous_response_id=first.id)
    session_id = second.id.removeprefix("resp_").rpartition("_")[0]
    stored = face.messages(session_id, "42")
    assert [(m["role"], m["content"]) for m in stored if m["role"] == "user"] == [
        ("user", "remember apricot"),
        ("user", "and plum"),
    ]
    before = face.ok(face.request("GET", "/v1/chat/sessions", "42"))["sessions"]
    loose = sdk.responses.create(model=MODEL, input="forget me", store=False)
    assert loose.output_text == "Mock response to: 'forget me'. Available tools: 0"
    after = face.ok(face.request("GET", "/v1/chat/sessions", "42"))["sessions"]
    assert len(after) == len(before)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=MODEL, input="again", previous_response_id=loose.id)


def test_streamed_response_events_are_the_sdk_types(face: Chat) -> None:
    """Streamed, every event parses as the SDK's type, in order, with increasing sequence numbers."""
    events = list(client(face).responses.create(model=MODEL, input=ECHO, tools=[mcp("everything")], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    for expected in (
        "response.mcp_list_tools.completed",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.added",
        "response.output_item.done",
    ):
        assert expected in kinds
    assert kinds.index("response.mcp_call.completed") < kinds.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == f"Mock summary of 1 tool result(s): {ECHO_RESULT}"
    assert type(events[0]).__name__ == "ResponseCreatedEvent"


def test_streamed_approval_request_and_expiry(face: Chat, notes: Path) -> None:
    """Streamed, the approval request is an output item like the others; once ``expire_seconds`` pass, the
    approval can no longer be granted (ConflictError) and nothing runs."""
    sdk = client(face)
    tools = [mcp("filesystem", {"never": {"tool_names": ["read_text_file"]}})]
    events = list(sdk.responses.create(model=MODEL, input=read_call(notes), tools=tools, stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["mcp_list_tools", "mcp_approval_request"]
    final = events[-1]
    assert final.type == "response.completed"
    request = final.response.output[-1]
    assert request.type == "mcp_approval_request"
    time.sleep(EXPIRE_SECONDS + 0.5)
    with pytest.raises(openai.ConflictError) as expired:
        sdk.responses.create(
            model=MODEL,
            previous_response_id=final.response.id,
            tools=tools,
            input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}],
        )
    assert "expired" in expired.value.message
