"""The tool loop's records: the tools offered to a model (:class:`ToolSpec`), the calls it asks for
(:class:`ToolCall`) and what running one came to (:data:`Execution`: :class:`Succeeded` or :class:`Failed`).

Chat turns, approvals and the provider codecs pass these records around; each has the one conversion to
and from the JSON it is written as: ``to_openai``/``from_openai`` for Chat Completions (the neutral history
and the stored rows are in that shape), ``to_json``/:func:`execution_from_json` for the reference's
``ToolExecution`` (stored on tool messages, sent in SSE events). The Anthropic and Gemini codecs build
their own shapes from the records' fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The arguments schema of a tool that declares none.
EMPTY_SCHEMA: Mapping[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCall:
    """One complete function call requested by the model; ``arguments`` is JSON text as the model sent it."""

    id: str
    name: str
    arguments: str
    #: Gemini's thought signature for this call, sent back with it on the next request; other providers
    #: neither give nor need one (and never see it).
    signature: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The call as an entry of an assistant message's ``tool_calls`` (how history stores it); a
        signature goes in ``extra_content.google.thought_signature``, as Google's compatible API puts it."""
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if self.signature:
            call["extra_content"] = {"google": {"thought_signature": self.signature}}
        return call

    @classmethod
    def from_openai(cls, call: Any) -> ToolCall | None:
        """Read an entry of ``tool_calls`` (as :meth:`to_openai` writes it); ``None`` when malformed."""
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            return None
        function = call["function"]
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        extra = call.get("extra_content")
        google = extra.get("google") if isinstance(extra, dict) else None
        signature = google.get("thought_signature") if isinstance(google, dict) else None
        return cls(
            id=str(call.get("id") or ""),
            name=str(function.get("name") or ""),
            arguments=arguments if isinstance(arguments, str) and arguments.strip() else "{}",
            signature=signature if isinstance(signature, str) and signature else None,
        )

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as an object, for wire formats that send objects; text that is not a JSON object
        is kept under ``"input"``."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {"input": self.arguments}
        return value if isinstance(value, dict) else {"input": value}


def calls_from_openai(calls: Any) -> list[ToolCall]:
    """The well-formed entries of a ``tool_calls`` list (a stored row, an assistant message), in order."""
    if not isinstance(calls, list | tuple):
        return []
    read = (ToolCall.from_openai(call) for call in calls)
    return [call for call in read if call is not None]


@dataclass(frozen=True)
class ToolSpec:
    """A function tool offered to a model: its name, what it does and the JSON Schema of its arguments.

    ``description`` is ``None`` when the tool came without one (a client's tool), so the Chat Completions
    wire leaves it out as the client did; the other codecs send ``""``. ``parameters`` is the schema as
    given; codecs that need an object schema use :attr:`schema`.
    """

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(EMPTY_SCHEMA))

    @property
    def schema(self) -> Mapping[str, Any]:
        """The arguments schema, or an empty object schema when the tool gave none."""
        return self.parameters if isinstance(self.parameters, Mapping) and self.parameters else EMPTY_SCHEMA

    def to_openai(self) -> dict[str, Any]:
        """The tool as an entry of a Chat Completions request's ``tools``."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    @classmethod
    def from_openai(cls, tool: Any) -> ToolSpec | None:
        """Read an entry of a request's ``tools`` (a function tool); ``None`` when it is not one."""
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None
        description = function.get("description")
        parameters = function.get("parameters")
        return cls(
            name=function["name"],
            description=description if isinstance(description, str) else None,
            parameters=parameters if isinstance(parameters, dict) else {},
        )


@dataclass(frozen=True)
class Succeeded:
    """A tool call that ran and returned ``result`` (the text the model is sent back)."""

    call: ToolCall
    result: str
    start_time: str
    end_time: str
    duration_ms: int

    @property
    def content(self) -> str:
        """What the model is told the call returned."""
        return self.result

    def to_json(self) -> dict[str, Any]:
        """The reference's ``ToolExecution`` JSON."""
        return _execution_json(self, self.result, None)


@dataclass(frozen=True)
class Failed:
    """A tool call that could not run or whose tool reported an error; ``error`` says which, for the model
    and the user."""

    call: ToolCall
    error: str
    start_time: str
    end_time: str
    duration_ms: int

    @property
    def content(self) -> str:
        """What the model is told of the failure."""
        return self.error

    def to_json(self) -> dict[str, Any]:
        """The reference's ``ToolExecution`` JSON: ``result`` empty, ``error`` set."""
        return _execution_json(self, "", self.error)


#: What running one tool call came to.
Execution = Succeeded | Failed


def _execution_json(execution: Execution, result: str, error: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": execution.call.id,
        "tool_name": execution.call.name,
        "arguments": execution.call.arguments,
        "result": result,
    }
    if error is not None:
        out["error"] = error
    out.update(start_time=execution.start_time, end_time=execution.end_time, duration_ms=execution.duration_ms)
    return out


def execution_from_json(execution: Mapping[str, Any]) -> Execution:
    """Read a ``ToolExecution`` as :meth:`Succeeded.to_json` or :meth:`Failed.to_json` wrote it (a stored
    row, read leniently): one with an ``error`` is a failure."""
    call = ToolCall(
        id=str(execution.get("id") or ""),
        name=str(execution.get("tool_name") or ""),
        arguments=str(execution.get("arguments") or "{}"),
    )
    try:
        duration_ms = int(execution.get("duration_ms") or 0)
    except (TypeError, ValueError):
        duration_ms = 0
    times = (str(execution.get("start_time") or ""), str(execution.get("end_time") or ""), duration_ms)
    if "error" in execution:
        return Failed(call, str(execution["error"] or ""), *times)
    return Succeeded(call, str(execution.get("result") or ""), *times)


def specs_from_openai(tools: Any) -> list[ToolSpec]:
    """The function tools of a Chat Completions request's ``tools`` list, in order (others left out)."""
    if not isinstance(tools, list | tuple):
        return []
    read = (ToolSpec.from_openai(tool) for tool in tools)
    return [spec for spec in read if spec is not None]
