"""The OpenAI-compatible face on the wire, without the SDK: the exact chunk and event frames, the error
shape and statuses, what the upstream is sent and what it says passed through.

One daemon with the OpenAI client against the scripted upstream (:mod:`tests.upstream`, in this process)
and server-everything, whose tools are all auto-approved.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_chat_e2e import Chat, ThreadedUpstream, launch
from tests.upstream import error_reply, text_stream, tool_stream

pytestmark = pytest.mark.slow

TOKEN = "sk-wire-0123456789abcdef"
MODEL = "wire-model"
Json = dict[str, Any]


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    running = ThreadedUpstream()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory, upstream: ThreadedUpstream) -> Iterator[Chat]:
    chat = launch(
        tmp_path_factory.mktemp("wire"),
        "chat:\n  title_generation: false\n  keepalive_seconds: 0.05\n"
        '  approval:\n    policy: auto\n    auto_approve: ["everything/*"]\n'
        f"auth:\n  tokens:\n    - {{token: {TOKEN}, user_id: 7}}\n",
        f"llm:\n  provider: openai\n  model: {MODEL}\n  base_url: {upstream.base_url}\n  api_key: sk-test\n"
        "  max_retries: 0\n  timeout_seconds: 2\n",
    )
    yield chat
    chat.close()


def post(chat: Chat, path: str, body: Json, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=20)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def frames(raw: bytes) -> list[tuple[str | None, str]]:
    """SSE frames as (event name, data), comments (keep-alives) left out."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event = next((line[len("event: ") :] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        out.append((event, data))
    return out


def test_streamed_chunks_are_openais_exactly(wire: Chat, upstream: ThreadedUpstream) -> None:
    """A role chunk, content deltas, a finish chunk, the usage chunk, ``[DONE]``; ``usage: null`` on every
    other chunk; no ``event:`` names; the upstream gets the client's messages and the server's tools."""
    received = upstream.mark()
    upstream.push(text_stream(["Hel", "lo"], usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}))
    status, headers, raw = post(
        wire,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        },
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    parsed = frames(raw)
    assert all(event is None for event, _ in parsed)
    assert parsed[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in parsed[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl")
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hel"},
        {"content": "lo"},
        {},
        None,
    ]
    assert [c["choices"][0]["finish_reason"] if c["choices"] else None for c in chunks] == [
        None,
        None,
        None,
        "stop",
        None,
    ]
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    sent = received()[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert "everything__echo" in {t["function"]["name"] for t in sent["tools"]}


def test_server_side_round_on_the_wire(wire: Chat, upstream: ThreadedUpstream) -> None:
    """The model's call runs on server-everything; the next upstream request carries the call and its result;
    the client sees only the final answer, with usage summed over both rounds."""
    received = upstream.mark()
    upstream.push(
        tool_stream(
            [("call_1", "everything__echo", '{"message": "wire"}')],
            usage={"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        ),
        text_stream(["It said wire."], usage={"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}),
    )
    status, _, raw = post(
        wire,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "echo wire"}],
        },
    )
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["object"] == "chat.completion"
    assert answer["choices"] == [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "It said wire.", "refusal": None, "annotations": []},
        }
    ]
    assert answer["usage"] == {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
    second = received()[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "everything__echo"
    assert second[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "Echo: wire"}


def test_upstream_429_passes_through_and_failures_are_502(wire: Chat, upstream: ThreadedUpstream) -> None:
    upstream.push(error_reply(429, "slow down", type="requests", code="rate_limit_exceeded", retry_after=3))
    status, headers, raw = post(
        wire, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 429
    assert headers.get("retry-after") == "3"
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    upstream.push(error_reply(500, "boom"))
    status, _, raw = post(
        wire, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 502
    assert json.loads(raw)["error"]["type"] == "server_error"


def test_errors_have_openais_shape(wire: Chat) -> None:
    status, headers, raw = post(wire, "/v1/chat/completions", {"model": MODEL, "messages": []}, token=None)
    assert status == 401
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == headers["x-request-id"]
    status, _, raw = post(
        wire, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}
    )
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "messages[0].role"
    status, _, raw = post(
        wire, "/v1/chat/completions", {"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "x"}]}
    )
    assert (status, json.loads(raw)["error"]["param"]) == (400, "n")
    status, _, raw = post(
        wire,
        "/v1/responses",
        {
            "model": MODEL,
            "input": "x",
            "store": False,
            "tools": [{"type": "mcp", "server_label": "everything", "require_approval": "always"}],
        },
    )
    assert (status, json.loads(raw)["error"]["param"]) == (400, "store")
    status, _, raw = post(
        wire, "/v1/responses", {"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "f"}]}
    )
    assert (status, json.loads(raw)["error"]["param"]) == (400, "tools[0].type")


def test_trusted_proxy_user_header_works_too(wire: Chat) -> None:
    status, body = wire.request("GET", "/v1/models", "9")
    assert status == 200
    assert body == {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "openai"}]}


def test_streamed_response_frames_name_their_event(wire: Chat, upstream: ThreadedUpstream) -> None:
    """Every frame's ``event:`` is its data's ``type``; sequence numbers count up from 0; the text deltas
    are the upstream's."""
    upstream.push(text_stream(["A", "B"]))
    status, _, raw = post(wire, "/v1/responses", {"model": MODEL, "input": "hi", "stream": True})
    assert status == 200
    parsed = frames(raw)
    events = [json.loads(data) for _, data in parsed]
    assert [event for event, _ in parsed] == [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["A", "B"]
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "AB"


def get(chat: Chat, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=20)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_server_side_executions_are_stored_for_their_user_and_operators(wire: Chat, upstream: ThreadedUpstream) -> None:
    """A streamed completion's server-side call is stored under its completion id and user (the route keeps
    no session): its user reads it per completion, another user gets OpenAI's 404, an operator (a direct
    local call) lists it, and a user cannot use the operator listing."""
    upstream.push(
        tool_stream([("call_s", "everything__echo", '{"message": "kept"}')]),
        text_stream(["Stored."]),
    )
    status, _, raw = post(
        wire, "/v1/chat/completions",
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "echo kept"}]},
    )
    assert status == 200
    completion_id = json.loads(frames(raw)[0][1])["id"]
    assert b"Echo: kept" not in raw  # server-side work never shows in the content
    listing = f"/v1/chat/completions/{completion_id}/tool_executions"
    status, body = get(wire, listing, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    assert body["object"] == "list" and body["completion_id"] == completion_id
    [execution] = body["data"]
    assert {k: execution[k] for k in ("id", "tool_name", "arguments", "result", "request_id", "user_id")} == {
        "id": "call_s", "tool_name": "everything__echo", "arguments": '{"message": "kept"}', "result": "Echo: kept",
        "request_id": completion_id, "user_id": "7",
    }
    assert "error" not in execution and execution["duration_ms"] >= 0
    status, body = get(wire, listing, {"X-User-ID": "8"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = get(wire, f"/v1/tool_executions?completion_id={completion_id}", {})
    assert status == 200 and [e["id"] for e in body["executions"]] == ["call_s"]
    status, body = get(wire, "/v1/tool_executions", {"X-User-ID": "7"})
    assert status == 403
