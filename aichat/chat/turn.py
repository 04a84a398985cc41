"""Chat turns: store the user's message, stream the model, run approved tools, loop, store every step.

A turn runs in the background and writes :class:`~aichat.chat.streams.Event` objects to its stream; the
HTTP layer either returns a stream handle at once or waits for the :class:`TurnRecord`. Tool calls go
through the approval policy; a pending approval is stored with its user and session, so it survives a
restart, and resolving it starts a new turn that continues where the model left off.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.chat.approvals import ApprovalPolicy
from aichat.chat.context import build_messages
from aichat.chat.streams import Event, Stream, StreamRegistry
from aichat.chat.titles import clean_title, fallback_title, is_automatic, title_prompt
from aichat.config import ChatSettings
from aichat.llm.provider import LLMError, Provider
from aichat.store.base import Approval, Attachment, Message, Session, Store, new_id

log = Logger(namespace="aichat.chat")

TITLE_TIMEOUT = 10.0
PROCESSING = "\n🤖 Processing results...\n\n"
UNDERSTANDING = "\n🤖 Understanding your decision...\n\n"
DENIED = "❌ Tool execution was denied by user."
ROUND_LIMIT = "Tool call was not executed: the tool round limit was reached."


class ToolInfo(Protocol):
    """What the chat layer reads of an MCP tool."""

    @property
    def name(self) -> str: ...
    @property
    def function_name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def input_schema(self) -> dict[str, Any]: ...
    @property
    def server(self) -> str: ...


class ToolOutcome(Protocol):
    """What a tool call returns."""

    @property
    def text(self) -> str: ...
    @property
    def is_error(self) -> bool: ...


class ToolHost(Protocol):
    """The MCP host as the chat layer uses it."""

    def tools(self) -> Sequence[ToolInfo]: ...

    async def call_tool(self, function_name: str, arguments: dict[str, Any]) -> ToolOutcome: ...


#: The ``error`` event of a turn cut short by the daemon's stop.
SHUTTING_DOWN = "The server is shutting down; the turn was stopped"


class ChatError(Exception):
    """A turn cannot start or an approval cannot be resolved; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class TurnRecord:
    """What a turn produced, for non-streaming responses."""

    session_id: str
    stream: Stream
    text: list[str] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    approval: dict[str, Any] | None = None
    error: str | None = None
    error_status: int = 502
    assistant_id: str = ""
    timestamp: str = ""
    turn: Deferred[None] | None = None
    pending: Message | None = None
    unsaved: Message | None = None
    pending_write: Deferred[None] | None = None
    history: list[Message] | None = None

    def response(self) -> dict[str, Any]:
        """The reference's ``ChatResponse``, with the real session id and a pending approval's id."""
        message: dict[str, Any] = {
            "id": self.assistant_id or new_id("collected"),
            "role": "assistant",
            "content": "".join(self.text),
            "timestamp": self.timestamp,
        }
        if self.executions:
            message["tool_executions"] = self.executions
        body: dict[str, Any] = {"message": message, "session_id": self.session_id}
        if self.approval is not None:
            body["approval_request"] = self.approval
        return body


def tool_spec(tool: ToolInfo) -> dict[str, Any]:
    """An MCP tool as an OpenAI function tool, under its model-facing name."""
    description = tool.description or tool.name
    return {
        "type": "function",
        "function": {
            "name": tool.function_name,
            "description": f"{description} ({tool.server})",
            "parameters": tool.input_schema or {"type": "object", "properties": {}},
        },
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ChatService:
    """Runs turns and resolves approvals; one turn at a time per session."""

    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        provider: Provider,
        tools: ToolHost | None,
        settings: ChatSettings,
        system_prompt: str,
        streams: StreamRegistry,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.provider = provider
        self.tools = tools
        self.settings = settings
        self.system_prompt = system_prompt
        self.streams = streams
        self.policy = ApprovalPolicy(settings.approval.policy, settings.approval.auto_approve)
        self._now = now or (lambda: datetime.fromtimestamp(clock.seconds(), UTC))
        self._running: dict[str, Deferred[None]] = {}
        self._background: set[Deferred[Any]] = set()
        self._stopping = False

    # -- sessions -----------------------------------------------------------------------------------

    def new_session(self, user_id: str) -> Session:
        """A new session for ``user_id``, returned at once.

        Its commit is queued ahead of anything later written to it (the store applies writes in call
        order), so a turn in it asks the model without waiting for the disk; if the commit fails, storing
        the turn's first message fails too and the turn ends with an error.
        """
        now = self._now()
        title = "Chat - " + now.strftime("%b %-d, %Y at %-I:%M %p")
        session_id = new_id()
        creating = Deferred.fromCoroutine(self.store.create_session(user_id, title, session_id))

        def failed(failure: Failure) -> None:
            log.failure("Creating session {session_id} failed", failure, session_id=session_id)

        creating.addErrback(failed)
        stamp = _iso(now.timestamp())
        return Session(session_id, user_id, title, stamp, stamp)

    async def resume(self, user_id: str, session_id: str) -> tuple[Session, list[Message]]:
        """The user's session ``session_id`` and its history, or a new empty one when ``session_id`` is
        empty; another user's session is 404."""
        if not session_id:
            return self.new_session(user_id), []
        session, history = await self.store.session_history(user_id, session_id)
        if session is None:
            raise ChatError("Session not found", 404)
        return session, history

    # -- starting turns -----------------------------------------------------------------------------

    def start_message(
        self,
        user_id: str,
        session: Session,
        text: str,
        attachments: Sequence[Attachment] = (),
        history: list[Message] | None = None,
    ) -> TurnRecord:
        """Begin a turn for a new user message; ``history``, if given, is the session's as just read."""
        message = Message(new_id("user"), session.id, "user", text, attachments=tuple(attachments))

        async def first(record: TurnRecord) -> None:
            # Stored once the model has been asked (see _complete); nothing the model says is stored, and
            # the turn does not finish, before the message is on disk.
            record.pending = message
            record.unsaved = message
            record.history = history

        return self._start(user_id, session.id, first)

    async def start_resolution(
        self, user_id: str, approval_id: str, approve: bool, tool_call_ids: Sequence[str] | None = None
    ) -> TurnRecord:
        """Resolve a pending approval (all calls, or only ``tool_call_ids``) and continue its turn."""
        approval = await self.store.get_approval(user_id, approval_id)
        if approval is None:
            raise ChatError(f"approval request {approval_id} not found", 404)
        if approval.status != "pending":
            raise ChatError(f"approval request {approval_id} was already {approval.status}", 409)
        if approval.expires_at < _iso(self.clock.seconds()):
            await self.store.resolve_approval(approval_id, "expired")
            raise ChatError(f"approval request {approval_id} has expired", 409)
        known = [call["id"] for call in approval.tool_calls]
        if tool_call_ids is not None:
            unknown = sorted(set(tool_call_ids) - set(known))
            if unknown:
                raise ChatError(f"tool_call_ids not in approval request {approval_id}: {', '.join(unknown)}", 400)
        if approval.session_id in self._running:
            raise ChatError("A turn is already running in this session", 409)
        # Hold the session while the decision is stored, so no other turn starts in between and the
        # approval is never consumed without its turn.
        reservation: Deferred[None] = Deferred()
        self._running[approval.session_id] = reservation
        try:
            resolved = await self.store.resolve_approval(approval_id, "approved" if approve else "denied")
        finally:
            if self._running.get(approval.session_id) is reservation:
                del self._running[approval.session_id]
        if not resolved:
            raise ChatError(f"approval request {approval_id} was already resolved", 409)
        chosen = set(known if tool_call_ids is None else tool_call_ids) if approve else set()
        run = [call for call in approval.tool_calls if call["id"] in chosen]
        refused = [call for call in approval.tool_calls if call["id"] not in chosen]

        async def first(record: TurnRecord) -> None:
            if refused:
                await self._store_refusals(approval.session_id, refused)
            if run:
                await self._run_tools(record, run)
            if not run:
                record.stream.emit(Event("message", approval.session_id, content=DENIED, synthetic=True))
                record.stream.emit(Event("message", approval.session_id, content=UNDERSTANDING, synthetic=True))
            else:
                record.stream.emit(Event("message", approval.session_id, content=PROCESSING, synthetic=True))

        return self._start(user_id, approval.session_id, first)

    def _start(self, user_id: str, session_id: str, first: Callable[[TurnRecord], Awaitable[None]]) -> TurnRecord:
        if session_id in self._running:
            raise ChatError("A turn is already running in this session", 409)
        stream = self.streams.create(f"stream_{user_id}_{new_id()}", user_id, session_id)
        record = TurnRecord(session_id, stream)
        turn = Deferred.fromCoroutine(self._run(record, user_id, first))
        self._running[session_id] = turn
        deadline = self.clock.callLater(self.settings.stream_max_seconds, turn.cancel)

        def finished(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            self._running.pop(session_id, None)
            return result

        turn.addBoth(finished)
        turn.addErrback(lambda failure: failure.trap(CancelledError))
        record.turn = turn
        return record

    async def wait(self, record: TurnRecord) -> TurnRecord:
        """Wait for the turn to finish (one waiter per turn); cancelling the wait cancels the turn."""
        if record.turn is not None:
            await record.turn
        return record

    # -- the turn -----------------------------------------------------------------------------------

    async def _run(self, record: TurnRecord, user_id: str, first: Callable[[TurnRecord], Awaitable[None]]) -> None:
        stream = record.stream
        try:
            await first(record)
            finished = await self._loop(record, user_id)
        except LLMError as e:
            record.error = f"Failed to process message: {e.message}"
            record.error_status = e.http_status
            stream.emit(Event("error", record.session_id, error=record.error))
        except CancelledError:
            record.error = SHUTTING_DOWN if self._stopping else "The turn was cancelled"
            if self._stopping:
                record.error_status = 503
            stream.emit(Event("error", record.session_id, error=record.error))
            raise
        except Exception as e:
            await self._settle(record)
            log.failure("Turn failed in session {session_id}", session_id=record.session_id)
            record.error = f"Failed to process message: internal error ({type(e).__name__})"
            record.error_status = 500
            stream.emit(Event("error", record.session_id, error=record.error))
        else:
            if finished is not None:
                # Only now, with the turn's stream done: a model server that serves one request at a time
                # (llama.cpp) would otherwise be asked for the title while the user waits for the turn.
                history, answer = finished
                self._maybe_title(user_id, record.session_id, history, answer)

    def _save_user_message(self, record: TurnRecord) -> None:
        """Start storing the turn's user message, if it is not stored or being stored yet."""
        if record.unsaved is not None:
            message, record.unsaved = record.unsaved, None
            record.pending_write = Deferred.fromCoroutine(self.store.add_message(message))

    async def _settle(self, record: TurnRecord) -> None:
        """Wait for the user's message to be committed (a failure is logged; the turn already failed)."""
        self._save_user_message(record)
        if record.pending_write is not None:
            write, record.pending_write = record.pending_write, None
            try:
                await write
            except Exception:
                log.failure("Storing the user message failed in session {session_id}", session_id=record.session_id)

    async def _committed(self, record: TurnRecord) -> None:
        """Raise if the user's message could not be stored."""
        self._save_user_message(record)
        if record.pending_write is not None:
            write, record.pending_write = record.pending_write, None
            await write

    async def _loop(self, record: TurnRecord, user_id: str) -> tuple[list[Message], str] | None:
        """Ask the model and run its tools until it answers, asks for approval or reaches the round cap.

        Returns the history of the last round and the model's last text, from which a title is made, or
        ``None`` when the turn waits for an approval."""
        session_id = record.session_id
        while True:
            if record.history is not None:
                history, record.history = record.history, None
            else:
                history = await self.store.history(session_id)
            if record.pending is not None:
                if all(m.id != record.pending.id for m in history):
                    history.append(record.pending)
                record.pending = None
            rounds = _rounds_since_last_user(history)
            available = list(self.tools.tools()) if self.tools is not None else []
            specs = [tool_spec(t) for t in available] or None
            messages = build_messages(self.system_prompt, history, self.settings.history_budget_chars, self._now())
            assistant = await self._complete(record, messages, specs)
            if not assistant.tool_calls:
                record.stream.emit(Event("done", session_id))
                return history, assistant.content
            calls = assistant.tool_calls
            if rounds >= self.settings.max_tool_rounds:
                await self._store_refusals(session_id, calls, ROUND_LIMIT)
                notice = (
                    f"\n\nStopped after {self.settings.max_tool_rounds} tool rounds (chat.max_tool_rounds): "
                    f"the last {len(calls)} tool call(s) were not executed."
                )
                await self.store.add_message(Message(new_id("assistant"), session_id, "assistant", notice.strip()))
                record.text.append(notice)
                record.stream.emit(Event("message", session_id, content=notice))
                record.stream.emit(Event("done", session_id))
                return history, assistant.content
            by_name = {t.function_name: t for t in available}
            ask = [c for c in calls if self._needs_approval(c, by_name)]
            now_run = [c for c in calls if c not in ask]
            if now_run:
                await self._run_tools(record, now_run)
            if ask:
                await self._request_approval(record, user_id, ask)
                return None
            record.stream.emit(Event("message", session_id, content=PROCESSING, synthetic=True))

    def _needs_approval(self, call: dict[str, Any], by_name: dict[str, ToolInfo]) -> bool:
        name = call["function"]["name"]
        tool = by_name.get(name)
        return self.policy.needs_approval(name, tool.server if tool else None, tool.name if tool else None)

    async def _complete(
        self, record: TurnRecord, messages: list[dict[str, Any]], specs: list[dict[str, Any]] | None
    ) -> Message:
        session_id = record.session_id
        said: list[str] = []

        def on_text(delta: str) -> None:
            said.append(delta)
            record.text.append(delta)
            record.stream.emit(Event("message", session_id, content=delta))

        # The request goes out first: the message's commit (a thread hop and an fsync) overlaps the
        # model's time to first token instead of delaying it.
        asked = Deferred.fromCoroutine(self.provider.complete(messages, specs, on_text=on_text))
        self._save_user_message(record)
        try:
            completion = await asked
            if not completion.text.strip() and not completion.tool_calls:
                # Stored, it would be sent back as a message servers reject; it is a failure of the model.
                reason = (
                    f"finish reason: {completion.finish_reason}"
                    if completion.finish_reason
                    else "no finish reason: the server cut the stream short"
                )
                raise LLMError(f"the model returned an empty answer ({reason})", code="empty")
        except (LLMError, CancelledError):
            await self._committed(record)
            if said:
                partial = Message(new_id("assistant"), session_id, "assistant", "".join(said))
                await self.store.add_message(partial)
            raise
        await self._committed(record)
        calls = [call.to_openai() for call in completion.tool_calls]
        assistant = Message(new_id("assistant"), session_id, "assistant", completion.text, tool_calls=calls or None)
        await self.store.add_message(assistant)
        record.assistant_id = assistant.id
        record.timestamp = assistant.created_at
        return assistant

    async def _request_approval(self, record: TurnRecord, user_id: str, calls: list[dict[str, Any]]) -> None:
        now = self.clock.seconds()
        approval = Approval(
            id=new_id("approval"),
            session_id=record.session_id,
            user_id=user_id,
            tool_calls=calls,
            status="pending",
            created_at=_iso(now),
            expires_at=_iso(now + self.settings.approval.expire_seconds),
        )
        await self.store.create_approval(approval)
        record.approval = {"request_id": approval.id, "tool_calls": calls, "processed": False,
                           "expires_at": approval.expires_at}
        record.stream.emit(
            Event(
                "tool_approval_request",
                record.session_id,
                content=f"🔧 The assistant wants to execute {len(calls)} tool(s). Do you approve?",
                tool_calls=calls,
                request_id=approval.id,
                synthetic=True,
            )
        )
        record.stream.emit(Event("done", record.session_id))

    async def _store_refusals(
        self, session_id: str, calls: list[dict[str, Any]], text: str = "Tool execution was denied by the user."
    ) -> None:
        await self._store_all(
            Message(new_id("tool"), session_id, "tool", text, tool_call_id=call["id"]) for call in calls
        )

    async def _store_all(self, messages: Iterable[Message]) -> None:
        """Store messages in order, committed together (the store groups concurrent writes)."""
        writes = [Deferred.fromCoroutine(self.store.add_message(m)) for m in messages]
        await gatherResults(writes, consumeErrors=True)

    async def _run_tools(self, record: TurnRecord, calls: list[dict[str, Any]]) -> None:
        semaphore = DeferredSemaphore(self.settings.tool_concurrency)
        runs = [semaphore.run(self._run_tool, call) for call in calls]
        executions: list[dict[str, Any]] = await gatherResults(runs, consumeErrors=True)
        await self._store_all(
            Message(
                new_id("tool"),
                record.session_id,
                "tool",
                execution["result"] if "error" not in execution else execution["error"],
                tool_call_id=call["id"],
                tool_executions=[execution],
            )
            for call, execution in zip(calls, executions, strict=True)
        )
        record.executions.extend(executions)
        failed = sum(1 for e in executions if "error" in e)
        outcome = "successful" if not failed else "failed" if failed == len(executions) else "partially failed"
        record.stream.emit(
            Event(
                "tool_execution",
                record.session_id,
                content=f"Executed {len(executions)} tool(s) ({outcome})",
                tool_executions=executions,
                synthetic=True,
            )
        )

    async def _run_tool(self, call: dict[str, Any]) -> dict[str, Any]:
        name = call["function"]["name"]
        raw = call["function"].get("arguments") or "{}"
        started = self.clock.seconds()
        execution: dict[str, Any] = {"id": call["id"], "tool_name": name, "arguments": raw, "result": ""}
        try:
            arguments = json.loads(raw)
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as e:
            execution["error"] = f"Error executing tool: failed to parse tool arguments: {e}"
        else:
            if self.tools is None:
                execution["error"] = f"Error executing tool: tool not found: {name}"
            else:
                try:
                    result = await self.tools.call_tool(name, arguments)
                except CancelledError:
                    raise
                except Exception as e:
                    execution["error"] = f"Error executing tool: {e}"
                else:
                    if result.is_error:
                        execution["error"] = f"Tool returned an error: {result.text}"
                    else:
                        execution["result"] = result.text
        ended = self.clock.seconds()
        execution["start_time"] = _iso(started)
        execution["end_time"] = _iso(ended)
        execution["duration_ms"] = round((ended - started) * 1000)
        return execution

    # -- titles -------------------------------------------------------------------------------------

    def _maybe_title(self, user_id: str, session_id: str, history: list[Message], answer: str) -> None:
        """Title the session after its first turn (however that turn ended), in the background."""
        users = [m for m in history if m.role == "user"]
        if not self.settings.title_generation or len(users) != 1:
            return
        work = Deferred.fromCoroutine(self._title(user_id, session_id, users[0].content, answer))
        self._background.add(work)
        timer: IDelayedCall = self.clock.callLater(TITLE_TIMEOUT, work.cancel)

        def finished(result: Any) -> None:
            self._background.discard(work)
            if timer.active():
                timer.cancel()

        work.addBoth(finished)

    async def _title(self, user_id: str, session_id: str, user_text: str, assistant_text: str) -> None:
        session = await self.store.get_session(user_id, session_id)
        if session is None or not is_automatic(session.title):
            return
        try:
            if self.provider.name == "mock":
                # The offline mock would only echo the title prompt back; the user's first words say more.
                title = fallback_title(user_text)
            else:
                completion = await self.provider.complete(
                    [{"role": "user", "content": title_prompt(user_text, assistant_text)}], None
                )
                title = clean_title(completion.text, user_text)
        except CancelledError:
            title = fallback_title(user_text)
        except LLMError as e:
            log.warn("Title generation failed: {error}", error=e.message)
            title = fallback_title(user_text)
        await self.store.rename_session(user_id, session_id, title)

    # -- shutdown -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Cancel running turns and title work and wait for them to settle.

        Each turn's stream ends with an ``error`` event saying the server is shutting down, and what the
        model had said so far is stored before this returns (so the store may be closed after it).
        """
        self._stopping = True
        settled: list[Deferred[None]] = []
        for turn in list(self._running.values()) + list(self._background):
            done: Deferred[None] = Deferred()

            def settle(result: object, done: Deferred[None] = done) -> object:
                done.callback(None)
                return result

            turn.addBoth(settle)
            settled.append(done)
            turn.cancel()
        await gatherResults(settled)
        self.streams.close()


def _rounds_since_last_user(history: Sequence[Message]) -> int:
    rounds = 0
    for message in reversed(history):
        if message.role == "user":
            break
        if message.role == "assistant" and message.tool_calls:
            rounds += 1
    return rounds
