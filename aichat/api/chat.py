"""Chat routes: send (JSON and multipart), SSE streams, approvals; the reference's paths and shapes.

SSE frames are ``event: message`` + ``data: <StreamMessage JSON>``; a ``: ping`` comment goes out every
``chat.keepalive_seconds``. A stream is written from its first event, whenever the client connects, and the
response ends after the ``done`` or ``error`` event. A client that goes away only unsubscribes: the turn
goes on and is stored.
"""

from __future__ import annotations

import base64
import io

import multipart
from twisted.web.iweb import IRequest

from aichat.api.app import API, json_response, media_type, query_arg, read_json, string_field
from aichat.api.errors import APIError, BadRequest, NotFound, ServiceUnavailable, UnsupportedMediaType
from aichat.api.stream_reader import ReaderSlots, StreamReader
from aichat.chat.approvals import parse_command
from aichat.chat.streams import Stream, StreamError
from aichat.chat.turn import ChatError, ChatService, Turn
from aichat.store.base import Attachment, new_id


def _chat(api: API) -> ChatService:
    service: ChatService | None = api.services.get("chat")
    if service is None:
        raise ServiceUnavailable("Chat is not running")
    return service


async def _begin(
    api: API, user: str, message: str, session_id: str, attachments: list[Attachment] | None = None
) -> Turn:
    """Start the turn a chat message asks for: an approval command, or a message to the model."""
    chat = _chat(api)
    try:
        command = parse_command(message)
        if command is not None and not attachments:
            return await chat.start_resolution(user, command.request_id, command.approve)
        session, history = await chat.resume(user, session_id)
        return chat.start_message(user, session, message, attachments or [], history)
    except ChatError as e:
        raise APIError(e.message, e.status) from None


async def _respond(api: API, request: IRequest, turn: Turn) -> bytes:
    """``?streaming=true``: the stream handle at once; otherwise wait and answer the final message."""
    if query_arg(request, "streaming") == "true":
        refused = await turn.ready
        if refused is not None:
            raise APIError(refused.message, refused.status)
        stream = turn.stream
        body = {"stream_id": stream.id, "session_id": turn.session_id, "stream_url": f"/v1/chat/stream/{stream.id}"}
        return json_response(request, body)
    result = await _chat(api).wait(turn)
    if result.error is not None:
        raise APIError(result.error, result.error_status)
    return json_response(request, result.response())


def _multipart(api: API, request: IRequest) -> tuple[str, str, list[Attachment]]:
    """``message``, ``session_id`` and ``file*`` parts of a multipart/form-data body (parsed by ``multipart``)."""
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("Unsupported content type: send multipart/form-data")
    header: bytes = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
    boundary = multipart.parse_options_header(header.decode("latin-1"))[1].get("boundary", "")
    if not boundary:
        raise BadRequest("Failed to parse multipart form: the content type names no boundary")
    raw = request.content.read() if request.content is not None else b""
    limit = api.settings.limits.max_file_bytes
    fields: dict[str, str] = {}
    attachments: list[Attachment] = []
    parser = multipart.MultipartParser(
        io.BytesIO(raw), boundary, len(raw), charset="utf-8", strict=True,
        spool_limit=len(raw) + 1, memory_limit=len(raw) + 1,
    )
    try:
        for part in parser:
            if part.filename is not None and part.name.startswith("file"):
                if part.size > limit:
                    raise BadRequest(f"File too large. Maximum size is {limit // (1024 * 1024)}MB per file.")
                data = part.raw
                attachments.append(Attachment(
                    new_id(), part.filename, part.content_type or "", len(data), base64.b64encode(data).decode("ascii")
                ))
            elif part.filename is None:
                fields[part.name] = part.raw.decode("utf-8", errors="replace")
    except multipart.MultipartError as e:
        raise BadRequest(f"Failed to parse multipart form: {e.args[0] if e.args else e}") from None
    if not fields and not attachments:
        raise BadRequest("Failed to parse multipart form: no parts found")
    return fields.get("message", ""), fields.get("session_id", ""), attachments


def _last_event_id(request: IRequest) -> int:
    """The ``Last-Event-ID`` a reconnecting client sends (0 without one); 400 if it is not ours."""
    raw = request.getHeader("last-event-id")
    if raw is None or not raw.strip():
        return 0
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise BadRequest("Invalid Last-Event-ID: send back the id of an event of this stream")
    return int(text)


def register_chat(api: API) -> None:
    """The chat routes."""
    chat_settings = api.settings.chat
    slots = ReaderSlots(chat_settings.max_stream_readers)

    async def read_stream(request: IRequest, stream: Stream, after: int = 0) -> None:
        """Write ``stream`` as SSE to this client (after the event ``after``), within the stream's reader limit."""
        slots.acquire(stream.id)
        try:
            reader = StreamReader(
                request,
                stream,
                api.clock,
                keepalive_seconds=chat_settings.keepalive_seconds,
                max_lag_bytes=chat_settings.max_reader_lag_bytes,
                after=after,
                open_streams=api.metrics.sse_streams.labels("reference"),
            )
            await reader.run()
        finally:
            slots.release(stream.id)

    @api.route("/v1/chat/send", methods=["POST"])
    async def send(request: IRequest) -> bytes:
        user = api.user(request)
        body = read_json(request)
        message = string_field(body, "message", required=True)
        turn = await _begin(api, user, message, string_field(body, "session_id"))
        return await _respond(api, request, turn)

    @api.route("/v1/chat/send-with-files", methods=["POST"])
    async def send_with_files(request: IRequest) -> bytes:
        user = api.user(request)
        message, session_id, attachments = _multipart(api, request)
        if not message:
            raise BadRequest("message field is required")
        turn = await _begin(api, user, message, session_id, attachments)
        return await _respond(api, request, turn)

    @api.route("/v1/chat/approvals/<string:approval_id>", methods=["POST"])
    async def approve(request: IRequest, approval_id: str) -> bytes:
        user = api.user(request)
        body = read_json(request)
        decision = body.get("approve")
        if not isinstance(decision, bool):
            raise BadRequest("Invalid request format: field 'approve' must be true or false")
        ids = body.get("tool_call_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise BadRequest("Invalid request format: field 'tool_call_ids' must be a list of strings")
        try:
            turn = await _chat(api).start_resolution(user, approval_id, decision, ids)
        except ChatError as e:
            raise APIError(e.message, e.status) from None
        return await _respond(api, request, turn)

    @api.route("/v1/chat/stream/<string:stream_id>", methods=["GET"])
    async def attach(request: IRequest, stream_id: str) -> bytes:
        user = api.user(request)
        after = _last_event_id(request)
        chat = _chat(api)
        try:
            stream = chat.streams.get(stream_id, user)
        except StreamError as e:
            # Run on another instance? Then follow it from the shared log.
            found = await chat.coordinator.follow(stream_id, user) if chat.coordinator is not None else None
            if found is None:
                raise NotFound(str(e)) from None
            stream = found
        await read_stream(request, stream, after)
        return b""

    @api.route("/v1/chat/stream", methods=["GET"])
    async def legacy_stream(request: IRequest) -> bytes:
        if not api.settings.chat.legacy_stream_get:
            raise APIError(
                "GET /v1/chat/stream?message= is disabled, since any link could start a turn: use "
                "POST /v1/chat/send?streaming=true, or set chat.legacy_stream_get to true",
                403,
            )
        message = query_arg(request, "message") or ""
        if not message:
            raise BadRequest("message parameter is required")
        user = api.user(request)
        turn = await _begin(api, user, message, query_arg(request, "session_id") or "")
        await read_stream(request, turn.stream)
        return b""

