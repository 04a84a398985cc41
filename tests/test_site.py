"""The HTTP channel over a memory transport and a Clock: the request deadline (slowloris) and the JSON
answers to request lines and headers over Twisted's limits; each case holds one of the ``HTTPChannel``
internals that :class:`~aichat.api.site.APIChannel` relies on to its behaviour."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from aichat.api.site import APIChannel, APISite


class Hello(Resource):
    """Answers every request with ``hello``."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"hello"


def connect(timeout: float = 30.0) -> tuple[APIChannel, StringTransport, Clock]:
    """A channel of an :class:`APISite` on a memory transport, its timers on a Clock."""
    clock = Clock()
    site = APISite(Hello(), lambda path: 1024 * 1024, reactor=clock, request_timeout=timeout)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


def status_and_body(transport: StringTransport) -> tuple[int, dict[str, str]]:
    """The status and JSON body of the one response written."""
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_request_trickling_in_is_cut_at_the_deadline() -> None:
    """One byte every 5 s keeps Twisted's idle timer alive, but not past the request deadline: 408 JSON."""
    channel, transport, clock = connect(timeout=30)
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
        if transport.disconnecting:
            break
    assert transport.disconnecting
    status, body = status_and_body(transport)
    assert status == 408
    assert "30 seconds" in body["error"]


def test_a_body_trickling_in_is_cut_at_the_deadline() -> None:
    """The deadline covers the body too."""
    channel, transport, clock = connect(timeout=10)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(12):
        channel.dataReceived(b"a")
        clock.advance(1)
    assert status_and_body(transport)[0] == 408


def test_prompt_requests_and_keep_alive_are_unaffected() -> None:
    """A request that arrives in time is served, its deadline cancelled; the next one gets its own."""
    channel, transport, clock = connect(timeout=10)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"hello" in transport.value()
    assert channel._deadline is None
    clock.advance(9)
    transport.clear()
    channel.dataReceived(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"hello" in transport.value()
    answered = transport.value()
    clock.advance(20)
    assert transport.value() == answered  # nothing more: no 408 (a request id may hold the digits "408")


def test_a_long_request_line_is_414() -> None:
    """A request line past ``MAX_LENGTH`` is answered 414 JSON, not a bare close."""
    channel, transport, _ = connect()
    channel.dataReceived(b"GET /" + b"a" * (APIChannel.MAX_LENGTH + 10) + b" HTTP/1.1\r\n")
    assert transport.disconnecting
    status, body = status_and_body(transport)
    assert status == 414
    assert "Request line too long" in body["error"]


def test_headers_over_the_limits_are_431() -> None:
    """One header line past ``MAX_LENGTH``, too many header bytes, or too many headers: 431 JSON."""
    cases = [
        b"X-Big: " + b"b" * (APIChannel.MAX_LENGTH + 10) + b"\r\n",
        b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)),
        b"".join(b"X-H%d: v\r\n" % i for i in range(APIChannel.maxHeaders + 5)),
    ]
    for headers in cases:
        channel, transport, _ = connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert transport.disconnecting
        assert status_and_body(transport)[0] == 431


def test_a_malformed_request_is_400_json() -> None:
    """What Twisted calls a bad request is still answered as JSON."""
    channel, transport, _ = connect()
    channel.dataReceived(b"NOT-HTTP\r\n")
    status, body = status_and_body(transport)
    assert status == 400
    assert body == {"error": "Malformed HTTP request"}
