"""Persistence: the :class:`~aichat.store.base.Store` interface; SQLite and PostgreSQL stores (see factory)."""

from aichat.store.base import (
    Approval,
    Attachment,
    History,
    Message,
    Session,
    Store,
    StoreError,
    StoreFull,
    StoreUnavailable,
    ToolExecution,
    new_id,
    utc_now,
)

__all__ = [
    "Approval",
    "Attachment",
    "History",
    "Message",
    "Session",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "ToolExecution",
    "new_id",
    "utc_now",
]
