"""What a live turn reports as it goes, in the turn's own terms; each face presents these its own way.

The reference API turns them into its ``StreamMessage`` events (:class:`aichat.chat.streams.ReferencePresenter`),
``/v1/chat/completions`` into chat-completion chunks, ``/v1/responses`` into Responses stream events. A
listener is a plain callable; it must not raise. Calls and executions are the records of
:mod:`aichat.llm.tools`; each face writes them in its own JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aichat.chat.turn import TurnResult
    from aichat.llm.tools import Execution, ToolCall
    from aichat.store.base import Approval


@dataclass(frozen=True)
class TextDelta:
    """A piece of the model's answer, as it streams."""

    text: str


@dataclass(frozen=True)
class RoundAnswered:
    """The model finished one round: its whole text and the calls it asked for."""

    text: str
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class ToolStarted:
    """A server-side tool call is about to run."""

    call: ToolCall


@dataclass(frozen=True)
class ToolsFinished:
    """A batch of server-side calls ran; ``executions`` are what each came to, in the calls' order."""

    calls: list[ToolCall]
    executions: list[Execution]


@dataclass(frozen=True)
class Continuing:
    """The model is asked again after tool results (``denied``: after the user refused every call)."""

    denied: bool = False


@dataclass(frozen=True)
class RoundLimit:
    """The round cap stopped the loop; ``notice`` is what the user is told (part of the answer)."""

    notice: str


@dataclass(frozen=True)
class ApprovalRequested:
    """Calls wait for a person: the stored, durable approval."""

    approval: Approval


@dataclass(frozen=True)
class Finished:
    """The turn is over: answered, waiting for an approval, or handing calls to the client."""

    result: TurnResult


@dataclass(frozen=True)
class Failed:
    """The turn failed; ``result.error`` says why (what was said so far is stored)."""

    result: TurnResult


TurnEvent = (
    TextDelta | RoundAnswered | ToolStarted | ToolsFinished | Continuing | RoundLimit
    | ApprovalRequested | Finished | Failed
)
Listener = Callable[[TurnEvent], None]
