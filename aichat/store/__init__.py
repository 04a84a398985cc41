"""Persistence: the :class:`~aichat.store.base.Store` interface and its SQLite implementation."""

from aichat.store.base import (
    Approval,
    Attachment,
    Message,
    Session,
    Store,
    StoreError,
    new_id,
    utc_now,
)

__all__ = ["Approval", "Attachment", "Message", "Session", "Store", "StoreError", "new_id", "utc_now"]
