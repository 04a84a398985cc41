"""Who is calling: a bearer token from config, or ``X-User-ID`` set by a trusted reverse proxy.

The reference trusts ``X-User-ID`` from anyone; we honour it only when the TCP peer is in
``auth.trusted_proxies`` (loopback by default, where PMM's nginx sits). Valid user ids are base-10
integers greater than zero, as the reference requires.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence

from twisted.web.iweb import IRequest

from aichat.api.errors import Unauthorized
from aichat.config import token_digest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MISSING = "Authentication required: missing or invalid user ID"
INT64_MAX = 2**63 - 1


def valid_user_id(value: str) -> bool:
    """The reference's rule (Go's ``strconv.Atoi``): a base-10 integer, optionally ``+``-signed, above zero."""
    digits = value[1:] if value.startswith("+") else value
    return digits.isascii() and digits.isdigit() and 0 < int(digits) <= INT64_MAX


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

    def __init__(self, trusted_proxies: Sequence[Network], token_digests: Mapping[str, str]) -> None:
        self._trusted = tuple(trusted_proxies)
        self._digests = dict(token_digests)

    def trusted(self, request: IRequest) -> bool:
        address = peer_address(request)
        return address is not None and any(address in network for network in self._trusted)

    def user_id(self, request: IRequest) -> str:
        authorization = request.getHeader("authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Authentication required: unsupported Authorization scheme")
            digest = token_digest(token.strip())
            for known, user in self._digests.items():
                if hmac.compare_digest(known, digest):
                    return user
            raise Unauthorized("Authentication required: invalid bearer token")
        header = request.getHeader("x-user-id")
        if header is None:
            raise Unauthorized(MISSING)
        header = header.strip()
        if not valid_user_id(header):
            raise Unauthorized(MISSING)
        if not self.trusted(request):
            raise Unauthorized("Authentication required: X-User-ID is accepted only from trusted proxies")
        return str(int(header))
