"""The reference's pagination: ``?page=`` and ``?limit=`` read once, and the ``pagination`` body written once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.web.iweb import IRequest

from aichat.api.app import query_arg
from aichat.api.errors import BadRequest

#: The largest offset a page may reach: SQLite and PostgreSQL take 64-bit signed offsets.
MAX_OFFSET = 2**63 - 1
#: The most items a page may hold; a ``limit`` outside 1..MAX_LIMIT is the route's default.
MAX_LIMIT = 100


def _number(request: IRequest, name: str) -> int | None:
    """The query parameter as an integer; 0 when it is not ASCII digits, ``None`` past 19 digits."""
    raw = (query_arg(request, name) or "").strip()
    digits = raw[1:] if raw[:1] in ("-", "+") else raw
    if not (digits.isascii() and digits.isdigit()):
        return 0
    if len(digits.lstrip("0")) > 19:
        return None
    return -int(digits) if raw.startswith("-") else int(digits)


@dataclass(frozen=True)
class Page:
    """One page of a listing: its number (from 1), its size and the offset of its first item."""

    number: int
    limit: int
    offset: int

    @classmethod
    def of(cls, request: IRequest, default_limit: int) -> Page:
        """The page ``request`` asks for.

        Values that are not ASCII integers fall back to the defaults, as Go's ``Atoi`` failing did
        (``?page=²`` is page 1); a page whose offset would pass 64 bits is a 400.
        """
        limit = _number(request, "limit") or 0
        if not 1 <= limit <= MAX_LIMIT:
            limit = default_limit
        page = _number(request, "page")
        if page is None or (max(page, 1) - 1) * limit > MAX_OFFSET:
            raise BadRequest("Invalid page: the offset it asks for is out of range")
        page = max(page, 1)
        return cls(page, limit, (page - 1) * limit)

    def body(self, key: str, items: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """The listing's JSON body: ``{key: items, "pagination": {"page", "limit", "offset"}}``."""
        return {key: list(items), "pagination": {"page": self.number, "limit": self.limit, "offset": self.offset}}
