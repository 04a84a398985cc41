"""A scripted OpenAI Chat Completions server on a real port, for tests and benchmarks.

It speaks the wire format exactly: ``POST /v1/chat/completions`` (also ``/chat/completions``) answers a
``stream: true`` request with ``text/event-stream`` chunks (``data: {chat.completion.chunk}``, a blank line
after each, ``data: [DONE]`` at the end; the usage chunk, with empty ``choices``, only when the request set
``stream_options.include_usage``) and any other request with one ``chat.completion`` JSON object. Errors
are ``{"error": {"message", "type", "param", "code"}}``. ``GET /v1/models`` lists the model.

In-process use (trial)::

    upstream = Upstream(reactor)
    upstream.listen()                           # 127.0.0.1, a free port (or: await upstream.start())
    upstream.push(text_stream(["Hel", "lo"], delay=0.01), error_reply(429, "slow down", retry_after=1))
    ... point the client at upstream.base_url ...
    upstream.requests[0].body["messages"]       # what was received, in order
    await upstream.stop()                       # also cuts stalled connections

``upstream.requests[n].closed`` fires with ``"finished"`` or ``"lost"`` (the client went away), so a test
can see that a cancellation reached the server.

Each request takes the next :class:`Script` from the queue (``push``); when the queue is empty the
``responder`` (a callable from the request's JSON body to a Script) answers: by default :func:`echo`.
A Script is a list of steps run in order, then its ``body`` if any, then the end of the response:

- :class:`Send` ``(data)``: one event, ``data: <compact JSON or the string>`` and a blank line;
- :class:`Event` ``(name, data)``: one named event, ``event: <name>`` then ``data: <compact JSON>``;
- :class:`Raw` ``(bytes)``: bytes written as they are (garbage lines, comments, half events);
- :class:`Sleep` ``(seconds)``: a pause on the reactor (before the first write, headers wait too);
- :class:`SendHeaders`: send the status and headers now;
- :class:`Reset`: abort the connection with a TCP RST (before any write: no response at all);
- :class:`Drop`: close the connection in order (FIN) without ending the response: a chunked body loses its
  final empty chunk, as llama.cpp's streams do when it interrupts one;
- :class:`Stall`: send nothing more and keep the connection open until the client leaves.

``Upstream(rejects=strict_server)`` first checks each request as real servers do and answers what they
would refuse with their error (see :func:`strict_server`: llama.cpp's 500 for an assistant ``content`` of
``null``, OpenAI's 400s), whatever was queued.

Builders make the usual scripts: :func:`text_stream`, :func:`tool_stream` (calls split across deltas by
``index``, interleaved for parallel calls, optionally repeating id and name on every delta as llama.cpp
does), :func:`error_reply` (status, OpenAI error body, optional ``Retry-After``) and :func:`chunk`.
``script.plus(Reset())`` appends steps, e.g. a reset in the middle of a stream. For a non-streaming
request the same script is answered with one object built from its chunks (sleeps, resets and stalls
still happen).

As a process, for benchmarks and end-to-end tests of the daemon::

    python -m tests.upstream --port 8089 [--host H] [--chunks N] [--delay S] [--first-delay S] [--model M]
                             [--api-key KEY]

prints ``listening on http://127.0.0.1:<port>/v1`` once ready and answers every request with
:func:`echo`: the mock model's tool calls when the last user message has ``call <tool> {json}`` lines
(see ``aichat.llm.mock``), a summary after tool results, otherwise ``Echo: <last user text>`` in word
deltas (exactly N deltas, words repeated, with ``--chunks N``), ``--delay`` seconds apart, the first after
``--first-delay``. With ``--api-key`` other bearer tokens get a 401. Run this way it keeps no record of the
requests (``Upstream(record=False)``), so a long benchmark does not grow its heap.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

MODEL = "test-model"


@dataclass(frozen=True)
class Send:
    """One event: ``data: <data>`` then a blank line; a dict or list is sent as compact JSON."""

    data: Any


@dataclass(frozen=True)
class Event:
    """One named event: ``event: <name>``, ``data: <compact JSON>``, a blank line (Anthropic's framing)."""

    name: str
    data: Any


@dataclass(frozen=True)
class Raw:
    """Bytes written exactly as given."""

    data: bytes


@dataclass(frozen=True)
class Sleep:
    """Wait before the next step."""

    seconds: float


@dataclass(frozen=True)
class SendHeaders:
    """Send the status line and headers before any body byte."""


@dataclass(frozen=True)
class Reset:
    """Abort the connection with a TCP reset."""


@dataclass(frozen=True)
class Drop:
    """Close the connection cleanly without finishing the response (no final chunk)."""


@dataclass(frozen=True)
class Stall:
    """Send nothing more; keep the connection open until the client goes away."""


Step = Send | Event | Raw | Sleep | SendHeaders | Reset | Drop | Stall


@dataclass(frozen=True)
class Script:
    """How the upstream answers one request."""

    steps: list[Step] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    body: bytes | None = None

    def plus(self, *steps: Step) -> Script:
        """This script with ``steps`` appended."""
        return replace(self, steps=[*self.steps, *steps])


@dataclass
class ReceivedRequest:
    """One request as the upstream saw it; ``closed`` fires with ``"finished"`` or ``"lost"``."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any
    closed: Deferred[str] = field(default_factory=Deferred)
    outcome: str | None = None


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    model: str = MODEL,
    completion_id: str = "chatcmpl-test",
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; with ``usage`` and no delta, the final usage chunk (empty choices)."""
    document: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_test",
    }
    if delta is None and usage is not None:
        document["choices"] = []
    else:
        document["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    document["usage"] = usage
    return document


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def text_stream(
    parts: Iterable[str],
    *,
    delay: float = 0.0,
    first_delay: float = 0.0,
    usage: dict[str, int] | None = None,
    finish_reason: str | None = "stop",
    done: bool = True,
    model: str = MODEL,
) -> Script:
    """A streamed text answer: a role chunk, one chunk per part (``delay`` apart, the first after
    ``first_delay``), a finish chunk, the usage chunk and ``[DONE]``; ``done=False`` stops after the
    parts (for a reset or stall to follow)."""
    parts = list(parts)
    steps: list[Step] = []
    if first_delay:
        steps.append(Sleep(first_delay))
    steps.append(Send(chunk({"role": "assistant", "content": ""}, model=model)))
    for n, part in enumerate(parts):
        if delay and n:
            steps.append(Sleep(delay))
        steps.append(Send(chunk({"content": part}, model=model)))
    if done:
        steps.append(Send(chunk({}, finish_reason=finish_reason, model=model)))
        steps.append(Send(chunk(usage=usage or _usage(7, len(parts)), model=model)))
        steps.append(Send("[DONE]"))
    return Script(steps)


def tool_stream(
    calls: Iterable[tuple[str, str, str]],
    *,
    pieces: int = 3,
    repeat_id_and_name: bool = False,
    text: str | None = None,
    delay: float = 0.0,
    usage: dict[str, int] | None = None,
    model: str = MODEL,
) -> Script:
    """Tool calls ``(id, name, arguments)`` streamed as OpenAI does: the first delta of each call has its
    index, id, type and name with empty arguments, then the arguments in ``pieces`` fragments. Several
    calls are interleaved fragment by fragment. ``text`` is streamed before them."""
    calls = list(calls)
    steps: list[Step] = [Send(chunk({"role": "assistant", "content": None}, model=model))]
    if text is not None:
        steps.append(Send(chunk({"content": text}, model=model)))

    def head(index: int) -> dict[str, Any]:
        call_id, name, _ = calls[index]
        return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}

    fragments: list[list[dict[str, Any]]] = []
    for index, (_, _, arguments) in enumerate(calls):
        size = max(1, -(-len(arguments) // pieces))
        pieces_of = [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]
        entries = [head(index)]
        for piece in pieces_of:
            entry: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
            if repeat_id_and_name:
                entry = head(index)
                entry["function"]["arguments"] = piece
            entries.append(entry)
        fragments.append(entries)
    for round_ in range(max((len(f) for f in fragments), default=0)):
        for entries in fragments:
            if round_ < len(entries):
                if delay:
                    steps.append(Sleep(delay))
                steps.append(Send(chunk({"tool_calls": [entries[round_]]}, model=model)))
    steps.append(Send(chunk({}, finish_reason="tool_calls", model=model)))
    steps.append(Send(chunk(usage=usage or _usage(11, 5 * len(calls)), model=model)))
    steps.append(Send("[DONE]"))
    return Script(steps)


def error_reply(
    status: int,
    message: str,
    *,
    type: str = "server_error",
    code: str | None = None,
    retry_after: str | float | None = None,
) -> Script:
    """An error answer with OpenAI's JSON error body and, optionally, ``Retry-After``."""
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return Script([], status=status, headers=headers, body=json.dumps(body).encode())


#: The error body llama-cpp-python 0.3.36 answers (with status 500) to an assistant message whose
#: ``content`` is ``null``, as seen from the real server (shortened to two of its seven validation errors).
LLAMA_NULL_CONTENT = (
    "7 validation errors:\n"
    "  {{'type': 'literal_error', 'loc': ('body', 'messages', {n}, 'ChatCompletionRequestSystemMessage', 'role'), "
    "'msg': \"Input should be 'system'\", 'input': 'assistant', 'ctx': {{'expected': \"'system'\"}}}}\n"
    "  {{'type': 'string_type', 'loc': ('body', 'messages', {n}, 'ChatCompletionRequestAssistantMessage', "
    "'content'), 'msg': 'Input should be a valid string', 'input': None}}\n\n"
    '  File "/opt/llama/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in '
    "create_chat_completion\n    POST /v1/chat/completions"
)


def strict_server(body: Any) -> Script | None:
    """The error a real server answers to ``body``, or ``None`` when every server we know accepts it:

    - an assistant message whose ``content`` is not a string: llama-cpp-python's 500 (its pydantic
      validation text, with a traceback line naming a file on the server); OpenAI accepts ``null`` only
      beside tool calls, and refuses an assistant message with neither content nor tool calls (400);
    - ``tool_choice`` or ``parallel_tool_calls`` without ``tools``: OpenAI's 400.
    """
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if not isinstance(content, str):
            return error_reply(500, LLAMA_NULL_CONTENT.format(n=n), type="internal_server_error")
        if not content and not message.get("tool_calls"):
            return error_reply(
                400,
                f"Invalid 'messages[{n}]': an assistant message must have 'content' or 'tool_calls'.",
                type="invalid_request_error",
            )
    if not body.get("tools"):
        for option in ("tool_choice", "parallel_tool_calls"):
            if option in body:
                return error_reply(
                    400,
                    f"Invalid value for '{option}': '{option}' is only allowed when 'tools' are specified.",
                    type="invalid_request_error",
                )
    return None


def _as_completion(script: Script) -> Script:
    """The non-streaming answer built from a script's chunks."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish_reason = None
    usage = None
    model = MODEL
    other: list[Step] = []
    for step in script.steps:
        if isinstance(step, Send):
            if not isinstance(step.data, dict):
                continue
            model = step.data.get("model", model)
            usage = step.data.get("usage") or usage
            for choice in step.data.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    content.append(delta["content"])
                for fragment in delta.get("tool_calls") or ():
                    call = calls.setdefault(
                        fragment["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                    call["id"] = call["id"] or fragment.get("id")
                    function = fragment.get("function") or {}
                    call["function"]["name"] = call["function"]["name"] or function.get("name", "")
                    call["function"]["arguments"] += function.get("arguments", "")
                finish_reason = choice.get("finish_reason") or finish_reason
        elif not isinstance(step, Raw):
            other.append(step)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None, "refusal": None}
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    document = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }
    return Script(other, headers={"Content-Type": "application/json"}, body=json.dumps(document).encode())


def echo(chunks: int = 0, delay: float = 0.0, first_delay: float = 0.0, model: str = MODEL) -> Callable[[Any], Script]:
    """The default responder: the mock model's tool calls and summaries, otherwise ``Echo: <text>``."""
    from aichat.llm.mock import plan_reply, text_of, words
    from aichat.llm.tools import specs_from_openai

    def respond(body: Any) -> Script:
        messages = body.get("messages") if isinstance(body, dict) else None
        messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        reply = plan_reply(messages, None if tools is None else specs_from_openai(tools))
        if reply.tool_calls:
            calls = [(c.id, c.name, c.arguments) for c in reply.tool_calls]
            return tool_stream(calls, delay=delay, model=model)
        if messages and messages[-1].get("role") == "tool":
            text = reply.text
        else:
            last_user: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
            text = f"Echo: {text_of(last_user.get('content'))}"
        parts = words(text) or [""]
        if chunks > 0:
            parts = [parts[n % len(parts)] for n in range(chunks)]
        return text_stream(parts, delay=delay, first_delay=first_delay, model=model)

    return respond


class _Run:
    """Play one script on one request."""

    def __init__(self, upstream: Upstream, request: Request, script: Script, record: ReceivedRequest) -> None:
        self._upstream = upstream
        self._request = request
        self._script = script
        self._record = record
        self._steps = deque(script.steps)
        self._call: IDelayedCall | None = None
        self._over = False
        self._include_usage = bool(
            isinstance(record.body, dict)
            and isinstance(record.body.get("stream_options"), dict)
            and record.body["stream_options"].get("include_usage")
        )
        request.setResponseCode(script.status)
        for name, value in script.headers.items():
            request.setHeader(name, value)
        if script.headers.get("Content-Type", "").startswith("text/event-stream"):
            request.setHeader("Cache-Control", "no-cache")
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: Failure | None) -> None:
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._upstream._running.discard(self)
        self._record.outcome = "lost" if isinstance(result, Failure) else "finished"
        self._record.closed.callback(self._record.outcome)

    def run(self) -> None:
        self._call = None
        while self._steps and not self._over:
            step = self._steps.popleft()
            if isinstance(step, Sleep):
                self._call = self._upstream.reactor.callLater(step.seconds, self.run)
                return
            if isinstance(step, Stall):
                return
            if isinstance(step, Reset):
                self.reset()
                return
            if isinstance(step, Drop):
                self.drop()
                return
            if isinstance(step, SendHeaders):
                self._request.write(b"")
            elif isinstance(step, Raw):
                self._request.write(step.data)
            elif isinstance(step, Event):
                text = json.dumps(step.data, separators=(",", ":"))
                self._request.write(f"event: {step.name}\ndata: {text}\n\n".encode())
            elif isinstance(step, Send):
                data = step.data
                if isinstance(data, dict) and "usage" in data and not self._include_usage:
                    if not data.get("choices"):
                        continue
                    data = {key: value for key, value in data.items() if key != "usage"}
                text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
                self._request.write(f"data: {text}\n\n".encode())
        if self._over:
            return
        if self._script.body is not None:
            self._request.setHeader("Content-Length", str(len(self._script.body)))
            self._request.write(self._script.body)
        self._request.finish()

    def drop(self) -> None:
        """Close the connection in order, leaving the response unfinished."""
        transport: Any = self._request.channel.transport
        transport.loseConnection()

    def reset(self) -> None:
        """Abort with RST (SO_LINGER 0), as a crashed or killed upstream does."""
        transport: Any = self._request.channel.transport
        handle = transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abortConnection()

    def stop(self) -> None:
        """Cut the connection at upstream shutdown."""
        if not self._over:
            transport: Any = self._request.channel.transport
            if transport is not None:
                transport.abortConnection()


class _Root(Resource):
    isLeaf = True

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self._upstream = upstream

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        raw = request.content.read() if request.content is not None else b""
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = ReceivedRequest(method, path, headers, raw, body)
        if self._upstream.record:
            self._upstream.requests.append(record)
        upstream = self._upstream
        if upstream.wire is not None:
            script = upstream.wire.route(upstream, method, request.uri.decode("latin-1"), headers, body)
            run = _Run(upstream, request, script, record)
            upstream._running.add(run)
            run.run()
            return NOT_DONE_YET
        if upstream.api_key is not None and headers.get("authorization") != f"Bearer {upstream.api_key}":
            script = error_reply(
                401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key"
            )
        elif method == "GET" and path.rstrip("/") in ("/v1/models", "/models"):
            listing = {"object": "list", "data": [{"id": upstream.model, "object": "model", "owned_by": "test"}]}
            script = Script([], headers={"Content-Type": "application/json"}, body=json.dumps(listing).encode())
        elif path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            script = error_reply(404, f"Unknown request URL: {method} {path}.", type="invalid_request_error")
        elif method != "POST":
            script = error_reply(405, "Method not allowed.", type="invalid_request_error")
        elif not isinstance(body, dict):
            script = error_reply(400, "We could not parse the JSON body of your request.", type="invalid_request_error")
        else:
            refusal = upstream.rejects(body) if upstream.rejects is not None else None
            if refusal is not None:
                script = refusal
            else:
                script = upstream.scripts.popleft() if upstream.scripts else upstream.responder(body)
            if not body.get("stream") and script.body is None:
                script = _as_completion(script)
        run = _Run(upstream, request, script, record)
        upstream._running.add(run)
        run.run()
        return NOT_DONE_YET


class Wire(Protocol):
    """Another wire format than OpenAI's (see :mod:`tests.upstream_claude`, :mod:`tests.upstream_gemini`):
    checks a request's path, key and body as that API does and picks its script (queued, or its own
    default answer)."""

    def route(self, upstream: Upstream, method: str, uri: str, headers: dict[str, str], body: Any) -> Script:
        """The script answering one request."""
        ...


class Upstream:
    """The scripted server; see the module docstring. With ``wire`` it speaks that format instead."""

    def __init__(
        self,
        reactor: Any,
        *,
        responder: Callable[[Any], Script] | None = None,
        api_key: str | None = None,
        model: str = MODEL,
        record: bool = True,
        rejects: Callable[[Any], Script | None] | None = None,
        wire: Wire | None = None,
    ) -> None:
        self.reactor = reactor
        self.wire = wire
        self.record = record
        self.rejects = rejects
        self.responder = responder or echo(model=model)
        self.api_key = api_key
        self.model = model
        self.scripts: deque[Script] = deque()
        self.requests: list[ReceivedRequest] = []
        self._running: set[_Run] = set()
        self._port: Any = None

    def push(self, *scripts: Script) -> None:
        """Queue scripts for the next requests, in order."""
        self.scripts.extend(scripts)

    async def start(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        """Listen; return the port."""
        return self.listen(port, interface)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        """Listen at once (``start`` without the coroutine); return the port."""
        site = Site(_Root(self), reactor=self.reactor)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        self._port = self.reactor.listenTCP(port, site, interface=interface)
        return self.port

    @property
    def port(self) -> int:
        """The listening port."""
        assert self._port is not None
        return int(self._port.getHost().port)

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:<port>``: the base URL of the Anthropic and Gemini clients and SDKs."""
        assert self._port is not None
        return f"http://{self._port.getHost().host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The ``base_url`` a client uses: ``http://127.0.0.1:<port>/v1``."""
        assert self._port is not None
        return f"http://{self._port.getHost().host}:{self.port}/v1"

    async def stop(self) -> None:
        """Stop listening and cut any connection still open (stalls)."""
        for run in list(self._running):
            run.stop()
        if self._port is not None:
            await _maybe(self._port.stopListening())
            self._port = None


async def _maybe(result: Any) -> Any:
    if isinstance(result, Deferred):
        return await result
    return result


def main(argv: list[str] | None = None) -> None:
    """Serve :func:`echo` on a port until killed."""
    from twisted.internet import reactor as global_reactor

    parser = argparse.ArgumentParser(prog="python -m tests.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunks", type=int, default=0, help="exactly N text deltas (0: one per word)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between deltas")
    parser.add_argument("--first-delay", type=float, default=0.0, help="seconds before the first delta")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    options = parser.parse_args(argv)
    reactor: Any = global_reactor
    upstream = Upstream(
        reactor,
        responder=echo(options.chunks, options.delay, options.first_delay, options.model),
        api_key=options.api_key,
        model=options.model,
        # Served until killed with nobody reading them: kept requests would only grow the heap (and the
        # collector's pauses) for as long as a benchmark runs.
        record=False,
    )

    def started(port: int) -> None:
        print(f"listening on http://{options.host}:{port}/v1", flush=True)

    Deferred.fromCoroutine(upstream.start(options.port, options.host)).addCallback(started).addErrback(
        lambda failure: (print(failure.getErrorMessage(), file=sys.stderr), reactor.stop())
    )
    reactor.run()


if __name__ == "__main__":
    main()
