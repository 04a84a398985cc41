"""Routes for operators and machines: ``GET /metrics``, ``GET /health/ready`` and ``GET /openapi.json``.

``/metrics`` is the daemon's own registry in Prometheus' text format, rendered here on the reactor (the
pending approvals are counted by the store on its thread pool first). Its guard, :func:`scrapers_only`,
opens it to peers in ``metrics.allowed_networks`` (default loopback) that did not come through a proxy,
and to anyone holding the ``metrics.token`` bearer token. ``/health/ready`` is 200 once the database
answers and every enabled MCP server has reached a final state (ready or failed), 503 with the reasons
otherwise.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from aichat.api.app import json_response, rfc3339_now
from aichat.api.contract import document_bytes
from aichat.api.errors import Forbidden, Unauthorized
from aichat.api.identity import PROXY_HEADERS, header_text, peer_address
from aichat.config import MetricsSettings, token_digest
from aichat.mcp import MCPHost
from aichat.metrics import CONTENT_TYPE, Metrics
from aichat.store.base import Store, StoreError

log = Logger(namespace="aichat.api")

#: MCP server states after which the server will not change by itself.
FINAL_STATES = frozenset({"ready", "failed"})


S = TypeVar("S", bound="ObservabilityRoutes")
P = ParamSpec("P")


def scrapers_only(
    handler: Callable[Concatenate[S, IRequest, P], Awaitable[bytes]],
) -> Callable[Concatenate[S, IRequest, P], Coroutine[Any, Any, bytes]]:
    """Pass a scraper: the ``metrics.token`` bearer token, or a direct peer in ``metrics.allowed_networks``."""

    @functools.wraps(handler)
    async def route(self: S, request: IRequest, /, *args: P.args, **kwargs: P.kwargs) -> bytes:
        settings = self.scraping
        authorization = header_text(request, b"authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            digest = token_digest(token.strip())
            if settings.token_digest and scheme.lower() == "bearer" and hmac.compare_digest(
                settings.token_digest, digest
            ):
                return await handler(self, request, *args, **kwargs)
            raise Forbidden("Metrics: the bearer token is not the metrics.token")
        address = peer_address(request)
        proxied = any(request.requestHeaders.hasHeader(name) for name in PROXY_HEADERS)
        if address is not None and not proxied and any(address in net for net in settings.allowed_networks):
            return await handler(self, request, *args, **kwargs)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="metrics"')
        raise Unauthorized("Metrics: scrape from metrics.allowed_networks or with the metrics.token bearer token")

    return route


@dataclass
class ObservabilityRoutes:
    """The metrics (for scrapers), readiness and API document routes."""

    store: Store
    host: MCPHost | None
    clock: IReactorTime
    metrics: Metrics
    #: Who may scrape ``/metrics``.
    scraping: MetricsSettings
    app = Klein()

    @app.route("/metrics", methods=["GET"])
    @scrapers_only
    async def scrape(self, request: IRequest) -> bytes:
        try:
            self.metrics.approvals_pending.set(await self.store.count_pending_approvals())
        except StoreError as e:
            log.warn("Metrics: pending approvals not counted: {error}", error=str(e))
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.metrics.render()

    @app.route("/health/ready", methods=["GET"])
    async def ready(self, request: IRequest) -> bytes:
        reasons: list[str] = []
        database = await self.store.ping()
        if not database:
            reasons.append("the database does not answer")
        servers: list[dict[str, Any]] = []
        if self.host is not None:
            for server in self.host.status():
                if not server["enabled"]:
                    continue
                servers.append({"name": server["name"], "state": server["state"]})
                if server["state"] not in FINAL_STATES:
                    reasons.append(f"MCP server {server['name']} is {server['state']}")
        body = {
            "status": "ready" if not reasons else "not_ready",
            "timestamp": rfc3339_now(self.clock),
            "database": "ok" if database else "unavailable",
            "mcp_servers": servers,
            "reasons": reasons,
        }
        return json_response(request, body, 200 if not reasons else 503)

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return document_bytes()
