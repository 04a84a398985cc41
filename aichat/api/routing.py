"""How routes are written and mounted: route classes with class-bound Klein apps, their guards and limits.

A route class is a dataclass whose constructor takes what its handlers use (the store, the chat service,
the identity, settings records), with a class-bound ``app = Klein()`` as in Klein's ``nonglobalstate``
example; :meth:`aichat.api.app.API.mount` copies each instance's rules into the one application, so the
whole API keeps one URL map (one 404/405 path, one error handler, one route template per request for the
metrics and the body schemas).

Guards are decorators between ``@app.route`` and the handler, in the order they are checked:

- :func:`authorized` resolves the caller (a bearer token, or ``X-User-ID`` from a trusted proxy) and hands
  the handler its user id after the request, as tahoe-lafs's ``_authorized_route`` does; 401 without one;
- :func:`operator_only` passes an operator (an ``auth.admin_tokens`` token, or a direct local call), 401/403
  otherwise;
- :func:`body_limit` declares a body limit other than ``limits.max_body_bytes`` for its route; the channel
  enforces it while the body arrives (see :class:`BodyLimits`).
"""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from klein import Klein
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from aichat.api.identity import Identity
from aichat.config import LimitSettings

P = ParamSpec("P")
T = TypeVar("T")


class Routes(Protocol):
    """A route class instance: its class's ``app = Klein()``, which Klein binds to the instance when read."""

    @property
    def app(self) -> Klein: ...


class Guarded(Protocol):
    """A route class whose handlers know who is calling."""

    @property
    def identity(self) -> Identity: ...


G = TypeVar("G", bound=Guarded)


def authorized(
    handler: Callable[Concatenate[G, IRequest, str, P], Awaitable[T]],
) -> Callable[Concatenate[G, IRequest, P], Coroutine[Any, Any, T]]:
    """Call ``handler(self, request, user, ...)`` with the caller's user id, or answer 401."""

    @functools.wraps(handler)
    async def route(self: G, request: IRequest, /, *args: P.args, **kwargs: P.kwargs) -> T:
        user = self.identity.user_id(request)
        return await handler(self, request, user, *args, **kwargs)

    return route


def operator_only(
    handler: Callable[Concatenate[G, IRequest, P], Awaitable[T]],
) -> Callable[Concatenate[G, IRequest, P], Coroutine[Any, Any, T]]:
    """Call ``handler`` for an operator only: 401 without an identity, 403 for a user."""

    @functools.wraps(handler)
    async def route(self: G, request: IRequest, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.identity.operator(request)
        return await handler(self, request, *args, **kwargs)

    return route


#: Which of the ``limits`` settings is a route's body limit.
LimitOf = Callable[[LimitSettings], int]
#: The attribute :func:`body_limit` sets on a handler (Klein's and ``functools.wraps``' wrappers copy it).
LIMIT_ATTRIBUTE = "aichat_body_limit"

F = TypeVar("F", bound=Callable[..., Any])


def body_limit(limit_of: LimitOf) -> Callable[[F], F]:
    """Declare the route's body limit as one of the ``limits`` settings (``limits.max_body_bytes`` without)."""

    def declare(handler: F) -> F:
        setattr(handler, LIMIT_ATTRIBUTE, limit_of)
        return handler

    return declare


def declared_limit(handler: Callable[..., Any]) -> LimitOf | None:
    """The body limit :func:`body_limit` declared on ``handler``, if any."""
    found: LimitOf | None = getattr(handler, LIMIT_ATTRIBUTE, None)
    return found


class BodyLimits:
    """The body limit of each request target: the declared limit of the route its path matches, else the default.

    The channel asks before the body is read (:meth:`~aichat.api.site.APIChannel.request_target`), so the
    answer depends on the path alone; a path that is not UTF-8 or matches no limited route gets the default.
    """

    def __init__(self, default: int) -> None:
        self.default = default
        self._map = Map(merge_slashes=False)
        self._limits: dict[str, int] = {}

    def declare(self, rule: str, limit: int) -> None:
        """Requests whose path matches ``rule`` (a Klein rule) may send up to ``limit`` body bytes."""
        name = f"limit{len(self._limits)}"
        self._limits[name] = limit
        self._map.add(Rule(rule, endpoint=name))

    def __call__(self, target: bytes) -> int:
        if not self._limits:
            return self.default
        raw = target.split(b"?", 1)[0]
        try:
            path = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
            name, _ = self._map.bind("localhost").match(path)
        except (UnicodeDecodeError, HTTPException):
            return self.default
        return self._limits[str(name)]


class _Mounted:
    """A rule's endpoint in the API's app: the route instance's handler, called through its bound app."""

    def __init__(self, bound: Klein, endpoint: str) -> None:
        self._bound = bound
        self._endpoint = endpoint
        original = bound.endpoints[endpoint]
        #: Klein moves this many path segments to ``prepath`` before calling the handler.
        self.segment_count: int = getattr(original, "segment_count", 0)
        self.__name__ = getattr(original, "__name__", endpoint)

    def __call__(self, _instance: object, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        return self._bound.execute_endpoint(self._endpoint, request, *args, **kwargs)


def mount(app: Klein, routes: Routes, limits: BodyLimits, settings: LimitSettings) -> list[str]:
    """Add every rule of ``routes``' class-bound app to ``app``; return the rules mounted."""
    bound = routes.app
    prefix = type(routes).__name__
    mounted = []
    for rule in bound.url_map.iter_rules():
        endpoint = str(rule.endpoint)
        copy = rule.empty()
        copy.endpoint = f"{prefix}.{endpoint}"
        app.endpoints[copy.endpoint] = _Mounted(bound, endpoint)
        app.url_map.add(copy)
        limit_of = declared_limit(bound.endpoints[endpoint])
        if limit_of is not None:
            limits.declare(rule.rule, limit_of(settings))
        mounted.append(rule.rule)
    return mounted


__all__ = ["BodyLimits", "Guarded", "Routes", "authorized", "body_limit", "mount", "operator_only"]
