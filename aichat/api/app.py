"""The Klein application: shared state, the one JSON error path, and request helpers.

Route modules (``health``, ``sessions``, ``chat``, ``mcp``) each register their routes on the
:class:`API` instance's ``app``; handlers raise :class:`~aichat.api.errors.APIError` for client errors.
Anything else becomes a 500 with a generic body and a logged traceback. Once an SSE stream has begun,
errors are sent as ``error`` events by the stream writer, never as a status.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from aichat import __version__
from aichat.api.errors import APIError, BadRequest, UnsupportedMediaType
from aichat.api.identity import Identity
from aichat.config import Settings
from aichat.jsonfmt import compact
from aichat.store.base import Store, StoreUnavailable

log = Logger(namespace="aichat.api")


def rfc3339_now(clock: IReactorTime) -> str:
    """The clock's time as RFC 3339 UTC with whole seconds, as the health endpoint reports it."""
    return datetime.fromtimestamp(clock.seconds(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The 503 body's message while the database cannot be reached.
DATABASE_UNAVAILABLE = "Database unavailable; try again shortly"


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Set status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return compact(body).encode("utf-8")


def read_json(request: IRequest, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object; 415 for a non-JSON content type, 400 when malformed."""
    content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"Unsupported content type {content_type!r}: send application/json")
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if required:
            raise BadRequest("Invalid request format: a JSON object body is required")
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"Invalid request format: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("Invalid request format: the body must be a JSON object")
    return body


def string_field(body: dict[str, Any], name: str, *, required: bool = False) -> str:
    """``body[name]`` as a string; 400 naming the field when it has another type or is missing."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"Invalid request format: field {name!r} is required")
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"Invalid request format: field {name!r} must be a string")
    if required and not value:
        raise BadRequest(f"Invalid request format: field {name!r} must not be empty")
    return value


def query_arg(request: IRequest, name: str) -> str | None:
    """The first value of query parameter ``name``, decoded, or ``None``."""
    values = request.args.get(name.encode())
    if not values:
        return None
    value: bytes = values[0]
    return value.decode("utf-8", errors="replace")


def page_args(request: IRequest, default_limit: int) -> tuple[int, int, int]:
    """The reference's pagination: (page, limit, offset); bad values fall back to the defaults."""

    def number(name: str) -> int:
        raw = query_arg(request, name) or ""
        return int(raw) if raw.strip().lstrip("-").isdigit() else 0

    page = max(number("page"), 1)
    limit = number("limit")
    if not 1 <= limit <= 100:
        limit = default_limit
    return page, limit, (page - 1) * limit


@dataclass
class API:
    """The HTTP application and the state its handlers share."""

    settings: Settings
    store: Store
    clock: IReactorTime
    version: str = __version__
    services: dict[str, Any] = field(default_factory=dict)
    app: Klein = field(default_factory=Klein)

    def __post_init__(self) -> None:
        self.identity = Identity(self.settings.auth.trusted_proxies, self.settings.auth.token_digests)
        self.app.handle_errors(Exception)(self._error)

    def user(self, request: IRequest) -> str:
        """The caller's user id, or 401."""
        return self.identity.user_id(request)

    def _error(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(CancelledError):
            return b""
        error = failure.value
        if isinstance(error, APIError):
            return json_response(request, {"error": error.message}, error.status)
        if isinstance(error, StoreUnavailable):
            log.warn("{method} {path}: {error}", method=request.method.decode("ascii", "replace"),
                     path=request.path.decode("utf-8", "replace"), error=str(error))
            return json_response(request, {"error": DATABASE_UNAVAILABLE}, 503)
        if isinstance(error, HTTPException):
            status = error.code or 500
            messages = {404: "Not found", 405: "Method not allowed"}
            message = messages.get(status, error.name)
            if status == 405:
                valid = getattr(error, "valid_methods", None)
                if valid:
                    request.setHeader(b"Allow", ", ".join(valid).encode())
            return json_response(request, {"error": message}, status)
        log.failure(
            "Unhandled error in {method} {path}",
            failure,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
        )
        return json_response(request, {"error": "Internal server error"}, 500)

    def route(self, path: str, methods: list[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a handler on this instance's app."""
        return self.app.route(path, methods=methods)
