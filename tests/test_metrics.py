"""The metrics each part records, read back from its own registry: model requests in the streaming
transport (retries, outcome, error class), turns by outcome with TTFT and token usage, tool calls and MCP
server state in the host, /metrics access and /health/ready over StubTreq, and the metrics settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from aichat.api import API, build_resource
from aichat.config import token_digest
from aichat.llm.openai import OpenAIProvider
from aichat.llm.provider import Completion, LLMError, Usage
from aichat.mcp import MCPHost, ServerConfig, ToolNotFound
from aichat.metrics import Metrics
from aichat.validation import ConfigError
from tests.llm.fakes import HANG, FakeHTTP, FakeResponse, sse, text_events
from tests.mcp.fakes import FakeConnection, FakeConnector, FakeProcessReactor, tool
from tests.support import inline_store, make_settings
from tests.test_chat import Script, call, make

USER = [{"role": "user", "content": "hi"}]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample's value (0 when it was never recorded)."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def model(metrics: Metrics, http: FakeHTTP, clock: Clock, **kwargs: Any) -> OpenAIProvider:
    return OpenAIProvider(reactor=clock, http=http, model="gpt-test", api_key="k" * 20, base_url="http://up/v1",
                          metrics=metrics, **kwargs)


def complete(provider: OpenAIProvider) -> Deferred[Completion]:
    return Deferred.fromCoroutine(provider.complete(USER))


LABELS = {"gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-test"}


def test_a_retried_request_counts_its_retry_and_one_ok_request() -> None:
    """A 503 then a stream: one retry, one request ending ok, its duration (the backoff included)."""
    metrics, clock = Metrics(), Clock()
    http = FakeHTTP(FakeResponse(503, b""), FakeResponse(pieces=sse(*text_events("ok"))))
    d = complete(model(metrics, http, clock))
    clock.advance(0.5)
    assert d.called
    assert value(metrics, "aichat_model_retries_total", **LABELS) == 1
    assert value(metrics, "aichat_model_requests_total", **LABELS, outcome="ok") == 1
    duration = {**LABELS, "gen_ai_operation_name": "chat", "error_type": ""}
    assert value(metrics, "gen_ai_client_operation_duration_seconds_count", **duration) == 1
    assert value(metrics, "gen_ai_client_operation_duration_seconds_sum", **duration) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("outcomes", "advance", "error_class"),
    [
        ([FakeResponse(400, b'{"error":{"message":"bad"}}')], 0, "status"),
        ([ResponseNeverReceived([Failure(ConnectionRefusedError())])] * 3, 2, "connection"),
        ([HANG], 60, "timeout"),
    ],
)
def test_failed_requests_are_counted_by_error_class(outcomes: list[Any], advance: float, error_class: str) -> None:
    """A status error, connection errors after every attempt, and a first-byte timeout each count once."""
    metrics, clock = Metrics(), Clock()
    d = complete(model(metrics, FakeHTTP(*outcomes), clock, first_byte_timeout=60))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    clock.pump([advance / 4] * 4)
    assert failures and isinstance(failures[0].value, LLMError)
    assert value(metrics, "aichat_model_errors_total", **LABELS, error_type=error_class) == 1
    assert value(metrics, "aichat_model_requests_total", **LABELS, outcome="error") == 1
    assert sum(value(metrics, "aichat_model_errors_total", **LABELS, error_type=other)
               for other in ("timeout", "connection", "status", "other")) == 1


def test_a_cancelled_request_is_counted_as_cancelled() -> None:
    """Cancelling the caller ends the request as cancelled, not as an error."""
    metrics, clock = Metrics(), Clock()
    d = complete(model(metrics, FakeHTTP(HANG), clock))
    d.cancel()
    d.addErrback(lambda _: None)
    assert value(metrics, "aichat_model_requests_total", **LABELS, outcome="cancelled") == 1
    assert value(metrics, "aichat_model_errors_total", **LABELS, error_type="timeout") == 0


TURN = {"gen_ai_provider_name": "scripted", "gen_ai_request_model": "scripted-1"}


def test_turn_outcomes_ttft_and_live_turns(tmp_path: Path) -> None:
    """A plain answer is done, a call waiting for approval is approval_pending, a model error is error;
    time to first token is observed once per turn that streamed text; no turn is left live."""
    h = make(
        tmp_path,
        Script(["Hel", "lo"]),
        Script([], [call("c1", "everything__echo")]),
        Script([], error=LLMError("down", status=503)),
        title_generation=False,
    )
    metrics = h.service.metrics
    session = h.session()
    turns = [h.send(session, "one"), h.send(session, "two"), h.send(h.session(), "three")]
    assert [t.state.value for t in turns] == ["answered", "awaiting_approval", "failed"]
    assert value(metrics, "aichat_chat_turns_started_total") == 3
    for outcome in ("done", "approval_pending", "error"):
        assert value(metrics, "aichat_chat_turns_finished_total", outcome=outcome) == 1, outcome
        assert value(metrics, "aichat_chat_turn_duration_seconds_count", outcome=outcome) == 1
    assert value(metrics, "gen_ai_server_time_to_first_token_seconds_count", **TURN) == 1
    assert value(metrics, "aichat_chat_turns_live") == 0


def test_a_cancelled_turn_is_counted_as_cancelled(tmp_path: Path) -> None:
    """A turn cut off while the model is asked is cancelled, and no longer live."""
    h = make(tmp_path)
    hang: Deferred[Completion] = Deferred()

    async def never(*args: Any, **kwargs: Any) -> Completion:
        return await hang

    h.model.complete = never  # type: ignore[method-assign]
    turn = h.send(h.session(), "wait")
    assert value(h.service.metrics, "aichat_chat_turns_live") == 1
    assert turn.done is not None
    turn.done.cancel()
    assert value(h.service.metrics, "aichat_chat_turns_finished_total", outcome="cancelled") == 1
    assert value(h.service.metrics, "aichat_chat_turns_live") == 0


def test_token_usage_by_type(tmp_path: Path) -> None:
    """The model's usage goes into the token histogram as input and output tokens."""
    h = make(tmp_path)

    async def answer(*args: Any, on_text: Any = None, **kwargs: Any) -> Completion:
        return Completion("Hi", [], "stop", Usage(11, 5, 16), "scripted-1")

    h.model.complete = answer  # type: ignore[method-assign]
    h.send(h.session(), "count me")
    metrics = h.service.metrics
    assert value(metrics, "gen_ai_client_token_usage_sum", **TURN, gen_ai_token_type="input") == 11
    assert value(metrics, "gen_ai_client_token_usage_sum", **TURN, gen_ai_token_type="output") == 5


def host_with(metrics: Metrics, *configs: ServerConfig) -> tuple[FakeProcessReactor, FakeConnector, MCPHost]:
    reactor = FakeProcessReactor()
    connector = FakeConnector(reactor)

    def prepare(connection: FakeConnection) -> None:
        connection.tools = [tool("echo"), tool("add")]

    connector.prepare = prepare
    return reactor, connector, MCPHost(reactor, list(configs), connector=connector, metrics=metrics)


def test_tool_calls_and_server_state() -> None:
    """Calls count by server, tool and outcome (a made-up name as unknown); state, tools and restarts are
    read from the servers when scraped."""
    metrics = Metrics()
    _, connector, host = host_with(metrics, ServerConfig("a", command="x"), ServerConfig("off", command="y",
                                                                                        enabled=False))
    host.startService()
    Deferred.fromCoroutine(host.call_tool("a__echo", {"m": 1}))
    failures: list[Failure] = []
    Deferred.fromCoroutine(host.call_tool("zz__nothing", {})).addErrback(failures.append)
    assert failures and failures[0].check(ToolNotFound)
    assert value(metrics, "aichat_mcp_tool_calls_total", mcp_server="a", gen_ai_tool_name="echo", outcome="ok") == 1
    assert value(metrics, "aichat_mcp_tool_calls_total", mcp_server="unknown", gen_ai_tool_name="unknown",
                 outcome="error") == 1
    assert value(metrics, "mcp_client_operation_duration_seconds_count", mcp_method_name="tools/call",
                 mcp_server="a", gen_ai_tool_name="echo", error_type="") == 1
    assert value(metrics, "aichat_mcp_server_state", mcp_server="a", state="ready") == 1
    assert value(metrics, "aichat_mcp_server_state", mcp_server="a", state="failed") == 0
    assert value(metrics, "aichat_mcp_server_state", mcp_server="off", state="stopped") == 1
    assert value(metrics, "aichat_mcp_server_tools", mcp_server="a") == 2
    connector.connections[0].crash()
    assert value(metrics, "aichat_mcp_server_restarts_total", mcp_server="a") == 1
    assert value(metrics, "aichat_mcp_server_tools", mcp_server="a") == 0


class Client:
    """StubTreq over an API whose MCP host is given."""

    def __init__(self, tmp_path: Path, config: str = "", host: MCPHost | None = None) -> None:
        from treq.testing import StubTreq

        tmp_path.mkdir(parents=True, exist_ok=True)
        settings = make_settings(tmp_path, config)
        self.api = API(settings=settings, store=inline_store(str(tmp_path / "m.db")), clock=Clock(), mcp=host)
        self.treq: Any = StubTreq(build_resource(self.api))

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        d = self.treq.get("http://127.0.0.1" + path, headers=headers or {})
        self.treq.flush()
        response = d.result
        body = self.treq.content(response)
        self.treq.flush()
        return response.code, body.result


def test_ready_waits_for_every_enabled_server_to_settle(tmp_path: Path) -> None:
    """503 with the reason while a server is starting, 200 once it is ready; a disabled one is left out."""
    reactor = FakeProcessReactor()
    pending: Deferred[None] = Deferred()

    async def slow(config: ServerConfig) -> FakeConnection:
        await pending
        return FakeConnection(reactor, [tool("echo")])

    host = MCPHost(reactor, [ServerConfig("a", command="x"), ServerConfig("b", command="y", enabled=False)],
                   connector=slow)
    host.startService()
    client = Client(tmp_path, host=host)
    status, raw = client.get("/health/ready")
    body = json.loads(raw)
    assert (status, body["status"], body["reasons"]) == (503, "not_ready", ["MCP server a is starting"])
    assert body["mcp_servers"] == [{"name": "a", "state": "starting"}]
    pending.callback(None)
    status, raw = client.get("/health/ready")
    assert (status, json.loads(raw)["status"]) == (200, "ready")


def test_metrics_access_and_exposition(tmp_path: Path) -> None:
    """Loopback may scrape; a proxied request needs the token; a wrong token is 403; no network and no
    token is 401."""
    open_client = Client(tmp_path / "a", "metrics:\n  token: a-long-metrics-token\n")
    status, raw = open_client.get("/metrics")
    assert status == 200 and b"# TYPE aichat_chat_turns_started_total counter" in raw
    assert b"aichat_chat_approvals_pending 0.0" in raw
    assert open_client.get("/metrics", {"X-Forwarded-For": "1.2.3.4"})[0] == 401
    assert open_client.get("/metrics", {"Authorization": "Bearer wrong-token-value"})[0] == 403
    proxied = {"X-Forwarded-For": "1.2.3.4", "Authorization": "Bearer a-long-metrics-token"}
    assert open_client.get("/metrics", proxied)[0] == 200
    closed = Client(tmp_path / "b", "metrics:\n  allowed_networks: []\n")
    assert closed.get("/metrics")[0] == 401


def test_metrics_settings(tmp_path: Path) -> None:
    """The token is kept as its digest; a bad network and a short token are refused, naming the key."""
    settings = make_settings(tmp_path, "metrics:\n  allowed_networks: [10.0.0.0/8]\n  token: a-long-metrics-token\n")
    assert settings.metrics.token_digest == token_digest("a-long-metrics-token")
    assert [str(n) for n in settings.metrics.allowed_networks] == ["10.0.0.0/8"]
    assert "a-long-metrics-token" not in repr(settings)
    with pytest.raises(ConfigError) as bad:
        make_settings(tmp_path, "metrics:\n  allowed_networks: [nowhere]\n  token: short\n")
    shown = " ".join(map(str, bad.value.problems))
    assert "metrics" in shown
