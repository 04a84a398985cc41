"""The Klein application: what the routes are built from, the one JSON error path, and request helpers.

Route classes (see :mod:`aichat.api.routing`) are mounted on the :class:`API` instance's ``app``; handlers
raise :class:`~aichat.api.errors.APIError` for client errors, and a chat service's
:class:`~aichat.chat.turn.ChatError` is answered with its status here (translated once, by
:func:`~aichat.api.errors.from_chat`). Anything else becomes a 500 with a generic body and a logged
traceback. Once an SSE stream has begun, errors are sent as ``error`` events by the stream writer, never as
a status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from aichat import __version__, content_type
from aichat.api.contract import check_body, matched_template
from aichat.api.errors import APIError, BadRequest, ServiceUnavailable, UnsupportedMediaType, from_chat
from aichat.api.identity import Identity
from aichat.api.routing import BodyLimits, Routes, mount
from aichat.chat.turn import ChatError
from aichat.config import Settings
from aichat.jsonfmt import compact
from aichat.metrics import UNMATCHED_ROUTE, Metrics
from aichat.store.base import Store, StoreUnavailable
from aichat.store.text import unstorable

if TYPE_CHECKING:
    from aichat.chat.turn import ChatService
    from aichat.mcp import MCPHost

log = Logger(namespace="aichat.api")


def rfc3339_now(clock: IReactorTime) -> str:
    """The clock's time as RFC 3339 UTC with whole seconds, as the health endpoint reports it."""
    return datetime.fromtimestamp(clock.seconds(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The 503 body's message while the database cannot be reached.
DATABASE_UNAVAILABLE = StoreUnavailable.public


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Set status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return compact(body).encode("utf-8")


def error_body(request: IRequest, message: str) -> dict[str, Any]:
    """The reference's error shape, ``{"error": message}``, with the request's id."""
    body: dict[str, Any] = {"error": message}
    request_id = getattr(request, "request_id", "")
    if request_id:
        body["request_id"] = request_id
    return body


#: ``\u0000`` and ``\ud800``-``\udfff`` escapes: JSON may spell NUL and lone surrogates, which no database
#: (PostgreSQL refuses NUL) or UTF-8 text can hold.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def _storable(value: Any) -> bool:
    """Whether every string in ``value`` can be stored (no NUL, no lone surrogate)."""
    if isinstance(value, str):
        return not unstorable(value)
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    if isinstance(value, dict):
        return all(_storable(key) and _storable(item) for key, item in value.items())
    return True


def read_json(request: IRequest, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object.

    400 when empty (if ``required``) or malformed, 415 when the body is not declared ``application/json``
    (so a cross-site form post, which cannot declare it without a CORS preflight, is never taken as JSON),
    400 for text that cannot be stored (NUL, lone surrogates), numbers past Python's digit limit, nesting
    past the parser's depth, or a body that breaks its route's schema in the OpenAPI document.
    """
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if required:
            raise BadRequest("Invalid request format: a JSON object body is required")
        return {}
    media = content_type.of_headers(request.requestHeaders)
    if not media.is_json:
        shown = repr(media.media) if media.media else "none"
        raise UnsupportedMediaType(f"Unsupported content type {shown}: send Content-Type: application/json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("Invalid request format: JSON nested too deeply") from None
    except ValueError as e:  # malformed JSON, bytes that are not UTF-8, an integer of too many digits
        raise BadRequest(f"Invalid request format: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("Invalid request format: the body must be a JSON object")
    if _SUSPECT_ESCAPE.search(raw) and not _storable(body):
        raise BadRequest("Invalid request format: the text contains a NUL character or a lone surrogate "
                         "(\\ud800-\\udfff), which cannot be stored")
    check_body(request, body)
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


def running_chat(service: ChatService | None) -> ChatService:
    """``service``, or 503 while the daemon has no chat service (its routes are mounted either way)."""
    if service is None:
        raise ServiceUnavailable("Chat is not running")
    return service


@dataclass
class API:
    """The HTTP application: what its routes are built from, the one Klein app they are mounted on, and the
    body limit of each route.

    ``chat`` and ``mcp`` are the services the chat, OpenAI-compatible and MCP routes drive; without them
    those routes answer 503 (see :func:`aichat.api.build_resource`, which builds and mounts every route).
    """

    settings: Settings
    store: Store
    clock: IReactorTime
    version: str = __version__
    chat: ChatService | None = None
    mcp: MCPHost | None = None
    app: Klein = field(default_factory=Klein)
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        auth = self.settings.auth
        self.identity = Identity(auth.trusted_proxies, auth.token_digests, auth.admin_digests)
        #: The body limit of a request target, for :class:`~aichat.api.site.APISite`.
        self.body_limit = BodyLimits(self.settings.limits.max_body_bytes)
        self.app.handle_errors(Exception)(self._error)
        # ``%2F`` in a path parameter arrives as ``/``; merging slashes would redirect to the same URL forever.
        self.app.url_map.merge_slashes = False

    def mount(self, *routes: Routes) -> list[str]:
        """Mount the rules of each route class instance (see :mod:`aichat.api.routing`); return them."""
        mounted: list[str] = []
        for each in routes:
            mounted += mount(self.app, each, self.body_limit, self.settings.limits)
        return mounted

    def route_of(self, request: IRequest) -> str:
        """The route template ``request`` matched (for the metrics), or ``unmatched``."""
        return matched_template(request) or UNMATCHED_ROUTE

    def _error(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(CancelledError):
            return b""
        error = failure.value
        if isinstance(error, ChatError):
            error = from_chat(error)
        if isinstance(error, APIError):
            return json_response(request, error_body(request, error.message), error.status)
        if isinstance(error, StoreUnavailable):
            log.warn("{method} {path}: {error}", method=request.method.decode("ascii", "replace"),
                     path=request.path.decode("utf-8", "replace"), error=str(error))
            return json_response(request, error_body(request, error.public), error.status)
        if isinstance(error, HTTPException):
            status = error.code or 500
            messages = {404: "Not found", 405: "Method not allowed"}
            message = messages.get(status, error.name)
            if status == 405:
                valid = getattr(error, "valid_methods", None)
                if valid:
                    request.setHeader(b"Allow", ", ".join(valid).encode())
            return json_response(request, error_body(request, message), status)
        log.failure(
            "Unhandled error in {method} {path}",
            failure,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
        )
        return json_response(request, error_body(request, "Internal server error"), 500)

    def route(self, path: str, methods: list[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a plain function on the app (route classes are mounted with :meth:`mount` instead)."""
        return self.app.route(path, methods=methods)
