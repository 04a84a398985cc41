"""Errors an API handler raises on purpose, each carrying the HTTP status the client gets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aichat.chat.turn import ChatError


class APIError(Exception):
    """A client-visible error: ``{"error": message}`` with ``status``."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(APIError):
    """Malformed JSON or an invalid field (the message says which)."""

    status = 400


class Unauthorized(APIError):
    """No acceptable identity on a user route."""

    status = 401


class Forbidden(APIError):
    """An identity that may not do this."""

    status = 403


class NotFound(APIError):
    """Missing, or belonging to another user (indistinguishable on purpose)."""

    status = 404


class UnsupportedMediaType(APIError):
    """The body is not of a content type the route accepts."""

    status = 415


class ServiceUnavailable(APIError):
    """A dependency is not ready."""

    status = 503


def from_chat(error: ChatError) -> APIError:
    """A chat service's refusal (a turn that cannot start, an approval that cannot be resolved) as the
    client sees it: its message, with its status. The one place a :class:`ChatError` becomes an APIError."""
    return APIError(error.message, error.status)
