"""The chat upload form: ``multipart/form-data`` parsed by the ``multipart`` package (which treq pins).

``LimitedRequest`` hides a multipart body's content type from Twisted, which would parse the form itself
and answer a malformed one with a bare 400; the route reads the form here and reports problems as JSON.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import multipart
from twisted.web.iweb import IRequest

from aichat import content_type
from aichat.api.errors import BadRequest, UnsupportedMediaType
from aichat.store.base import Attachment, new_id


@dataclass(frozen=True)
class ChatForm:
    """What a ``send-with-files`` form holds: the ``message`` and ``session_id`` fields and the ``file*`` parts."""

    message: str = ""
    session_id: str = ""
    attachments: list[Attachment] = field(default_factory=list)


def read_chat_form(request: IRequest, max_file_bytes: int) -> ChatForm:
    """The request's form; 415 unless it is ``multipart/form-data``, 400 when it cannot be parsed, names no
    boundary, holds nothing, or a file passes ``max_file_bytes``."""
    media = content_type.of_headers(request.requestHeaders)
    if media.media != content_type.FORM_DATA:
        raise UnsupportedMediaType("Unsupported content type: send multipart/form-data")
    boundary = media.param("boundary")
    if not boundary:
        raise BadRequest("Failed to parse multipart form: the content type names no boundary")
    raw = request.content.read() if request.content is not None else b""
    fields: dict[str, str] = {}
    attachments: list[Attachment] = []
    parser = multipart.MultipartParser(
        io.BytesIO(raw), boundary, len(raw), charset="utf-8", strict=True,
        spool_limit=len(raw) + 1, memory_limit=len(raw) + 1,
    )
    try:
        for part in parser:
            if part.filename is not None and part.name.startswith("file"):
                if part.size > max_file_bytes:
                    raise BadRequest(
                        f"File too large. Maximum size is {max_file_bytes // (1024 * 1024)}MB per file."
                    )
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
    return ChatForm(fields.get("message", ""), fields.get("session_id", ""), attachments)
