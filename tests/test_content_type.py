"""The one Content-Type parser: media types lower-cased, parameters by case-insensitive name, quoted values,
JSON and structured ``+json`` types, and headers read from their first or last value."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from aichat import content_type
from aichat.content_type import ContentType, of_headers, parse


def test_media_type_and_parameters() -> None:
    """Type and subtype are lower-cased and stripped; parameter names are case-insensitive, values kept."""
    parsed = parse(b"Multipart/Form-Data ; Boundary=\"a b\"; charset=UTF-8")
    assert parsed.media == content_type.FORM_DATA
    assert (parsed.param("boundary"), parsed.param("BOUNDARY"), parsed.param("charset")) == ("a b", "a b", "UTF-8")
    assert parsed.param("missing") == ""
    assert parse("text/event-stream").media == content_type.EVENT_STREAM


def test_absent_and_odd_values() -> None:
    """No header, an empty one, or one of bytes that are not ASCII never raise: they are just not a known type."""
    assert parse(None) == ContentType()
    assert parse("").media == ""
    assert parse(";").media == ""
    assert parse(b"\xff\xfe/\x00").media not in ("application/json", content_type.FORM_DATA)
    assert parse("application/json, text/plain").is_json is False


def test_json_types() -> None:
    """``application/json`` with any parameters, and ``application/*+json``, are JSON; nothing else is."""
    assert parse("application/json; charset=utf-8").is_json
    assert parse("APPLICATION/JSON").is_json
    assert parse("application/merge-patch+json").is_json
    assert not parse("text/json").is_json
    assert not parse("application/jsonx").is_json
    assert not parse("").is_json


def test_headers_first_or_last_value() -> None:
    """A request's type is its first value; a response's is read from its last, as the upstream client does."""
    headers = Headers({b"content-type": [b"application/json", b"text/event-stream; charset=utf-8"]})
    assert of_headers(headers).media == "application/json"
    assert of_headers(headers, last=True).media == "text/event-stream"
    assert of_headers(Headers()) == ContentType()
