"""Health and session routes: the reference's paths, JSON shapes and pagination, isolated per user."""

from __future__ import annotations

from dataclasses import dataclass

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from aichat.api.app import DATABASE_UNAVAILABLE, json_response, query_arg, read_json, rfc3339_now, string_field
from aichat.api.errors import BadRequest, NotFound
from aichat.api.identity import Identity
from aichat.api.pagination import Page
from aichat.api.routing import authorized
from aichat.store.base import Store

SESSION_NOT_FOUND = "Session not found"


@dataclass
class HealthRoutes:
    """``GET /health`` and ``GET /v1/chat/health``: no authentication; 503 while the database is unreachable."""

    store: Store
    clock: IReactorTime
    version: str
    app = Klein()

    @app.route("/health", methods=["GET"])
    @app.route("/v1/chat/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        body = {"status": "ok", "timestamp": rfc3339_now(self.clock), "version": self.version}
        if not await self.store.ping():
            body.update(status="unavailable", error=DATABASE_UNAVAILABLE)
            return json_response(request, body, 503)
        return json_response(request, body)


@dataclass
class SessionRoutes:
    """Session CRUD and stored messages under ``/v1/chat/sessions``, each user's own."""

    store: Store
    identity: Identity
    app = Klein()

    @app.route("/v1/chat/sessions", methods=["POST"])
    @authorized
    async def create(self, request: IRequest, user: str) -> bytes:
        title = string_field(read_json(request), "title").strip() or "New Chat Session"
        session = await self.store.create_session(user, title)
        return json_response(request, session.to_json(), 201)

    @app.route("/v1/chat/sessions", methods=["GET"])
    @authorized
    async def list_sessions(self, request: IRequest, user: str) -> bytes:
        page = Page.of(request, 20)
        sessions = await self.store.list_sessions(user, page.limit, page.offset)
        return json_response(request, page.body("sessions", (s.to_json() for s in sessions)))

    @app.route("/v1/chat/sessions/<string:session_id>", methods=["GET"])
    @authorized
    async def get(self, request: IRequest, user: str, session_id: str) -> bytes:
        session = await self.store.get_session(user, session_id)
        if session is None:
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, session.to_json())

    @app.route("/v1/chat/sessions/<string:session_id>", methods=["PUT"])
    @authorized
    async def rename(self, request: IRequest, user: str, session_id: str) -> bytes:
        title = string_field(read_json(request), "title").strip()
        if not title:
            raise BadRequest("Title is required")
        if not await self.store.rename_session(user, session_id, title):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Session updated successfully"})

    @app.route("/v1/chat/sessions/<string:session_id>", methods=["DELETE"])
    @authorized
    async def delete(self, request: IRequest, user: str, session_id: str) -> bytes:
        if not await self.store.delete_session(user, session_id):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Session deleted successfully"})

    @app.route("/v1/chat/sessions/<string:session_id>/messages", methods=["GET"])
    @authorized
    async def messages(self, request: IRequest, user: str, session_id: str) -> bytes:
        page = Page.of(request, 50)
        found = await self.store.list_messages(user, session_id, page.limit, page.offset)
        if found is None:
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, page.body("messages", (m.to_json() for m in found)))

    @app.route("/v1/chat/sessions/<string:session_id>/messages", methods=["DELETE"])
    @authorized
    async def clear(self, request: IRequest, user: str, session_id: str) -> bytes:
        if not await self.store.clear_messages(user, session_id):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Session messages cleared successfully"})

    @app.route("/v1/chat/clear", methods=["DELETE"])
    @authorized
    async def clear_legacy(self, request: IRequest, user: str) -> bytes:
        session_id = query_arg(request, "session_id") or ""
        if not session_id:
            raise BadRequest("session_id parameter is required")
        if not await self.store.clear_messages(user, session_id):
            raise NotFound(SESSION_NOT_FOUND)
        return json_response(request, {"message": "Chat history cleared successfully"})
