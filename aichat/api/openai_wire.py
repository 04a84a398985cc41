"""What the OpenAI-compatible routes share: OpenAI's error shape (:func:`openai_errors`, above each route's
guards), the model check, SSE framing, :class:`TurnFace` (what the turn-running route classes are built
from) and ``/v1/models`` (:class:`ModelRoutes`).

Errors on these routes are ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's statuses, so
the ``openai`` SDK raises its typed errors (``BadRequestError``, ``AuthenticationError``, ``NotFoundError``,
``RateLimitError``, ``InternalServerError``...). Identity is the daemon's: a bearer token from
``auth.tokens`` (what the SDK sends as its ``api_key``) or ``X-User-ID`` from a trusted proxy.
"""

from __future__ import annotations

import functools
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from aichat.api.app import json_response, running_chat
from aichat.api.errors import APIError, from_chat
from aichat.api.identity import Identity
from aichat.api.routing import authorized
from aichat.api.sse_flow import PacedResponse
from aichat.chat.turn import ChatError, ChatService, TurnResult
from aichat.config import ChatSettings
from aichat.jsonfmt import compact
from aichat.metrics import Metrics
from aichat.sse import encode_comment

log = Logger(namespace="aichat.api")

#: OpenAI's error ``type`` for each status we answer.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}
_CODES = {401: "invalid_api_key", 409: "conflict", 429: "rate_limit_exceeded", 504: "timeout"}


class OpenAIError(APIError):
    """An error in OpenAI's shape: ``param`` names the offending field, ``code`` is OpenAI's code."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status)
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code if self.code is not None else _CODES.get(self.status),
            }
        }


def invalid(message: str, param: str) -> OpenAIError:
    """A 400 naming ``param``."""
    return OpenAIError(message, 400, param=param)


def as_openai(error: APIError) -> OpenAIError:
    if isinstance(error, OpenAIError):
        return error
    return OpenAIError(error.message, error.status, param=getattr(error, "param", None))


def turn_error(result: TurnResult) -> OpenAIError:
    """A failed turn as an OpenAI error: the upstream's 429 passes through, a timeout is 504, else 502."""
    upstream = result.upstream_error
    if upstream is not None:
        if upstream.status == 429:
            return OpenAIError(upstream.message, 429, code="rate_limit_exceeded", retry_after=upstream.retry_after)
        if upstream.code == "timeout":
            return OpenAIError(f"The model server timed out: {upstream.message}", 504)
        return OpenAIError(f"The model server failed: {upstream.message}", 502, code="upstream_error")
    return OpenAIError(result.error or "The turn failed", result.error_status)


def error_response(request: IRequest, error: OpenAIError) -> bytes:
    if error.retry_after is not None:
        request.setHeader(b"Retry-After", str(max(0, round(error.retry_after))).encode())
    body = error.body()
    request_id = getattr(request, "request_id", "")
    if request_id:
        body["error"]["request_id"] = request_id
    return json_response(request, body, error.status)


S = TypeVar("S")
P = ParamSpec("P")


def openai_errors(
    handler: Callable[Concatenate[S, IRequest, P], Awaitable[bytes]],
) -> Callable[Concatenate[S, IRequest, P], Coroutine[Any, Any, bytes]]:
    """Answer every error of ``handler`` in OpenAI's shape (a bug is a logged 500 with a generic message).

    It goes above the route's guards (``@authorized``), so a refused caller gets OpenAI's shape too."""

    @functools.wraps(handler)
    async def wrapped(self: S, request: IRequest, /, *args: P.args, **kwargs: P.kwargs) -> bytes:
        try:
            return await handler(self, request, *args, **kwargs)
        except CancelledError:
            raise
        except APIError as e:
            return error_response(request, as_openai(e))
        except ChatError as e:
            return error_response(request, as_openai(from_chat(e)))
        except Exception:
            log.failure(
                "Unhandled error in {method} {path}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("utf-8", "replace"),
            )
            return error_response(request, OpenAIError("Internal server error", 500))

    return wrapped


def check_model(chat: ChatService, body: dict[str, Any]) -> str:
    """The request's ``model``: required, and the configured one (404 ``model_not_found`` otherwise)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", "model")
    if model != chat.provider.model:
        raise OpenAIError(
            f"The model '{model}' does not exist; this server offers '{chat.provider.model}'",
            404,
            param="model",
            code="model_not_found",
        )
    return model


def flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean", name)
    return value


def short_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


#: What a face's stream ends with when its client falls too far behind: ``(data, event name)`` for a message.
LastWords = Callable[[str], tuple[Any, str | None]]


class EventStream(PacedResponse):
    """An SSE response of the OpenAI routes: ``data:`` frames (with ``event:`` when named), ``: ping``
    keep-alives, and nothing written once the client has gone.

    It is paced by its client (:class:`~aichat.api.sse_flow.PacedResponse`): while the transport is paused,
    frames wait here, and past ``max_lag_bytes`` of them the stream ends with the face's ``last_words`` (an
    error in its own format). The turn writing to it never waits; :meth:`flushed` waits for what is left."""

    kind = "an OpenAI stream reader"

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        keepalive_seconds: float,
        max_lag_bytes: int,
        last_words: LastWords,
        open_streams: Any = None,
    ) -> None:
        super().__init__(request, max_lag_bytes)
        #: The gauge of open SSE responses this one counts in until :meth:`close`.
        self._open_streams = open_streams
        if open_streams is not None:
            open_streams.inc()
        self._last = last_words
        self._waiting: deque[bytes] = deque()
        self._flushed: Deferred[None] = Deferred()
        self._start()

        def lost(_: object) -> None:
            self._end()

        cast(Request, request).notifyFinish().addBoth(lost)
        self._ping = LoopingCall(self._write, encode_comment("ping"))
        self._ping.clock = clock
        self._ping.start(keepalive_seconds, now=False)

    @property
    def gone(self) -> bool:
        """The client went away or was dropped: nothing more is written."""
        return self.over

    def _write(self, data: bytes) -> None:
        if not self.over and not self._paused:
            self._request.write(data)

    @staticmethod
    def _frame(data: Any, event: str | None) -> bytes:
        text = data if isinstance(data, str) else compact(data)
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {text}\n\n".encode()

    def send(self, data: Any, event: str | None = None) -> None:
        if self.over:
            return
        frame = self._frame(data, event)
        if self._paused or self._waiting:
            self._waiting.append(frame)
            self._behind(len(frame))
            return
        self._request.write(frame)

    def _pump(self) -> None:
        while self._waiting and not self._paused and not self.over:
            self._request.write(self._waiting.popleft())
        if not self._waiting and not self._flushed.called and not self._ping.running:
            self._flushed.callback(None)

    def _last_words(self, message: str) -> bytes:
        return self._frame(*self._last(message))

    def _end(self) -> None:
        super()._end()
        self._waiting.clear()
        if not self._flushed.called:
            self._flushed.callback(None)

    def close(self) -> None:
        """No more frames: stop the keep-alives (what waits is still written, see :meth:`flushed`)."""
        if self._ping.running:
            self._ping.stop()
        if self._open_streams is not None:
            self._open_streams.dec()
            self._open_streams = None

    async def flushed(self) -> None:
        """Wait until every frame is written (or the client is gone), then stop being the producer."""
        self.close()
        self._pump()
        await self._flushed
        self._unregister()


@dataclass
class TurnFace:
    """What the OpenAI-compatible routes that run turns are built from: the chat service (503 without), the
    caller's identity, the clock, the chat settings (keep-alives, reader lag) and the metrics."""

    service: ChatService | None
    identity: Identity
    clock: IReactorTime
    settings: ChatSettings
    metrics: Metrics

    def chat(self) -> ChatService:
        """The chat service, or 503."""
        return running_chat(self.service)

    def event_stream(self, request: IRequest, last_words: LastWords) -> EventStream:
        """An SSE response for ``request``, counted among the open OpenAI streams."""
        return EventStream(request, self.clock, self.settings.keepalive_seconds, self.settings.max_reader_lag_bytes,
                           last_words, self.metrics.sse_streams.labels("openai"))


@dataclass
class ModelRoutes:
    """``GET /v1/models`` and ``GET /v1/models/<id>``: the configured model."""

    service: ChatService | None
    identity: Identity
    app = Klein()

    @staticmethod
    def _model_json(chat: ChatService) -> dict[str, Any]:
        return {"id": chat.provider.model, "object": "model", "created": 0, "owned_by": chat.provider.name}

    @app.route("/v1/models", methods=["GET"])
    @openai_errors
    @authorized
    async def models(self, request: IRequest, user: str) -> bytes:
        chat = running_chat(self.service)
        return json_response(request, {"object": "list", "data": [self._model_json(chat)]})

    @app.route("/v1/models/<path:model>", methods=["GET"])
    @openai_errors
    @authorized
    async def model(self, request: IRequest, user: str, model: str) -> bytes:
        chat = running_chat(self.service)
        if model != chat.provider.model:
            raise OpenAIError(f"The model '{model}' does not exist", 404, param="model", code="model_not_found")
        return json_response(request, self._model_json(chat))
