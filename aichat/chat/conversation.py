"""Where a turn's context comes from and where its steps go: a stored session, or memory only.

A stored session is the reference API's (and ``/v1/responses``'): history read from the store, every step
written to it. A memory conversation is ``/v1/chat/completions``' (and ``store: false``): the client's
messages are the context, and the turn's own steps (tool calls and results) live only as long as the turn;
given an :class:`ExecutionLog` (chat completions), the tool executions among them are stored there (as
:class:`~aichat.store.base.ToolExecution` rows made from the execution records).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults

from aichat.chat.context import build_messages
from aichat.llm.tools import Execution, Failed, execution_from_json
from aichat.store.base import History, Message, Store, ToolExecution, new_id

#: No trimming: in memory, the context is what the client sent.
UNLIMITED = 2**62


class Conversation(Protocol):
    """The context of a turn and the record of its steps."""

    @property
    def session_id(self) -> str: ...

    @property
    def stored(self) -> bool: ...

    async def history(self, budget_chars: int) -> History:
        """The stored steps, oldest first: a stored session's tail for ``budget_chars`` (for a memory
        conversation, only this turn's steps)."""
        ...

    def messages(
        self, history: Sequence[Message], system_prompt: str, budget: int, now: datetime
    ) -> list[dict[str, Any]]:
        """What the model is sent for ``history``."""
        ...

    async def add(self, *messages: Message) -> None:
        """Record ``messages`` in order (committed together)."""
        ...


class StoredConversation:
    """A session in the store; the first history may be given as the caller just read it, and
    ``instructions`` replace the daemon's system prompt for this turn."""

    stored = True

    def __init__(
        self,
        store: Store,
        session_id: str,
        first_history: History | None = None,
        instructions: str | None = None,
    ) -> None:
        self._store = store
        self._session_id = session_id
        self._first = first_history
        self._instructions = instructions

    @property
    def session_id(self) -> str:
        return self._session_id

    async def history(self, budget_chars: int) -> History:
        if self._first is not None:
            history, self._first = self._first, None
            return history
        return await self._store.recent_history(self._session_id, budget_chars)

    def messages(
        self, history: Sequence[Message], system_prompt: str, budget: int, now: datetime
    ) -> list[dict[str, Any]]:
        prompt = self._instructions if self._instructions is not None else system_prompt
        return build_messages(prompt, history, budget, now)

    async def add(self, *messages: Message) -> None:
        if len(messages) == 1:
            await self._store.add_message(messages[0])
            return
        await _store_all(self._store, messages)


#: Stores the tool executions of a conversation kept in memory.
ExecutionLog = Callable[[list[Execution]], Awaitable[None]]


def execution_row(user_id: str, request_id: str, execution: Execution) -> ToolExecution:
    """The stored record of one execution of the request ``request_id`` of ``user_id``."""
    return ToolExecution(
        id=new_id("exec"),
        user_id=user_id,
        request_id=request_id,
        tool_call_id=execution.call.id,
        tool_name=execution.call.name,
        arguments=execution.call.arguments,
        result="" if isinstance(execution, Failed) else execution.result,
        error=execution.error if isinstance(execution, Failed) else None,
        start_time=execution.start_time,
        end_time=execution.end_time,
        duration_ms=execution.duration_ms,
    )


def store_executions(store: Store, user_id: str, request_id: str) -> ExecutionLog:
    """An :data:`ExecutionLog` writing to the store's executions of requests without a session."""

    async def record(executions: list[Execution]) -> None:
        await store.add_tool_executions([execution_row(user_id, request_id, e) for e in executions])

    return record


class MemoryConversation:
    """The client's messages (Chat Completions shape) followed by this turn's steps, kept in memory; the
    tool executions among the steps go to ``executions`` when given.

    The daemon's system prompt is sent only when the client sent no ``system``/``developer`` message.
    """

    stored = False

    def __init__(self, client_messages: Sequence[dict[str, Any]], executions: ExecutionLog | None = None) -> None:
        self._client = list(client_messages)
        self._steps: list[Message] = []
        self._executions = executions

    @property
    def session_id(self) -> str:
        return ""

    async def history(self, budget_chars: int) -> History:
        return History(list(self._steps))

    def messages(
        self, history: Sequence[Message], system_prompt: str, budget: int, now: datetime
    ) -> list[dict[str, Any]]:
        has_system = any(m.get("role") in ("system", "developer") for m in self._client)
        prompt = "" if has_system else system_prompt
        head = build_messages(prompt, [], UNLIMITED, now) if prompt else []
        return head + self._client + build_messages("", history, UNLIMITED, now)

    async def add(self, *messages: Message) -> None:
        self._steps.extend(messages)
        ran = [execution_from_json(row) for m in messages for row in m.tool_executions or ()]
        if ran and self._executions is not None:
            await self._executions(ran)


async def _store_all(store: Store, messages: Iterable[Message]) -> None:
    """Store messages in order, committed together (the store groups concurrent writes)."""
    writes = [Deferred.fromCoroutine(store.add_message(m)) for m in messages]
    await gatherResults(writes, consumeErrors=True)
