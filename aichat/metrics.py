"""The daemon's Prometheus metrics: one :class:`Metrics` object owning its own registry.

The composition root makes one and hands it to every part that counts something; a test makes its own, so
no two daemons (or tests) share counts, and nothing is put in ``prometheus_client``'s global registry.
Names follow the OpenTelemetry semantic conventions where they define one (HTTP server, GenAI client and
server, MCP client, database client), converted to Prometheus the way the OpenTelemetry exporter converts
them (dots to underscores, the unit as a suffix, seconds throughout); the rest are ``aichat_*``. No label
takes values a client chooses: routes are templates, tools and servers come from the operator's
configuration, and anything else is a fixed word.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: OpenTelemetry's advised boundaries for durations of GenAI and MCP operations (seconds).
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
#: OpenTelemetry's advised boundaries for time to first token (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: OpenTelemetry's advised boundaries for token counts.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
#: OpenTelemetry's advised boundaries for HTTP server and database durations (seconds).
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: Chat turns run for seconds to minutes.
TURN_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

#: How a chat turn ended (``aichat_chat_turns_finished_total{outcome}``).
TURN_OUTCOMES = ("done", "error", "approval_pending", "client_tools", "cancelled")
#: The ``error_type`` of a failed model request.
MODEL_ERROR_CLASSES = ("timeout", "connection", "status", "other")
#: The ``route`` label of a request no route matched.
UNMATCHED_ROUTE = "unmatched"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerView(Protocol):
    """What the MCP collector reads of one supervised server."""

    @property
    def name(self) -> str: ...
    @property
    def restarts(self) -> int: ...
    @property
    def state_name(self) -> str: ...
    @property
    def tool_count(self) -> int: ...


class MCPServersCollector(Collector):
    """MCP servers by state, their restarts and tool counts, read from the host when scraped."""

    STATES = ("starting", "ready", "backing_off", "failed", "stopping", "stopped")

    def __init__(self) -> None:
        self.servers: Callable[[], Iterable[ServerView]] = list

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "aichat_mcp_server_state", "1 for the state each configured MCP server is in, 0 for the others",
            labels=["mcp_server", "state"],
        )
        restarts = CounterMetricFamily(
            "aichat_mcp_server_restarts", "Restarts of each MCP server since it was configured", labels=["mcp_server"]
        )
        tools = GaugeMetricFamily("aichat_mcp_server_tools", "Tools each MCP server offers now", labels=["mcp_server"])
        for server in self.servers():
            for name in self.STATES:
                state.add_metric([server.name, name], 1.0 if server.state_name == name else 0.0)
            restarts.add_metric([server.name], float(server.restarts))
            tools.add_metric([server.name], float(server.tool_count))
        yield state
        yield restarts
        yield tools

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """Every metric the daemon exports, registered in its own :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_duration = Histogram(
            "http_server_request_duration_seconds", "Duration of HTTP requests, by route template",
            ["http_request_method", "http_route", "http_response_status_code"],
            buckets=HTTP_DURATION_BUCKETS, registry=r,
        )
        self.turns_started = Counter("aichat_chat_turns_started", "Chat turns started", registry=r)
        self.turns_finished = Counter(
            "aichat_chat_turns_finished", "Chat turns finished, by outcome", ["outcome"], registry=r
        )
        self.turn_duration = Histogram(
            "aichat_chat_turn_duration_seconds", "Duration of chat turns, by outcome", ["outcome"],
            buckets=TURN_DURATION_BUCKETS, registry=r,
        )
        self.turns_live = Gauge("aichat_chat_turns_live", "Chat turns running now", registry=r)
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from a chat turn's start to the first text the model streamed",
            ["gen_ai_provider_name", "gen_ai_request_model"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens per model request as the model's usage reported them",
            ["gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.model_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of model requests (retries included), by outcome",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"],
            buckets=GENAI_DURATION_BUCKETS, registry=r,
        )
        self.model_requests = Counter(
            "aichat_model_requests", "Model requests, by outcome (ok, error, cancelled)",
            ["gen_ai_provider_name", "gen_ai_request_model", "outcome"], registry=r,
        )
        self.model_retries = Counter(
            "aichat_model_retries", "Model request attempts retried", ["gen_ai_provider_name", "gen_ai_request_model"],
            registry=r,
        )
        self.model_errors = Counter(
            "aichat_model_errors", "Failed model requests, by error class (timeout, connection, status, other)",
            ["gen_ai_provider_name", "gen_ai_request_model", "error_type"], registry=r,
        )
        self.tool_duration = Histogram(
            "mcp_client_operation_duration_seconds", "Duration of MCP tool calls",
            ["mcp_method_name", "mcp_server", "gen_ai_tool_name", "error_type"],
            buckets=GENAI_DURATION_BUCKETS, registry=r,
        )
        self.tool_calls = Counter(
            "aichat_mcp_tool_calls", "MCP tool calls, by outcome (ok, tool_error, error, cancelled)",
            ["mcp_server", "gen_ai_tool_name", "outcome"], registry=r,
        )
        self.mcp_servers = MCPServersCollector()
        r.register(self.mcp_servers)
        self.sse_streams = Gauge("aichat_sse_streams_open", "SSE responses being written now, by API", ["api"],
                                 registry=r)
        for api in ("reference", "openai"):
            self.sse_streams.labels(api)
        self.approvals_pending = Gauge(
            "aichat_chat_approvals_pending", "Tool approvals waiting for a decision (read from the store when scraped)",
            registry=r,
        )
        self.db_duration = Histogram(
            "db_client_operation_duration_seconds", "Duration of store operations, queueing included",
            ["db_system_name", "db_operation_name", "error_type"], buckets=HTTP_DURATION_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)

    def model_call(self, provider: str, model: str) -> ModelCall:
        """The counters of one model request to ``provider``'s ``model``."""
        return ModelCall(self, provider, model)


class ModelCall:
    """Records one model request: its retries, then how it ended and how long it took."""

    def __init__(self, metrics: Metrics, provider: str, model: str) -> None:
        self._metrics = metrics
        self._labels = (provider, model)

    def retried(self) -> None:
        self._metrics.model_retries.labels(*self._labels).inc()

    def ended(self, seconds: float, outcome: str, error_class: str = "") -> None:
        """``outcome`` is ok, error or cancelled; ``error_class`` one of :data:`MODEL_ERROR_CLASSES`."""
        m = self._metrics
        m.model_requests.labels(*self._labels, outcome).inc()
        if error_class:
            m.model_errors.labels(*self._labels, error_class).inc()
        error_type = error_class or ("cancelled" if outcome == "cancelled" else "")
        m.model_duration.labels("chat", *self._labels, error_type).observe(seconds)


def observe_usage(metrics: Metrics, provider: str, model: str, usage: Any) -> None:
    """Tokens of one model answer (``usage`` has ``prompt_tokens`` and ``completion_tokens``)."""
    if usage is None:
        return
    metrics.token_usage.labels(provider, model, "input").observe(usage.prompt_tokens)
    metrics.token_usage.labels(provider, model, "output").observe(usage.completion_tokens)


__all__ = ["CONTENT_TYPE", "TURN_OUTCOMES", "UNMATCHED_ROUTE", "Metrics", "ModelCall", "observe_usage"]
