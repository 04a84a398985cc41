"""Server-Sent Events: an incremental decoder for streams we read and an encoder for streams we write.

The decoder follows the WHATWG event-stream rules: lines end in LF, CRLF or CR; ``field:value`` with
one optional space after the colon; lines starting with ``:`` are comments; an empty line dispatches
the event. Bytes may arrive split at any boundary, including inside a CRLF or a UTF-8 sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aichat.jsonfmt import compact


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its name (``message`` when none was given), data and optional id."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class SSETooLargeError(ValueError):
    """A single line or event grew past the decoder's limit."""


@dataclass
class SSEDecoder:
    """Turn chunks of an event stream into :class:`SSEEvent` objects.

    ``max_event_size`` bounds the bytes buffered for one line plus the data of the event being built,
    so a peer that never sends a newline cannot grow memory without bound.
    """

    max_event_size: int = 16 * 1024 * 1024
    comments: list[str] = field(default_factory=list)
    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _data_size: int = 0
    _event: str = ""
    _id: str | None = None
    _retry: int | None = None
    _pending_cr: bool = False
    _first_line: bool = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completed, in order."""
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        buffer = self._buffer + chunk
        events: list[SSEEvent] = []
        start = 0
        length = len(buffer)
        while start < length:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf != -1 else length)
            if cr != -1:
                end, next_start = cr, cr + 1
                if next_start < length and buffer[next_start : next_start + 1] == b"\n":
                    next_start += 1
                elif next_start == length:
                    self._pending_cr = True
            elif lf != -1:
                end, next_start = lf, lf + 1
            else:
                break
            event = self._line(buffer[start:end].decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = next_start
        self._buffer = buffer[start:]
        if len(self._buffer) + self._data_size > self.max_event_size:
            raise SSETooLargeError(f"event-stream line or event exceeds {self.max_event_size} bytes")
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            del self.comments[:-16]
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_size:
                raise SSETooLargeError(f"event-stream event exceeds {self.max_event_size} bytes")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            # An event without a data line is not dispatched (WHATWG); a retry is kept for the next one.
            self._event = ""
            return None
        event = SSEEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self._id,
            retry=self._retry,
        )
        self._data = []
        self._data_size = 0
        self._event = ""
        self._retry = None
        return event


def encode_event(event: str, data: Any, *, event_id: str | None = None) -> bytes:
    """Frame one event: ``event: <name>``, optional ``id:``, and ``data:`` lines, then a blank line.

    ``data`` that is not already a string is encoded as compact JSON, which never holds a newline.
    """
    text = data if isinstance(data, str) else compact(data)
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {part}" for part in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_comment(text: str) -> bytes:
    """Frame a comment line, used as a keep-alive (``: ping``)."""
    return f": {text}\n\n".encode()
