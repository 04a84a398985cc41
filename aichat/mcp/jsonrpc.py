"""A transport-independent JSON-RPC 2.0 peer: outgoing requests as Deferreds, incoming requests answered.

The peer does not frame or carry bytes. A transport hands it each decoded message with
:meth:`JSONRPCPeer.message_received` (or a raw line with :meth:`JSONRPCPeer.line_received`) and gives it a
``send`` callable for outgoing messages. Every pending request is removed from the table exactly once: on
its result, its error, its timeout, its cancellation, or when the transport fails them all.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

RequestId = int | str
RequestHandler = Callable[[str, Any], Any | Awaitable[Any]]
NotificationHandler = Callable[[str, Any], None]
AbandonHandler = Callable[[RequestId, str, str], None]


class RPCError(Exception):
    """An error response: from the peer, or one we send back to it."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (JSON-RPC error {code})")
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """The ``error`` member of a response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class RequestTimeout(Exception):
    """No response arrived within the request's timeout."""

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(f"{method} timed out after {timeout:g} s")
        self.method = method
        self.timeout = timeout


class PeerGone(Exception):
    """The connection failed or closed while the request was pending (crash, overlong line, HTTP error)."""


class NotDelivered(PeerGone):
    """The request was refused before the server acted on it (unknown session, connection refused).

    Unlike a plain :class:`PeerGone`, whose request may or may not have run, it is safe to send again.
    """


class _Pending:
    __slots__ = ("deferred", "method", "timer")

    def __init__(self, deferred: Deferred[Any], method: str, timer: IDelayedCall | None) -> None:
        self.deferred = deferred
        self.method = method
        self.timer = timer


class JSONRPCPeer:
    """One side of a JSON-RPC 2.0 conversation.

    ``on_request(method, params)`` answers requests from the other side; it returns the result (or an
    awaitable of it) or raises :class:`RPCError`. Without it, every request gets -32601.
    ``on_abandon(id, method, reason)`` is told about requests we gave up on (timeout, cancel), so a protocol
    on top can notify the other side (MCP's ``notifications/cancelled``).
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[dict[str, Any]], None],
        *,
        on_request: RequestHandler | None = None,
        on_notification: NotificationHandler | None = None,
        on_abandon: AbandonHandler | None = None,
        name: str = "peer",
    ) -> None:
        self._clock = clock
        self._send = send
        self.on_request = on_request
        self.on_notification = on_notification
        self.on_abandon = on_abandon
        self.name = name
        self._next_id = 1
        self._pending: dict[RequestId, _Pending] = {}
        self._gone: Exception | None = None

    @property
    def pending_count(self) -> int:
        """How many requests await a response."""
        return len(self._pending)

    def request(self, method: str, params: Any = None, *, timeout: float | None = None) -> Deferred[Any]:
        """Send a request; the Deferred fires with its ``result`` or fails with RPCError/RequestTimeout/PeerGone.

        Cancelling the Deferred forgets the request and reports it to ``on_abandon``.
        """
        if self._gone is not None:
            return _failed(PeerGone(str(self._gone)))
        request_id = self._next_id
        self._next_id += 1

        def cancel(d: Deferred[Any]) -> None:
            if self._forget(request_id) is not None:
                self._abandoned(request_id, method, "cancelled by the client")

        deferred: Deferred[Any] = Deferred(cancel)
        timer = None
        if timeout is not None:
            timer = self._clock.callLater(timeout, self._timed_out, request_id, timeout)
        self._pending[request_id] = _Pending(deferred, method, timer)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        try:
            self._send(message)
        except Exception as e:
            self.fail_request(request_id, PeerGone(f"cannot send {method}: {e}"))
        return deferred

    def is_pending(self, request_id: RequestId) -> bool:
        """True while a request we sent still awaits its response."""
        return request_id in self._pending

    def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (no response expected); dropped once the peer is gone."""
        if self._gone is not None:
            return
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._send(message)

    def fail_request(self, request_id: RequestId, reason: Exception) -> None:
        """Fail one pending request (a transport that learns of a per-message failure, e.g. HTTP 500)."""
        pending = self._forget(request_id)
        if pending is not None:
            pending.deferred.errback(Failure(reason))

    def fail_all(self, reason: Exception) -> None:
        """Fail every pending request with ``reason`` and refuse new ones: the connection is gone."""
        if self._gone is None:
            self._gone = reason
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.deferred.errback(Failure(_copy_reason(reason)))

    def line_received(self, line: bytes) -> None:
        """Decode one framed message; a line that is not JSON is logged and skipped."""
        try:
            message = json.loads(line)
        except ValueError:
            log.warn(
                "{peer}: skipped a line that is not JSON: {line!r}",
                peer=self.name,
                line=line[:200],
            )
            return
        self.message_received(message)

    def message_received(self, message: Any) -> None:
        """Dispatch one decoded message (or a batch of them)."""
        if isinstance(message, list):
            for item in message:
                self.message_received(item)
            return
        if not isinstance(message, dict):
            log.warn("{peer}: skipped a JSON value that is not a message: {value!r}", peer=self.name, value=message)
            return
        method = message.get("method")
        if isinstance(method, str):
            if "id" in message and message["id"] is not None:
                self._request_received(message["id"], method, message.get("params"))
            elif self.on_notification is not None:
                try:
                    self.on_notification(method, message.get("params"))
                except Exception:
                    log.failure("{peer}: notification handler failed for {method}", peer=self.name, method=method)
            return
        if "id" in message and ("result" in message or "error" in message):
            self._response_received(message)
            return
        log.warn("{peer}: skipped a malformed message: {value!r}", peer=self.name, value=message)

    def _response_received(self, message: dict[str, Any]) -> None:
        request_id = message["id"]
        pending = self._forget(request_id)
        if pending is None and isinstance(request_id, str) and request_id.isdigit():
            pending = self._forget(int(request_id))
        if pending is None:
            log.debug("{peer}: response to unknown or abandoned request {id!r}", peer=self.name, id=request_id)
            return
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            code = error.get("code")
            pending.deferred.errback(
                Failure(
                    RPCError(
                        code if isinstance(code, int) else INTERNAL_ERROR,
                        str(error.get("message", "unknown error")),
                        error.get("data"),
                    )
                )
            )
        else:
            pending.deferred.callback(message["result"])

    def _request_received(self, request_id: RequestId, method: str, params: Any) -> None:
        if self.on_request is None:
            self._respond_error(request_id, RPCError(METHOD_NOT_FOUND, f"Method not found: {method}"))
            return
        try:
            outcome = self.on_request(method, params)
        except RPCError as e:
            self._respond_error(request_id, e)
            return
        except Exception:
            log.failure("{peer}: request handler failed for {method}", peer=self.name, method=method)
            self._respond_error(request_id, RPCError(INTERNAL_ERROR, "Internal error"))
            return
        if isinstance(outcome, Awaitable):
            d: Deferred[Any] = ensureDeferred(outcome)  # type: ignore[arg-type]
            d.addCallbacks(
                lambda result: self._respond(request_id, result),
                lambda failure: self._respond_failure(request_id, method, failure),
            )
        else:
            self._respond(request_id, outcome)

    def _respond(self, request_id: RequestId, result: Any) -> None:
        if self._gone is None:
            self._send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def _respond_error(self, request_id: RequestId, error: RPCError) -> None:
        if self._gone is None:
            self._send({"jsonrpc": "2.0", "id": request_id, "error": error.to_json()})

    def _respond_failure(self, request_id: RequestId, method: str, failure: Failure) -> None:
        if failure.check(RPCError):
            self._respond_error(request_id, failure.value)  # type: ignore[arg-type]
            return
        if not failure.check(CancelledError):
            log.failure("{peer}: request handler failed for {method}", failure, peer=self.name, method=method)
        self._respond_error(request_id, RPCError(INTERNAL_ERROR, "Internal error"))

    def _forget(self, request_id: RequestId) -> _Pending | None:
        pending = self._pending.pop(request_id, None)
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def _timed_out(self, request_id: RequestId, timeout: float) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        self._abandoned(request_id, pending.method, f"timed out after {timeout:g} s")
        pending.deferred.errback(Failure(RequestTimeout(pending.method, timeout)))

    def _abandoned(self, request_id: RequestId, method: str, reason: str) -> None:
        if self.on_abandon is not None and self._gone is None:
            try:
                self.on_abandon(request_id, method, reason)
            except Exception:
                log.failure("{peer}: abandon handler failed", peer=self.name)


def _failed(reason: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(reason))
    return d


def _copy_reason(reason: Exception) -> Exception:
    """A fresh exception per failed request, so tracebacks of different callers do not pile up on one."""
    try:
        return type(reason)(*reason.args)
    except Exception:
        return reason
