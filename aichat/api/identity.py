"""Who is calling: a bearer token from config, or ``X-User-ID`` set by a trusted reverse proxy.

The reference trusts ``X-User-ID`` from anyone; we honour it only when the TCP peer is in
``auth.trusted_proxies`` (loopback by default, where PMM's nginx sits). Valid user ids are base-10
integers greater than zero, as the reference requires.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Collection, Mapping, Sequence

from twisted.web.iweb import IRequest

from aichat.api.errors import Forbidden, Unauthorized
from aichat.config import token_digest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MISSING = "Authentication required: missing or invalid user ID"
#: Headers a reverse proxy adds; a loopback request carrying one came through a proxy, not from an operator.
PROXY_HEADERS = (b"x-user-id", b"forwarded", b"x-forwarded-for", b"x-real-ip")
INT64_MAX = 2**63 - 1


def parse_user_id(value: str) -> str | None:
    """The reference's rule (Go's ``strconv.Atoi``): a base-10 integer, optionally ``+``-signed, above zero.

    Returns the id in canonical form (``"+007"`` is ``"7"``), or ``None``. The length is checked before the
    conversion: Python refuses to convert integers of over 4,300 digits.
    """
    digits = (value[1:] if value.startswith("+") else value).lstrip("0")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        return None
    number = int(digits)
    return str(number) if 0 < number <= INT64_MAX else None


def header_text(request: IRequest, name: bytes) -> str | None:
    """The first value of header ``name`` as ASCII text; ``""`` when it holds other bytes, ``None`` if absent.

    Identity headers are ASCII by their grammar; anything else is treated as an invalid value, never decoded.
    """
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    raw: bytes = values[0]
    return raw.decode("ascii") if raw.isascii() else ""


def peer_address(request: IRequest) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The TCP peer's address, or ``None`` for non-IP transports."""
    host = getattr(request.getClientAddress(), "host", None)
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Identity:
    """Resolves the user of a request or raises :class:`Unauthorized`."""

    def __init__(
        self,
        trusted_proxies: Sequence[Network],
        token_digests: Mapping[str, str],
        admin_digests: Collection[str] = (),
    ) -> None:
        self._trusted = tuple(trusted_proxies)
        self._digests = dict(token_digests)
        self._admins = tuple(admin_digests)

    def operator(self, request: IRequest) -> None:
        """Pass an operator's request, or raise 401/403.

        An operator holds an ``auth.admin_tokens`` bearer token, or calls from this machine directly: a
        loopback peer whose request carries none of the headers a reverse proxy adds (``X-User-ID``,
        ``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``), so a user behind the local proxy is not one.
        """
        authorization = header_text(request, b"authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            digest = token_digest(token.strip())
            if scheme.lower() == "bearer" and any(hmac.compare_digest(known, digest) for known in self._admins):
                return
            raise Forbidden("This is an operator action: it needs an auth.admin_tokens bearer token")
        address = peer_address(request)
        proxied = any(request.requestHeaders.hasHeader(name) for name in PROXY_HEADERS)
        if address is not None and address.is_loopback and not proxied:
            return
        if request.requestHeaders.hasHeader(b"x-user-id"):
            raise Forbidden("This is an operator action: it needs an auth.admin_tokens bearer token")
        raise Unauthorized("Authentication required: an operator action needs an auth.admin_tokens bearer token")

    def trusted(self, request: IRequest) -> bool:
        address = peer_address(request)
        return address is not None and any(address in network for network in self._trusted)

    def user_id(self, request: IRequest) -> str:
        authorization = header_text(request, b"authorization")
        if authorization == "" and request.requestHeaders.hasHeader(b"authorization"):
            raise Unauthorized("Authentication required: invalid Authorization header")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Authentication required: unsupported Authorization scheme")
            digest = token_digest(token.strip())
            for known, owner in self._digests.items():
                if hmac.compare_digest(known, digest):
                    return owner
            raise Unauthorized("Authentication required: invalid bearer token")
        header = header_text(request, b"x-user-id")
        if header is None:
            raise Unauthorized(MISSING)
        user = parse_user_id(header.strip())
        if user is None:
            raise Unauthorized(MISSING)
        if not self.trusted(request):
            raise Unauthorized("Authentication required: X-User-ID is accepted only from trusted proxies")
        return user
