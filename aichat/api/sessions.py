"""Health and session routes: the reference's paths, JSON shapes and pagination, isolated per user."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from aichat.api.app import (
    API,
    DATABASE_UNAVAILABLE,
    json_response,
    page_args,
    query_arg,
    read_json,
    rfc3339_now,
    string_field,
)
from aichat.api.errors import BadRequest, NotFound

SESSION_NOT_FOUND = "Session not found"


def register_health(api: API) -> None:
    """``GET /health`` and ``GET /v1/chat/health``: no authentication; 503 while the database is unreachable."""

    @api.route("/health", methods=["GET"])
    @api.route("/v1/chat/health", methods=["GET"])
    async def health(request: IRequest) -> bytes:
        body = {"status": "ok", "timestamp": rfc3339_now(api.clock), "version": api.version}
        if not await api.store.ping():
            body.update(status="unavailable", error=DATABASE_UNAVAILABLE)
            return json_response(request, body, 503)
        return json_response(request, body)


def register_sessions(api: API) -> None:
    """Session CRUD and stored messages under ``/v1/chat/sessions``."""
    store = api.store

    @api.route("/v1/chat/sessions", methods=["POST"])
    async def create(request: IRequest) -> bytes:
        user = api.user(request)
        title = string_field(read_json(request), "title").strip() or "New Chat Session"
        session = await store.create_session(user, title)
        return json_response(request, session.to_json(), 201)

    @api.route("/v1/chat/sessions", methods=["GET"])
    async def list_sessions(request: IRequest) -> bytes:
        user = api.user(request)
        page, limit, offset = page_args(request, 20)
        sessions = await store.list_sessions(user, limit, offset)
        body = {
            "sessions": [s.to_json() for s in sessions],
            "pagination": {"page": page, "limit": limit, "offset": offset},
        }
        return json_response(request, body)

    @api.route("/v1/chat/sessions/<string:session_id>", methods=["GET"])
    async def get(request: IRequest, session_id: str) -> bytes:
        user = api.user(request)
        session = await store.get_session(user, session_id)
        if session is None:
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, session.to_json())

    @api.route("/v1/chat/sessions/<string:session_id>", methods=["PUT"])
    async def rename(request: IRequest, session_id: str) -> bytes:
        user = api.user(request)
        title = string_field(read_json(request), "title").strip()
        if not title:
            raise BadRequest("Title is required")
        if not await store.rename_session(user, session_id, title):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Session updated successfully"})

    @api.route("/v1/chat/sessions/<string:session_id>", methods=["DELETE"])
    async def delete(request: IRequest, session_id: str) -> bytes:
        user = api.user(request)
        if not await store.delete_session(user, session_id):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Session deleted successfully"})

    @api.route("/v1/chat/sessions/<string:session_id>/messages", methods=["GET"])
    async def messages(request: IRequest, session_id: str) -> bytes:
        user = api.user(request)
        page, limit, offset = page_args(request, 50)
        found = await store.list_messages(user, session_id, limit, offset)
        if found is None:
            raise NotFound(SESSION_NOT_FOUND)
        body: dict[str, Any] = {
            "messages": [m.to_json() for m in found],
            "pagination": {"page": page, "limit": limit, "offset": offset},
        }
        return json_response(request, body)

    @api.route("/v1/chat/sessions/<string:session_id>/messages", methods=["DELETE"])
    async def clear(request: IRequest, session_id: str) -> bytes:
        user = api.user(request)
        if not await store.clear_messages(user, session_id):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Session messages cleared successfully"})

    @api.route("/v1/chat/clear", methods=["DELETE"])
    async def clear_legacy(request: IRequest) -> bytes:
        user = api.user(request)
        session_id = query_arg(request, "session_id") or ""
        if not session_id:
            raise BadRequest("session_id parameter is required")
        if not await store.clear_messages(user, session_id):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Chat history cleared successfully"})
