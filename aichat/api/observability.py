"""Routes for operators and machines: ``GET /metrics``, ``GET /health/ready`` and ``GET /openapi.json``.

``/metrics`` is the daemon's own registry in Prometheus' text format, rendered here on the reactor (the
pending approvals are counted by the store on its thread pool first). It is open to peers in
``metrics.allowed_networks`` (default loopback) that did not come through a proxy, and to anyone holding
the ``metrics.token`` bearer token. ``/health/ready`` is 200 once the database answers and every enabled MCP
server has reached a final state (ready or failed), 503 with the reasons otherwise.
"""

from __future__ import annotations

import hmac
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from aichat.api.app import API, json_response, rfc3339_now
from aichat.api.contract import document_bytes
from aichat.api.errors import Forbidden, Unauthorized
from aichat.api.identity import PROXY_HEADERS, header_text, peer_address
from aichat.config import token_digest
from aichat.metrics import CONTENT_TYPE
from aichat.store.base import StoreError

log = Logger(namespace="aichat.api")

#: MCP server states after which the server will not change by itself.
FINAL_STATES = frozenset({"ready", "failed"})


def scrape_allowed(api: API, request: IRequest) -> None:
    """Pass a scraper: the ``metrics.token`` bearer token, or a direct peer in ``metrics.allowed_networks``."""
    settings = api.settings.metrics
    authorization = header_text(request, b"authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        digest = token_digest(token.strip())
        if settings.token_digest and scheme.lower() == "bearer" and hmac.compare_digest(settings.token_digest, digest):
            return
        raise Forbidden("Metrics: the bearer token is not the metrics.token")
    address = peer_address(request)
    proxied = any(request.requestHeaders.hasHeader(name) for name in PROXY_HEADERS)
    if address is not None and not proxied and any(address in net for net in settings.allowed_networks):
        return
    request.setHeader(b"WWW-Authenticate", b'Bearer realm="metrics"')
    raise Unauthorized("Metrics: scrape from metrics.allowed_networks or with the metrics.token bearer token")


def register_observability(api: API) -> None:
    """The metrics, readiness and API document routes."""
    document = document_bytes()

    @api.route("/metrics", methods=["GET"])
    async def metrics(request: IRequest) -> bytes:
        scrape_allowed(api, request)
        try:
            api.metrics.approvals_pending.set(await api.store.count_pending_approvals())
        except StoreError as e:
            log.warn("Metrics: pending approvals not counted: {error}", error=str(e))
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return api.metrics.render()

    @api.route("/health/ready", methods=["GET"])
    async def ready(request: IRequest) -> bytes:
        reasons: list[str] = []
        database = await api.store.ping()
        if not database:
            reasons.append("the database does not answer")
        servers: list[dict[str, Any]] = []
        host = api.services.get("mcp")
        if host is not None:
            for server in host.status():
                if not server["enabled"]:
                    continue
                servers.append({"name": server["name"], "state": server["state"]})
                if server["state"] not in FINAL_STATES:
                    reasons.append(f"MCP server {server['name']} is {server['state']}")
        body = {
            "status": "ready" if not reasons else "not_ready",
            "timestamp": rfc3339_now(api.clock),
            "database": "ok" if database else "unavailable",
            "mcp_servers": servers,
            "reasons": reasons,
        }
        return json_response(request, body, 200 if not reasons else 503)

    @api.route("/openapi.json", methods=["GET"])
    def openapi(request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return document
