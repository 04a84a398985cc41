"""Chat routes: send (JSON and multipart), SSE streams, approvals; the reference's paths and shapes.

SSE frames are ``event: message`` + ``data: <StreamMessage JSON>``; a ``: ping`` comment goes out every
``chat.keepalive_seconds``. A stream is written from its first event, whenever the client connects, and the
response ends after the ``done`` or ``error`` event. A client that goes away only unsubscribes: the turn
goes on and is stored. The upload route takes bodies up to ``limits.max_upload_bytes`` (its
:func:`~aichat.api.routing.body_limit`); its form is read by :mod:`aichat.api.forms`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from aichat.api.app import json_response, query_arg, read_json, running_chat, string_field
from aichat.api.errors import APIError, BadRequest, NotFound
from aichat.api.forms import read_chat_form
from aichat.api.identity import Identity
from aichat.api.routing import authorized, body_limit
from aichat.api.stream_reader import ReaderSlots, StreamReader
from aichat.chat.approvals import parse_command
from aichat.chat.streams import Stream, StreamError
from aichat.chat.turn import ChatService, Turn
from aichat.config import ChatSettings, LimitSettings
from aichat.metrics import Metrics
from aichat.store.base import Attachment


def _last_event_id(request: IRequest) -> int:
    """The ``Last-Event-ID`` a reconnecting client sends (0 without one); 400 if it is not ours."""
    raw = request.getHeader("last-event-id")
    if raw is None or not raw.strip():
        return 0
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise BadRequest("Invalid Last-Event-ID: send back the id of an event of this stream")
    return int(text)


@dataclass
class ChatRoutes:
    """Sending messages (JSON or a form with files), approving tool calls, and reading a turn's SSE stream.

    Without a chat service (``service`` is ``None``) every route answers 503.
    """

    service: ChatService | None
    identity: Identity
    clock: IReactorTime
    settings: ChatSettings
    limits: LimitSettings
    metrics: Metrics
    slots: ReaderSlots = field(init=False)
    app = Klein()

    def __post_init__(self) -> None:
        self.slots = ReaderSlots(self.settings.max_stream_readers)

    def chat(self) -> ChatService:
        """The chat service, or 503."""
        return running_chat(self.service)

    async def _begin(
        self, user: str, message: str, session_id: str, attachments: list[Attachment] | None = None
    ) -> Turn:
        """Start the turn a chat message asks for: an approval command, or a message to the model."""
        chat = self.chat()
        command = parse_command(message)
        if command is not None and not attachments:
            return await chat.start_resolution(user, command.request_id, command.approve)
        session, history = await chat.resume(user, session_id)
        return chat.start_message(user, session, message, attachments or [], history)

    async def _respond(self, request: IRequest, turn: Turn) -> bytes:
        """``?streaming=true``: the stream handle at once; otherwise wait and answer the final message."""
        if query_arg(request, "streaming") == "true":
            refused = await turn.ready
            if refused is not None:
                raise refused  # answered with its status by the app's one ChatError translation
            stream = turn.stream
            body = {
                "stream_id": stream.id, "session_id": turn.session_id, "stream_url": f"/v1/chat/stream/{stream.id}"
            }
            return json_response(request, body)
        result = await self.chat().wait(turn)
        if result.error is not None:
            raise APIError(result.error, result.error_status)
        return json_response(request, result.response())

    async def _read_stream(self, request: IRequest, stream: Stream, after: int = 0) -> None:
        """Write ``stream`` as SSE to this client (after the event ``after``), within the stream's reader limit."""
        self.slots.acquire(stream.id)
        try:
            reader = StreamReader(
                request,
                stream,
                self.clock,
                keepalive_seconds=self.settings.keepalive_seconds,
                max_lag_bytes=self.settings.max_reader_lag_bytes,
                after=after,
                open_streams=self.metrics.sse_streams.labels("reference"),
            )
            await reader.run()
        finally:
            self.slots.release(stream.id)

    @app.route("/v1/chat/send", methods=["POST"])
    @authorized
    async def send(self, request: IRequest, user: str) -> bytes:
        body = read_json(request)
        message = string_field(body, "message", required=True)
        turn = await self._begin(user, message, string_field(body, "session_id"))
        return await self._respond(request, turn)

    @app.route("/v1/chat/send-with-files", methods=["POST"])
    @body_limit(lambda limits: limits.max_upload_bytes)
    @authorized
    async def send_with_files(self, request: IRequest, user: str) -> bytes:
        form = read_chat_form(request, self.limits.max_file_bytes)
        if not form.message:
            raise BadRequest("message field is required")
        turn = await self._begin(user, form.message, form.session_id, form.attachments)
        return await self._respond(request, turn)

    @app.route("/v1/chat/approvals/<string:approval_id>", methods=["POST"])
    @authorized
    async def approve(self, request: IRequest, user: str, approval_id: str) -> bytes:
        body = read_json(request)
        decision = body.get("approve")
        if not isinstance(decision, bool):
            raise BadRequest("Invalid request format: field 'approve' must be true or false")
        ids = body.get("tool_call_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise BadRequest("Invalid request format: field 'tool_call_ids' must be a list of strings")
        turn = await self.chat().start_resolution(user, approval_id, decision, ids)
        return await self._respond(request, turn)

    @app.route("/v1/chat/stream/<string:stream_id>", methods=["GET"])
    @authorized
    async def attach(self, request: IRequest, user: str, stream_id: str) -> bytes:
        after = _last_event_id(request)
        chat = self.chat()
        try:
            stream = chat.streams.get(stream_id, user)
        except StreamError as e:
            # Run on another instance? Then follow it from the shared log.
            found = await chat.coordinator.follow(stream_id, user) if chat.coordinator is not None else None
            if found is None:
                raise NotFound(str(e)) from None
            stream = found
        await self._read_stream(request, stream, after)
        return b""

    @app.route("/v1/chat/stream", methods=["GET"])
    async def legacy_stream(self, request: IRequest) -> bytes:
        if not self.settings.legacy_stream_get:
            raise APIError(
                "GET /v1/chat/stream?message= is disabled, since any link could start a turn: use "
                "POST /v1/chat/send?streaming=true, or set chat.legacy_stream_get to true",
                403,
            )
        message = query_arg(request, "message") or ""
        if not message:
            raise BadRequest("message parameter is required")
        # The opt-in and the message are checked before the caller: a disabled route says so to anyone.
        user = self.identity.user_id(request)
        turn = await self._begin(user, message, query_arg(request, "session_id") or "")
        await self._read_stream(request, turn.stream)
        return b""
