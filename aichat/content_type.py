"""The one ``Content-Type`` parser: a header value as a media type and its parameters.

Every place that reads a content type (a request body's, an upstream response's, a stored attachment's)
asks :func:`parse` or :func:`of_headers` here rather than splitting at ``;`` by hand. The grammar
(``type/subtype *(; name=value)``, quoted values, case-insensitive names) is werkzeug's
``parse_options_header``. Header bytes are read as Latin-1, which cannot fail: a value that is not a
known type is refused by the caller, never decoded into an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.web.http_headers import Headers
from werkzeug.http import parse_options_header

JSON = "application/json"
FORM_DATA = "multipart/form-data"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class ContentType:
    """A parsed ``Content-Type``: the lower-cased media type (``""`` when absent) and its parameters."""

    media: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_json(self) -> bool:
        """``application/json``, or a structured ``application/*+json`` type."""
        return self.media == JSON or (self.media.startswith("application/") and self.media.endswith("+json"))

    def param(self, name: str) -> str:
        """The parameter ``name`` (names are case-insensitive), ``""`` when absent."""
        return self.params.get(name.lower(), "")


def parse(value: str | bytes | None) -> ContentType:
    """``value`` (a header value, or ``None`` for none) as a :class:`ContentType`."""
    if value is None:
        return ContentType()
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    media, params = parse_options_header(text)
    return ContentType(media.strip().lower(), {name.lower(): v for name, v in params.items()})


def of_headers(headers: Headers, *, last: bool = False) -> ContentType:
    """The ``Content-Type`` of ``headers``: the first value, or the ``last`` one (as a response's is read)."""
    values = headers.getRawHeaders(b"content-type")
    if not values:
        return ContentType()
    return parse(values[-1] if last else values[0])


__all__ = ["EVENT_STREAM", "FORM_DATA", "JSON", "ContentType", "of_headers", "parse"]
