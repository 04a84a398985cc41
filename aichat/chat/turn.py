"""Chat turns: one :class:`Turn` object per live turn, driven by every face through :class:`ChatService`.

A turn asks the model, runs the calls its tool scope lets run at once, asks a person for the others (a
durable approval with its user, session and expiry), and loops until the model answers, the round cap
stops it, or calls are handed to the client. It owns its state (the user's message and its write, its
lifecycle, its :class:`TurnResult`) and reports what happens as :mod:`aichat.chat.events` to its face's
listener; the reference API's listener writes a :class:`~aichat.chat.streams.Stream`. Where its context
comes from and where its steps go is its :class:`~aichat.chat.conversation.Conversation`: a stored
session, or (``/v1/chat/completions``) memory only.

The loop works on the records of :mod:`aichat.llm.tools`: the tools offered are
:class:`~aichat.llm.tools.ToolSpec`, the model's calls :class:`~aichat.llm.tools.ToolCall`, each run ends
as :class:`~aichat.llm.tools.Succeeded` or :class:`~aichat.llm.tools.Failed`. Rows are written only for
the store (an assistant message's ``tool_calls``, a tool message's ``tool_executions``, an approval's
calls) and for the reference's JSON (:meth:`TurnResult.response`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aichat.chat import events
from aichat.chat.approvals import ApprovalPolicy, approval_calls
from aichat.chat.coalesce import DeltaCoalescer
from aichat.chat.conversation import Conversation, MemoryConversation, StoredConversation, store_executions
from aichat.chat.streams import ReferencePresenter, Stream, StreamRegistry
from aichat.chat.titles import clean_title, fallback_title, is_automatic, title_prompt
from aichat.config import ChatSettings
from aichat.llm.provider import LLMError, Provider, Usage
from aichat.llm.tools import Execution, Failed, Succeeded, ToolCall, ToolSpec
from aichat.metrics import Metrics, observe_usage
from aichat.store.base import (
    Approval,
    Attachment,
    History,
    Message,
    Session,
    Store,
    StoreError,
    StoreUnavailable,
    new_id,
)

if TYPE_CHECKING:
    from aichat.cluster.coordinator import Coordinator

log = Logger(namespace="aichat.chat")

TITLE_TIMEOUT = 10.0
#: Seconds :meth:`ChatService.stop` waits for the turns it cancelled before giving up on them.
STOP_SECONDS = 30.0
ROUND_LIMIT = "Tool call was not executed: the tool round limit was reached."
BUSY = "A turn is already running in this session"


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


class ToolScope:
    """Which MCP tools a turn offers the model, which of their calls wait for a person, and the client's
    own function tools (whose calls end the turn, handed to the client).

    The operator's policy is the floor: ``ask`` can only add approvals to it, never remove one.
    """

    def __init__(
        self,
        policy: ApprovalPolicy,
        offers: Callable[[ToolInfo], bool] = lambda tool: True,
        ask: Callable[[ToolInfo], bool] = lambda tool: False,
        client_tools: Sequence[ToolSpec] = (),
    ) -> None:
        self.policy = policy
        self._offers = offers
        self._ask = ask
        self.client_tools = list(client_tools)
        self.client_names = frozenset(tool.name for tool in self.client_tools)

    def offers(self, tool: ToolInfo) -> bool:
        return self._offers(tool)

    def needs_approval(self, function_name: str, tool: ToolInfo | None) -> bool:
        server, name = (tool.server, tool.name) if tool is not None else (None, None)
        if self.policy.needs_approval(function_name, server, name):
            return True
        return tool is not None and self._ask(tool)


class TurnState(Enum):
    """A turn's lifecycle: it runs, then ends in exactly one of the other states."""

    RUNNING = "running"
    ANSWERED = "answered"
    AWAITING_APPROVAL = "awaiting_approval"
    CLIENT_TOOLS = "client_tools"
    FAILED = "failed"


#: The metrics' outcome of a turn that ended in each state.
_OUTCOMES = {
    TurnState.RUNNING: "error",
    TurnState.ANSWERED: "done",
    TurnState.AWAITING_APPROVAL: "approval_pending",
    TurnState.CLIENT_TOOLS: "client_tools",
    TurnState.FAILED: "error",
}


@dataclass
class TurnResult:
    """What a turn produced, for HTTP: the text, the tool executions, a pending approval, the calls handed
    to the client, usage, or the error and the status it maps to."""

    session_id: str
    text: list[str] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)
    approval: Approval | None = None
    client_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 502
    #: The upstream's failure as it came (``error`` is the reference's wording of it).
    upstream_error: LLMError | None = None
    assistant_id: str = ""
    timestamp: str = ""

    def add_usage(self, usage: Usage | None) -> None:
        if usage is None:
            return
        if self.usage is None:
            self.usage = usage
        else:
            self.usage = Usage(
                self.usage.prompt_tokens + usage.prompt_tokens,
                self.usage.completion_tokens + usage.completion_tokens,
                self.usage.total_tokens + usage.total_tokens,
            )

    def response(self) -> dict[str, Any]:
        """The reference's ``ChatResponse``, with the real session id and a pending approval's id."""
        message: dict[str, Any] = {
            "id": self.assistant_id or new_id("collected"),
            "role": "assistant",
            "content": "".join(self.text),
            "timestamp": self.timestamp,
        }
        if self.executions:
            message["tool_executions"] = [execution.to_json() for execution in self.executions]
        body: dict[str, Any] = {"message": message, "session_id": self.session_id}
        if self.approval is not None:
            body["approval_request"] = {
                "request_id": self.approval.id,
                "tool_calls": self.approval.tool_calls,
                "processed": False,
                "expires_at": self.approval.expires_at,
            }
        return body


def tool_spec(tool: ToolInfo) -> ToolSpec:
    """An MCP tool as the model is offered it, under its model-facing name."""
    description = tool.description or tool.name
    return ToolSpec(
        name=tool.function_name,
        description=f"{description} ({tool.server})",
        parameters=tool.input_schema or {"type": "object", "properties": {}},
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


First = Callable[["Turn"], Awaitable[None]]
#: What must hold before a turn runs (an approval decided by this turn); raises :class:`ChatError` if not.
Gate = Callable[["Turn"], Awaitable[None]]


class Turn:
    """One live turn: its conversation, tool scope and listener, its user's message and that message's
    write, its lifecycle state and its result. Created and started by :class:`ChatService`."""

    def __init__(
        self,
        chat: ChatService,
        user_id: str,
        conversation: Conversation,
        scope: ToolScope,
        listener: events.Listener,
        stream: Stream | None = None,
        message: Message | None = None,
    ) -> None:
        self.id = stream.id if stream is not None else new_id("turn")
        self.user_id = user_id
        self.conversation = conversation
        self.scope = scope
        self.result = TurnResult(conversation.session_id)
        self.state = TurnState.RUNNING
        self._chat = chat
        self._listener = listener
        self._stream = stream
        #: The user's message: sent to the model in the first round, stored while the model is asked.
        self.message = message
        self._write: Deferred[None] | None = None
        self._written = message is None
        self.done: Deferred[None] | None = None
        #: Fires once the turn may run (``None``) or with the :class:`ChatError` that stopped it first.
        self.ready: Deferred[ChatError | None] = Deferred()
        self._claimed = False
        self._began = 0.0
        self._first_token = False

    @property
    def session_id(self) -> str:
        return self.conversation.session_id

    @property
    def stream(self) -> Stream:
        """The reference event stream (turns started without a listener of their own)."""
        if self._stream is None:
            raise RuntimeError("this turn reports to its own listener, not to a reference stream")
        return self._stream

    def emit(self, event: events.TurnEvent) -> None:
        self._listener(event)

    # -- the user's message -------------------------------------------------------------------------

    def _save_message(self) -> None:
        """Start storing the user's message, if it is not stored or being stored yet."""
        if not self._written and self.message is not None:
            self._written = True
            self._write = Deferred.fromCoroutine(self.conversation.add(self.message))

    async def _committed(self) -> None:
        """Raise if the user's message could not be stored."""
        self._save_message()
        if self._write is not None:
            write, self._write = self._write, None
            try:
                await write
            except StoreError:
                # In a session whose creation failed the message fails as "no such session": report why.
                cause = self._chat.creation_errors.pop(self.session_id, None)
                if cause is not None:
                    raise cause from None
                raise

    async def _settle(self) -> None:
        """Wait for the user's message to be committed (a failure is logged; the turn already failed)."""
        try:
            await self._committed()
        except StoreUnavailable as e:
            log.error("Storing the user message failed in session {session_id}: {error}",
                      session_id=self.session_id, error=str(e))
        except Exception:
            log.failure("Storing the user message failed in session {session_id}", session_id=self.session_id)

    # -- the run ------------------------------------------------------------------------------------

    async def _begin(self, gate: Gate | None) -> ChatError | None:
        """Claim the session on every instance (with a coordinator) and pass ``gate``; why not, if not."""
        coordinator = self._chat.coordinator
        if coordinator is not None and self.conversation.stored:
            if not await coordinator.claim(self.id, self.session_id, self.user_id, self._cancel):
                return ChatError(BUSY, 409)
            self._claimed = True
        if gate is not None:
            try:
                await gate(self)
            except ChatError as e:
                return e
        return None

    def _cancel(self) -> None:
        if self.done is not None:
            self.done.cancel()

    async def run(self, first: First, gate: Gate | None = None) -> None:
        """Run the turn (see :meth:`_run`), counted in the metrics: started, live, finished by outcome."""
        chat = self._chat
        metrics = chat.metrics
        self._began = chat.clock.seconds()
        metrics.turns_started.inc()
        metrics.turns_live.inc()
        outcome = "cancelled"
        try:
            await self._run(first, gate)
            outcome = _OUTCOMES[self.state]
        finally:
            metrics.turns_live.dec()
            metrics.turns_finished.labels(outcome).inc()
            metrics.turn_duration.labels(outcome).observe(chat.clock.seconds() - self._began)

    async def _run(self, first: First, gate: Gate | None) -> None:
        """Pass ``gate``, run ``first`` (running approved calls, say), then the loop; report how it ended."""
        result = self.result
        chat = self._chat
        try:
            refused = await self._begin(gate)
            self.ready.callback(refused)
            if refused is not None:
                result.error = refused.message
                result.error_status = refused.status
                self._fail()
                return
            await first(self)
            finished = await self._loop()
        except LLMError as e:
            result.error = f"Failed to process message: {e.message}"
            result.error_status = e.http_status
            result.upstream_error = e
            self._fail()
        except CancelledError:
            result.error = SHUTTING_DOWN if chat.stopping else "The turn was cancelled"
            if chat.stopping:
                result.error_status = 503
            self._fail()
            raise
        except StoreUnavailable as e:
            await self._settle()
            log.error("Turn failed in session {session_id}: {error}", session_id=self.session_id, error=str(e))
            result.error = f"Failed to process message: {e.public}"
            result.error_status = e.status
            self._fail()
        except Exception as e:
            await self._settle()
            log.failure("Turn failed in session {session_id}", session_id=self.session_id)
            result.error = f"Failed to process message: internal error ({type(e).__name__})"
            result.error_status = 500
            self._fail()
        else:
            self.emit(events.Finished(result))
            if finished is not None and self.conversation.stored:
                # Only now, with the turn's stream done: a model server that serves one request at a time
                # (llama.cpp) would otherwise be asked for the title while the user waits for the turn.
                history, answer = finished
                chat.maybe_title(self.user_id, self.session_id, history, answer)
        finally:
            if not self.ready.called:
                self.ready.callback(None)
            if self._claimed and chat.coordinator is not None:
                # Done only once every instance sees the session free again.
                if self._stream is None:
                    chat.coordinator.release(self.id)
                await chat.coordinator.settled(self.id)

    def _fail(self) -> None:
        self.state = TurnState.FAILED
        self.emit(events.Failed(self.result))

    async def _loop(self) -> tuple[History, str] | None:
        """Ask the model and run its tools until it answers, asks for approval, hands calls to the client or
        reaches the round cap.

        Returns the history (tail) of the last round and the model's last text, from which a title is made, or
        ``None`` when the turn waits for an approval or the client."""
        chat = self._chat
        settings = chat.settings
        conversation = self.conversation
        first_round = True
        while True:
            tail = await conversation.history(settings.history_budget_chars)
            history = tail.messages
            if first_round and self.message is not None and all(m.id != self.message.id for m in history):
                history.append(self.message)
            first_round = False
            rounds = _rounds_since_last_user(history)
            every = list(chat.tools.tools()) if chat.tools is not None else []
            available = [t for t in every if self.scope.offers(t)]
            specs = [tool_spec(t) for t in available] + self.scope.client_tools or None
            messages = conversation.messages(history, chat.system_prompt, settings.history_budget_chars, chat.now())
            assistant, calls = await self._complete(messages, specs)
            if not calls:
                self.state = TurnState.ANSWERED
                return tail, assistant.content
            if rounds >= settings.max_tool_rounds:
                await self.store_refusals(calls, ROUND_LIMIT)
                notice = (
                    f"\n\nStopped after {settings.max_tool_rounds} tool rounds (chat.max_tool_rounds): "
                    f"the last {len(calls)} tool call(s) were not executed."
                )
                await conversation.add(Message(new_id("assistant"), self.session_id, "assistant", notice.strip()))
                self.result.text.append(notice)
                self.emit(events.RoundLimit(notice))
                self.state = TurnState.ANSWERED
                return tail, assistant.content
            client = [c for c in calls if c.name in self.scope.client_names]
            if client:
                # The client runs these; server-side calls of the same round are left to a later round.
                self.result.client_calls = client
                self.result.finish_reason = "tool_calls"
                self.state = TurnState.CLIENT_TOOLS
                return None
            by_name = {t.function_name: t for t in every}
            ask = [c for c in calls if self._needs_approval(c, by_name)]
            now_run = [c for c in calls if c not in ask]
            if now_run:
                offered = {t.function_name for t in available}
                await self.run_tools(now_run, refuse={n for n in by_name if n not in offered})
            if ask:
                if not conversation.stored:
                    raise RuntimeError("a turn kept in memory cannot wait for an approval")
                await self._request_approval(ask)
                return None
            self.emit(events.Continuing())

    def _needs_approval(self, call: ToolCall, by_name: dict[str, ToolInfo]) -> bool:
        return self.scope.needs_approval(call.name, by_name.get(call.name))

    async def _complete(
        self, messages: list[dict[str, Any]], specs: list[ToolSpec] | None
    ) -> tuple[Message, list[ToolCall]]:
        """Ask the model once; store and return its answer (the stored message and the calls it asked for)."""
        chat = self._chat
        provider = chat.provider
        session_id = self.session_id
        said: list[str] = []

        def on_text(delta: str) -> None:
            if not self._first_token:
                self._first_token = True
                chat.metrics.time_to_first_token.labels(provider.name, provider.model).observe(
                    chat.clock.seconds() - self._began
                )
            said.append(delta)
            self.result.text.append(delta)
            self.emit(events.TextDelta(delta))

        # The request goes out first: the message's commit (a thread hop and an fsync) overlaps the
        # model's time to first token instead of delaying it.
        asked = Deferred.fromCoroutine(chat.provider.complete(messages, specs, on_text=on_text))
        self._save_message()
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
            await self._committed()
            if said:
                partial = Message(new_id("assistant"), session_id, "assistant", "".join(said))
                await self.conversation.add(partial)
            raise
        await self._committed()
        observe_usage(chat.metrics, provider.name, provider.model, completion.usage)
        self.result.add_usage(completion.usage)
        self.result.finish_reason = completion.finish_reason
        calls = list(completion.tool_calls)
        rows = [call.to_openai() for call in calls]
        assistant = Message(new_id("assistant"), session_id, "assistant", completion.text, tool_calls=rows or None)
        await self.conversation.add(assistant)
        self.result.assistant_id = assistant.id
        self.result.timestamp = assistant.created_at
        self.emit(events.RoundAnswered(completion.text, calls))
        return assistant, calls

    async def _request_approval(self, calls: list[ToolCall]) -> None:
        chat = self._chat
        now = chat.clock.seconds()
        approval = Approval(
            id=new_id("approval"),
            session_id=self.session_id,
            user_id=self.user_id,
            tool_calls=[call.to_openai() for call in calls],
            status="pending",
            created_at=_iso(now),
            expires_at=_iso(now + chat.settings.approval.expire_seconds),
        )
        await chat.store.create_approval(approval)
        self.result.approval = approval
        self.state = TurnState.AWAITING_APPROVAL
        self.emit(events.ApprovalRequested(approval))

    async def store_refusals(
        self, calls: Sequence[ToolCall], text: str = "Tool execution was denied by the user."
    ) -> None:
        await self.conversation.add(
            *(Message(new_id("tool"), self.session_id, "tool", text, tool_call_id=call.id) for call in calls)
        )

    async def run_tools(self, calls: Sequence[ToolCall], refuse: set[str] | None = None) -> None:
        """Run ``calls`` (at most ``chat.tool_concurrency`` at once) and store their results; a call to a
        tool in ``refuse`` (known, but not offered to this turn) is answered with an error, never run."""
        semaphore = DeferredSemaphore(self._chat.settings.tool_concurrency)
        for call in calls:
            self.emit(events.ToolStarted(call))
        runs = [semaphore.run(self._run_tool, call, refuse or set()) for call in calls]
        executions: list[Execution] = await gatherResults(runs, consumeErrors=True)
        await self.conversation.add(
            *(
                Message(
                    new_id("tool"),
                    self.session_id,
                    "tool",
                    execution.content,
                    tool_call_id=execution.call.id,
                    tool_executions=[execution.to_json()],
                )
                for execution in executions
            )
        )
        self.result.executions.extend(executions)
        if not self.conversation.stored:
            # A turn kept in memory has no session whose messages show what ran.
            for execution in executions:
                log.info(
                    "Tool {tool_name} ran for user {user_id} ({outcome}, {duration_ms} ms)",
                    tool_name=execution.call.name,
                    user_id=self.user_id,
                    outcome="error" if isinstance(execution, Failed) else "ok",
                    duration_ms=execution.duration_ms,
                )
        self.emit(events.ToolsFinished(list(calls), executions))

    async def _run_tool(self, call: ToolCall, refuse: set[str]) -> Execution:
        """Run one call, unless its arguments are not a JSON object or its tool is unknown or not offered;
        every way it can end is an :data:`~aichat.llm.tools.Execution`."""
        chat = self._chat
        name = call.name
        if not call.arguments:
            call = replace(call, arguments="{}")
        started = chat.clock.seconds()
        error: str | None = None
        output = ""
        try:
            arguments = json.loads(call.arguments)
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as e:
            error = f"Error executing tool: failed to parse tool arguments: {e}"
        else:
            if chat.tools is None:
                error = f"Error executing tool: tool not found: {name}"
            elif name in refuse:
                error = f"Error executing tool: tool not offered to this request: {name}"
            else:
                try:
                    result = await chat.tools.call_tool(name, arguments)
                except CancelledError:
                    raise
                except Exception as e:
                    error = f"Error executing tool: {e}"
                else:
                    if result.is_error:
                        error = f"Tool returned an error: {result.text}"
                    else:
                        output = result.text
        ended = chat.clock.seconds()
        times = (_iso(started), _iso(ended), round((ended - started) * 1000))
        if error is not None:
            return Failed(call, error, *times)
        return Succeeded(call, output, *times)


class ChatService(Service):
    """Starts turns (one at a time per session) and resolves approvals; owns the live turns.

    It is the daemon's ``chat`` service: stopping it cancels the live turns and waits for them.
    """

    name = "chat"

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
        coordinator: Coordinator | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.clock = clock
        #: With many instances: claims, leases and the shared event log (``None`` on SQLite).
        self.coordinator = coordinator
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self.provider = provider
        self.tools = tools
        self.settings = settings
        self.system_prompt = system_prompt
        self.streams = streams
        self.policy = ApprovalPolicy(settings.approval.policy, settings.approval.auto_approve)
        self._now = now or (lambda: datetime.fromtimestamp(clock.seconds(), UTC))
        #: Turns in stored sessions, by session id (one per session), and turns kept in memory.
        self._running: dict[str, Deferred[None]] = {}
        self._stateless: set[Deferred[None]] = set()
        self._background: set[Deferred[Any]] = set()
        self.stopping = False
        #: Why a session's creation failed, for the turn whose first message then fails (popped by it).
        self.creation_errors: dict[str, StoreError] = {}

    def now(self) -> datetime:
        return self._now()

    def reference_scope(self) -> ToolScope:
        """Every MCP tool, under the operator's approval policy: the reference API's scope."""
        return ToolScope(self.policy)

    def tool(self, function_name: str) -> ToolInfo | None:
        """The MCP tool the model knows as ``function_name``, if the host offers it now."""
        if self.tools is None:
            return None
        return next((t for t in self.tools.tools() if t.function_name == function_name), None)

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
            if isinstance(failure.value, StoreError):
                self.creation_errors[session_id] = failure.value
            if failure.check(StoreUnavailable):
                log.error("Creating session {session_id} failed: {error}", session_id=session_id,
                          error=str(failure.value))
                return
            log.failure("Creating session {session_id} failed", failure, session_id=session_id)

        creating.addErrback(failed)
        stamp = _iso(now.timestamp())
        return Session(session_id, user_id, title, stamp, stamp)

    async def resume(self, user_id: str, session_id: str) -> tuple[Session, History]:
        """The user's session ``session_id`` and its history's budgeted tail, or a new empty one when
        ``session_id`` is empty; another user's session is 404."""
        if not session_id:
            return self.new_session(user_id), History()
        session, history = await self.store.session_history(user_id, session_id, self.settings.history_budget_chars)
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
        history: History | None = None,
        *,
        scope: ToolScope | None = None,
        listener: events.Listener | None = None,
        instructions: str | None = None,
    ) -> Turn:
        """Begin a turn for a new user message; ``history``, if given, is the session's tail as just read.

        Without a ``listener`` the turn reports to a new reference stream (``turn.stream``); ``instructions``
        replace the system prompt for this turn."""
        message = Message(new_id("user"), session.id, "user", text, attachments=tuple(attachments))
        conversation = StoredConversation(self.store, session.id, history, instructions)
        return self._start(user_id, conversation, scope, listener, message, _nothing)

    def start_stateless(
        self,
        user_id: str,
        messages: Sequence[dict[str, Any]],
        scope: ToolScope,
        listener: events.Listener,
        *,
        request_id: str | None = None,
    ) -> Turn:
        """Begin a turn whose context is ``messages`` (Chat Completions shape) and that keeps no session; with
        a ``request_id`` its tool executions are stored under it, else nothing is stored."""
        executions = None if request_id is None else store_executions(self.store, user_id, request_id)
        return self._start(user_id, MemoryConversation(messages, executions), scope, listener, None, _nothing)

    async def start_resolution(
        self,
        user_id: str,
        approval_id: str,
        approve: bool,
        tool_call_ids: Sequence[str] | None = None,
        *,
        scope: ToolScope | None = None,
        listener: events.Listener | None = None,
        instructions: str | None = None,
    ) -> Turn:
        """Resolve a pending approval (all calls, or only ``tool_call_ids``) and continue its turn."""
        approval = await self.store.get_approval(user_id, approval_id)
        if approval is None:
            raise ChatError(f"approval request {approval_id} not found", 404)
        if approval.status != "pending":
            raise ChatError(f"approval request {approval_id} was already {approval.status}", 409)
        if approval.expires_at < _iso(self.clock.seconds()):
            await self.store.resolve_approval(approval_id, "expired")
            raise ChatError(f"approval request {approval_id} has expired", 409)
        calls = approval_calls(approval)
        known = [call.id for call in calls]
        if tool_call_ids is not None:
            unknown = sorted(set(tool_call_ids) - set(known))
            if unknown:
                raise ChatError(f"tool_call_ids not in approval request {approval_id}: {', '.join(unknown)}", 400)
        if approval.session_id in self._running:
            raise ChatError(BUSY, 409)
        chosen = set(known if tool_call_ids is None else tool_call_ids) if approve else set()
        run = [call for call in calls if call.id in chosen]
        refused = [call for call in calls if call.id not in chosen]

        async def first(turn: Turn) -> None:
            if refused:
                await turn.store_refusals(refused)
            if run:
                await turn.run_tools(run)
            turn.emit(events.Continuing(denied=not run))

        async def decide(turn: Turn) -> None:
            # The compare-and-set that makes the decision once, whichever instance takes it; the turn
            # holds its session (here and, claimed, everywhere) first, so it never loses its approval.
            if not await self.store.resolve_approval(approval_id, "approved" if approve else "denied"):
                raise ChatError(f"approval request {approval_id} was already resolved", 409)

        conversation = StoredConversation(self.store, approval.session_id, instructions=instructions)
        turn = self._start(user_id, conversation, scope, listener, None, first, decide)
        stopped = await turn.ready
        if stopped is not None:
            raise stopped
        return turn

    def _start(
        self,
        user_id: str,
        conversation: Conversation,
        scope: ToolScope | None,
        listener: events.Listener | None,
        message: Message | None,
        first: First,
        gate: Gate | None = None,
    ) -> Turn:
        session_id = conversation.session_id
        if conversation.stored and session_id in self._running:
            raise ChatError(BUSY, 409)
        stream = None
        if listener is None:
            stream = self.streams.create(f"stream_{user_id}_{new_id()}", user_id, session_id)
            if self.coordinator is not None:
                # Every instance reads this stream from the log: coalesced deltas bound its rows.
                to_log = self.coordinator.emitter(stream.id, stream)
                batching = DeltaCoalescer(self.clock, self.settings.event_batch_seconds, to_log)
                listener = ReferencePresenter(stream, batching)
            else:
                listener = ReferencePresenter(stream)
        turn = Turn(self, user_id, conversation, scope or self.reference_scope(), listener, stream, message)
        done = Deferred.fromCoroutine(turn.run(first, gate))
        if conversation.stored:
            self._running[session_id] = done
        else:
            self._stateless.add(done)
        deadline = self.clock.callLater(self.settings.stream_max_seconds, done.cancel)

        def finished(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            self.creation_errors.pop(session_id, None)
            if conversation.stored:
                if self._running.get(session_id) is done:
                    del self._running[session_id]
            else:
                self._stateless.discard(done)
            return result

        done.addBoth(finished)
        done.addErrback(lambda failure: failure.trap(CancelledError))
        turn.done = done
        return turn

    async def wait(self, turn: Turn) -> TurnResult:
        """Wait for the turn to finish (one waiter per turn); cancelling the wait cancels the turn."""
        if turn.done is not None:
            await turn.done
        return turn.result

    # -- titles -------------------------------------------------------------------------------------

    def maybe_title(self, user_id: str, session_id: str, history: History, answer: str) -> None:
        """Title the session after its first turn (however that turn ended), in the background."""
        users = [m for m in history.messages if m.role == "user"]
        if not self.settings.title_generation or not history.complete or len(users) != 1:
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

    def stopService(self) -> Deferred[None]:
        """The daemon's ``chat`` service stops by :meth:`stop`."""
        super().stopService()
        return Deferred.fromCoroutine(self.stop())

    async def stop(self, within: float = STOP_SECONDS) -> None:
        """Cancel running turns and title work and wait, up to ``within`` seconds, for them to settle.

        Each turn's stream ends with an ``error`` event saying the server is shutting down, and what the
        model had said so far is stored before this returns (so the store may be closed after it). A turn
        started while stopping is cancelled too. Each is cancelled once (a second cancellation would
        interrupt its clean-up); those still running after ``within`` seconds are left, with a warning.
        """
        self.stopping = True
        deadline = self.clock.seconds() + within
        cancelled: set[Deferred[Any]] = set()
        while True:
            live = list(self._running.values()) + list(self._stateless) + list(self._background)
            if not live:
                break
            waiting = settled(live)
            for work in live:
                if work not in cancelled:
                    cancelled.add(work)
                    work.cancel()
            left = deadline - self.clock.seconds()
            try:
                if not waiting.called and left <= 0:
                    raise defer.TimeoutError()
                await waiting.addTimeout(left, self.clock)
            except defer.TimeoutError:
                still = len(self._running) + len(self._stateless) + len(self._background)
                log.warn("Stopping: {count} turns or title jobs still running after {seconds:g} s; not waiting",
                         count=still, seconds=within)
                break
        self.streams.close()


def settled(work: Sequence[Deferred[Any]]) -> Deferred[None]:
    """Fires once every one of ``work`` has a result (passed on unchanged to their later callbacks);
    cancelling it, or letting it time out, leaves the work running."""
    done: Deferred[None] = Deferred()
    left = len(work)

    def one(result: object) -> object:
        nonlocal left
        left -= 1
        if left == 0 and not done.called:
            done.callback(None)
        return result

    for each in work:
        each.addBoth(one)
    return done


async def _nothing(turn: Turn) -> None:
    """A turn that starts with the model."""


def _rounds_since_last_user(history: Sequence[Message]) -> int:
    rounds = 0
    for message in reversed(history):
        if message.role == "user":
            break
        if message.role == "assistant" and message.tool_calls:
            rounds += 1
    return rounds
