"""The Responses face's reading of ``mcp`` tools: which tools a request offers, which it wants approved,
and the operator's policy as the floor under both; plus the ids that carry a session and an approval."""

from __future__ import annotations

from typing import Any

import pytest

from aichat.api.openai_responses import _approval_of, _mcp_tools, _scope, _session_of
from aichat.api.openai_wire import OpenAIError
from aichat.chat.approvals import ApprovalPolicy
from tests.test_chat import FakeTool

ECHO = FakeTool("echo", "everything")
SUM = FakeTool("get-sum", "everything")
READ = FakeTool("read", "fs")


class Chat:
    """What ``_scope`` reads of the chat service."""

    def __init__(self, policy: ApprovalPolicy) -> None:
        self.policy = policy


def tools(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"tools": [{"type": "mcp", **entry} for entry in entries]}


def test_require_approval_filters_and_the_policy_floor() -> None:
    servers = _mcp_tools(
        tools(
            {
                "server_label": "everything",
                "allowed_tools": ["echo", "get-sum"],
                "require_approval": {"never": {"tool_names": ["echo"]}},
            },
        ),
        {"everything", "fs"},
    )
    free = _scope(Chat(ApprovalPolicy("never")), servers)  # type: ignore[arg-type]
    assert free.offers(ECHO) and free.offers(SUM) and not free.offers(READ)
    assert not free.needs_approval("everything__echo", ECHO)
    assert free.needs_approval("everything__get-sum", SUM)
    floor = _scope(Chat(ApprovalPolicy("always")), servers)  # type: ignore[arg-type]
    assert floor.needs_approval("everything__echo", ECHO)

    only_always = _mcp_tools(
        tools({"server_label": "everything", "require_approval": {"always": {"tool_names": ["get-sum"]}}}),
        {"everything"},
    )
    scope = _scope(Chat(ApprovalPolicy("never")), only_always)  # type: ignore[arg-type]
    assert scope.needs_approval("everything__get-sum", SUM)
    assert not scope.needs_approval("everything__echo", ECHO)
    default = _scope(Chat(ApprovalPolicy("never")), _mcp_tools(tools({"server_label": "fs"}), {"fs"}))  # type: ignore[arg-type]
    assert default.needs_approval("fs__read", READ)


@pytest.mark.parametrize(
    ("entry", "param"),
    [
        ({"server_label": "github", "server_url": "https://example.invalid"}, "tools[0].server_label"),
        ({"server_label": "fs", "require_approval": "sometimes"}, "tools[0].require_approval"),
        ({"server_label": "fs", "allowed_tools": "read"}, "tools[0].allowed_tools"),
        ({"server_label": "fs", "connector_id": "connector_gmail"}, "tools[0].connector_id"),
    ],
)
def test_bad_mcp_tools_name_their_param(entry: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        _mcp_tools(tools(entry), {"fs"})
    assert (refused.value.status, refused.value.param) == (400, param)


def test_ids_carry_the_session_and_the_approval() -> None:
    assert _session_of("resp_5b0c-1_ab12") == "5b0c-1"
    assert _approval_of("mcpr_approval_9f-2_1") == ("approval_9f-2", 1)
    with pytest.raises(OpenAIError) as unknown:
        _session_of("resp_nosession")
    assert (unknown.value.status, unknown.value.param) == (404, "previous_response_id")
    with pytest.raises(OpenAIError):
        _approval_of("approval_9f-2")
