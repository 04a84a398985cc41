"""The approval policy: which tool calls run at once and which wait for the user.

``always`` (the reference's behaviour, the default) asks for every call; ``never`` asks for none; ``auto``
runs the calls whose ``<server>/<tool>`` or function name matches one of the ``auto_approve`` globs and asks
for the rest. Commands in chat text use the reference's ``[APPROVE_TOOLS:<id>]`` / ``[DENY_TOOLS:<id>]``.
A stored approval keeps its calls as rows (Chat Completions ``tool_calls`` entries); :func:`approval_calls`
reads them back as :class:`~aichat.llm.tools.ToolCall` records for the tool loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from aichat.llm.tools import ToolCall, calls_from_openai
from aichat.store.base import Approval

_COMMAND = re.compile(r"^\[(APPROVE|DENY)_TOOLS:([A-Za-z0-9_.:-]+)\]$")


@dataclass(frozen=True)
class ApprovalCommand:
    """A chat message that resolves an approval instead of being sent to the model."""

    approve: bool
    request_id: str


def parse_command(message: str) -> ApprovalCommand | None:
    """``[APPROVE_TOOLS:<id>]`` or ``[DENY_TOOLS:<id>]`` (surrounding spaces allowed), else ``None``."""
    match = _COMMAND.match(message.strip())
    if match is None:
        return None
    return ApprovalCommand(match.group(1) == "APPROVE", match.group(2))


@dataclass(frozen=True)
class ApprovalPolicy:
    """Decides per call whether the user must approve it."""

    policy: str = "always"
    auto_approve: Sequence[str] = ()

    def needs_approval(self, function_name: str, server: str | None, tool: str | None) -> bool:
        if self.policy == "never":
            return False
        if self.policy == "always":
            return True
        names = [function_name]
        if server and tool:
            names.append(f"{server}/{tool}")
        return not any(fnmatchcase(name, pattern) for pattern in self.auto_approve for name in names)


def approval_calls(approval: Approval) -> list[ToolCall]:
    """The calls an approval holds, in order, as records (rows that are not calls are left out)."""
    return calls_from_openai(approval.tool_calls)
