"""The store's records and the small interface callers use, so another database can follow.

Records mirror the reference's JSON shapes (``ChatSession``, ``Message``, ``Attachment``) and add what
the model needs to see history correctly: the ``tool_call_id`` of each tool result. An approval's state
is an :data:`ApprovalStatus`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, get_args


def utc_now() -> str:
    """Now as a fixed-width RFC 3339 UTC timestamp with microseconds (sorts as text)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str = "") -> str:
    """A fresh uuid4, optionally ``<prefix>_<uuid>`` as the reference names message ids."""
    value = str(uuid.uuid4())
    return f"{prefix}_{value}" if prefix else value


class StoreError(Exception):
    """The database failed; the message is safe to log but not meant for API clients."""


class StoreUnavailable(StoreError):
    """The database cannot be reached just now; it may come back by itself.

    ``status`` and ``public`` are what an API client is told; the exception's own text is for the log.
    """

    status = 503
    public = "Database unavailable; try again shortly"


class StoreFull(StoreUnavailable):
    """The database's disk is full: writes fail until space is freed; reads go on."""

    status = 507
    public = "The database's disk is full: nothing can be stored until the operator frees space"


@dataclass(frozen=True)
class Session:
    """A conversation owned by one user."""

    id: str
    user_id: str
    title: str
    created_at: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        """The reference's ``ChatSession`` JSON."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Attachment:
    """A file sent with a user message; ``content`` is base64."""

    id: str
    filename: str
    mime_type: str
    size: int
    content: str = ""

    def to_json(self, *, with_content: bool = True) -> dict[str, Any]:
        """The reference's ``Attachment`` JSON."""
        out: dict[str, Any] = {
            "id": self.id,
            "filename": self.filename,
            "mime_type": self.mime_type,
            "size": self.size,
        }
        if with_content and self.content:
            out["content"] = self.content
        return out


@dataclass(frozen=True)
class Message:
    """One stored message of a session.

    ``tool_calls`` are OpenAI-shaped calls on assistant messages; ``tool_call_id`` ties a ``tool``
    message to the call it answers; ``tool_executions`` holds timings and errors. Both are the stored
    JSON of the records in :mod:`aichat.llm.tools` (``ToolCall.to_openai``, ``Succeeded``/``Failed``
    ``to_json``), which read them back.
    """

    id: str
    session_id: str
    role: str
    content: str
    created_at: str = field(default_factory=utc_now)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    tool_executions: list[dict[str, Any]] | None = None
    approval_request: dict[str, Any] | None = None
    attachments: tuple[Attachment, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The reference's ``Message`` JSON (collections omitted when empty)."""
        out: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "timestamp": self.created_at,
        }
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_executions:
            out["tool_executions"] = self.tool_executions
        if self.attachments:
            out["attachments"] = [a.to_json() for a in self.attachments]
        if self.approval_request:
            out["approval_request"] = self.approval_request
        return out


@dataclass(frozen=True)
class History:
    """The newest messages of a session, oldest first (see :mod:`aichat.store.tail`); ``complete`` when
    they start at the session's first message."""

    messages: list[Message] = field(default_factory=list)
    complete: bool = True


#: Where an approval is: waiting for its user, or decided (approved, denied) or lapsed (expired), for good.
ApprovalStatus = Literal["pending", "approved", "denied", "expired"]
APPROVAL_STATUSES: tuple[ApprovalStatus, ...] = get_args(ApprovalStatus)


@dataclass(frozen=True)
class Approval:
    """A set of tool calls waiting for (or resolved by) the user who owns the session.

    ``tool_calls`` are the calls as stored (Chat Completions ``tool_calls`` entries, the row's JSON);
    the tool loop reads them as records with :func:`aichat.chat.approvals.approval_calls`.
    """

    id: str
    session_id: str
    user_id: str
    tool_calls: list[dict[str, Any]]
    status: ApprovalStatus
    created_at: str
    expires_at: str
    resolved_at: str | None = None


@dataclass(frozen=True)
class ToolExecution:
    """A tool call run server-side for a request that keeps no session (a chat completion), stored by the
    user it ran for and the id of the request (``request_id``, the completion's ``chatcmpl_...`` id)."""

    id: str
    user_id: str
    request_id: str
    tool_call_id: str
    tool_name: str
    arguments: str
    result: str
    error: str | None
    start_time: str
    end_time: str
    duration_ms: int
    created_at: str = field(default_factory=utc_now)

    @classmethod
    def of(cls, user_id: str, request_id: str, execution: dict[str, Any]) -> ToolExecution:
        """A record of one of a turn's executions (the reference's ``ToolExecution`` JSON)."""
        return cls(
            id=new_id("exec"),
            user_id=user_id,
            request_id=request_id,
            tool_call_id=str(execution["id"]),
            tool_name=str(execution["tool_name"]),
            arguments=str(execution.get("arguments", "")),
            result=str(execution.get("result", "")),
            error=execution.get("error"),
            start_time=str(execution["start_time"]),
            end_time=str(execution["end_time"]),
            duration_ms=int(execution["duration_ms"]),
        )

    def to_json(self) -> dict[str, Any]:
        """The reference's ``ToolExecution`` JSON, with the request it ran for."""
        out: dict[str, Any] = {
            "id": self.tool_call_id,
            "tool_name": self.tool_name,
            "arguments": self.arguments,
            "result": self.result,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "duration_ms": self.duration_ms,
            "request_id": self.request_id,
            "user_id": self.user_id,
            "created_at": self.created_at,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class Store(Protocol):
    """What the API and chat layers need from a database. Every method is a coroutine.

    Writes take effect in the order they are called, even when the caller does not wait for one to
    finish before starting the next: a session created and then written to without waiting exists first.

    Per-user isolation lives here: every lookup by session id also takes the user id, and a session of
    another user is indistinguishable from a missing one.

    Failures raise :class:`StoreError`; :class:`StoreUnavailable` when the database cannot be reached just
    now (the API answers 503 and the store recovers by itself when the database is back).
    """

    async def open(self) -> None:
        """Create the database if needed and apply pending migrations."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""

    async def create_session(self, user_id: str, title: str, session_id: str | None = None) -> Session:
        """Create and return a session."""

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> list[Session]:
        """The user's sessions, most recently updated first."""

    async def get_session(self, user_id: str, session_id: str) -> Session | None:
        """The session if it exists and belongs to ``user_id``."""

    async def rename_session(self, user_id: str, session_id: str, title: str) -> bool:
        """Set the title and bump ``updated_at``; ``False`` if not found for this user."""

    async def delete_session(self, user_id: str, session_id: str) -> bool:
        """Delete the session with its messages, attachments and approvals."""

    async def add_message(self, message: Message) -> None:
        """Append a message (and its attachments) and bump the session's ``updated_at``, atomically."""

    async def list_messages(self, user_id: str, session_id: str, limit: int, offset: int) -> list[Message] | None:
        """A page of the session's messages in order, or ``None`` if not found for this user."""

    async def history(self, session_id: str) -> list[Message]:
        """Every message of the session in order (copies and checks; a turn reads :meth:`recent_history`)."""

    async def recent_history(self, session_id: str, budget_chars: int) -> History:
        """The session's budgeted tail (:mod:`aichat.store.tail`), for building the model's context."""

    async def session_history(
        self, user_id: str, session_id: str, budget_chars: int
    ) -> tuple[Session | None, History]:
        """The user's session and its budgeted tail in one read; ``(None, History())`` if not found for
        this user."""

    async def clear_messages(self, user_id: str, session_id: str) -> bool:
        """Delete every message of the session (and pending approvals); ``False`` if not found."""

    async def add_tool_executions(self, executions: Sequence[ToolExecution]) -> None:
        """Store the executions of a request that keeps no session, committed together."""

    async def list_tool_executions(
        self, user_id: str | None, request_id: str | None, limit: int, offset: int
    ) -> list[ToolExecution]:
        """Stored executions, newest first, of one user and/or one request (``None``: any)."""

    async def create_approval(self, approval: Approval) -> None:
        """Store a pending approval."""

    async def get_approval(self, user_id: str, approval_id: str) -> Approval | None:
        """The approval if it belongs to ``user_id``."""

    async def count_pending_approvals(self) -> int:
        """How many approvals wait for a decision."""

    async def resolve_approval(self, approval_id: str, status: ApprovalStatus) -> bool:
        """Move a pending approval to ``status``; ``False`` if it was no longer pending."""
