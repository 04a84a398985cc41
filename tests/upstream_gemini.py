"""Gemini's native API as a scripted upstream (``Upstream(reactor, wire=GeminiWire())``).

It answers ``POST /v1beta/models/<model>:streamGenerateContent?alt=sse`` as the real API does: the key in
``x-goog-api-key`` (or ``?key=``) checked (400 ``INVALID_ARGUMENT`` "API key not valid"), the body checked
for what the API refuses with 400 (a role other than ``user`` / ``model``, a part with nothing in it, a
turn of function responses whose count differs from the calls of the model turn before it, a function
response answering no call); errors are ``{"error": {"code", "message", "status"}}``. A stream is
``data: <GenerateContentResponse>`` events separated by CRLF CRLF, as Google's servers send them.

Builders: :func:`gemini_stream` (text parts, whole ``functionCall`` parts with ids and thought signatures,
several calls in one event or one per event, ``finishReason`` and ``usageMetadata`` on the last event)
and :func:`gemini_error`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.upstream import Raw, Script, Sleep, Step, Upstream

MODEL = "gemini-test"
STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
          500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class Call:
    """A ``functionCall`` part: name, args; ``id`` and ``signature`` (its ``thoughtSignature``) optional."""

    name: str
    args: dict[str, Any]
    id: str | None = None
    signature: str | None = None

    def part(self) -> dict[str, Any]:
        call: dict[str, Any] = {"name": self.name, "args": self.args}
        if self.id is not None:
            call["id"] = self.id
        part: dict[str, Any] = {"functionCall": call}
        if self.signature is not None:
            part["thoughtSignature"] = self.signature
        return part


def event(parts: list[dict[str, Any]], *, finish: str | None = None, usage: tuple[int, int] | None = None,
          model: str = MODEL) -> bytes:
    """One ``data:`` event of a GenerateContentResponse."""
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    document: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": "resp-test"}
    if usage is not None:
        document["usageMetadata"] = {
            "promptTokenCount": usage[0],
            "candidatesTokenCount": usage[1],
            "totalTokenCount": usage[0] + usage[1],
        }
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\r\n\r\n"


def gemini_stream(
    texts: list[str] = (),  # type: ignore[assignment]
    calls: list[Call] = (),  # type: ignore[assignment]
    *,
    calls_per_event: int = 1,
    finish: str = "STOP",
    usage: tuple[int, int] = (9, 4),
    delay: float = 0.0,
    model: str = MODEL,
) -> Script:
    """Text parts one per event, then the calls ``calls_per_event`` to an event; the last event has the
    finish reason and usage."""
    groups: list[list[dict[str, Any]]] = [[{"text": t}] for t in texts]
    calls = list(calls)
    for start in range(0, len(calls), calls_per_event):
        groups.append([c.part() for c in calls[start : start + calls_per_event]])
    if not groups:
        groups.append([{"text": ""}])
    steps: list[Step] = []
    for n, parts in enumerate(groups):
        if delay:
            steps.append(Sleep(delay))
        last = n == len(groups) - 1
        steps.append(Raw(event(parts, finish=finish if last else None, usage=usage if last else None, model=model)))
    return Script(steps, headers={"Content-Type": "text/event-stream"})


def gemini_error(status: int, message: str, *, retry_after: str | None = None) -> Script:
    """An error answer in Google's shape."""
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = {"error": {"code": status, "message": message, "status": STATUS.get(status, "UNKNOWN")}}
    return Script([], status=status, headers=headers, body=json.dumps(body).encode())


def refusal(body: Any) -> str | None:
    """What the API answers 400 to in ``body``, or ``None``."""
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
        return "* GenerateContentRequest.contents: contents is not specified"
    calls: list[str] = []
    for n, content in enumerate(body["contents"]):
        role = content.get("role")
        if role not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{n}].role: Please use a valid role: user, model."
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{n}].parts: contents.parts must not be empty."
        responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
        for m, part in enumerate(parts):
            if not any(key in part for key in ("text", "inlineData", "fileData", "functionCall", "functionResponse")):
                return (
                    f"* GenerateContentRequest.contents[{n}].parts[{m}].data: "
                    "required oneof field 'data' must have one initialized field"
                )
        if responses:
            if len(responses) != len(calls):
                return (
                    "Please ensure that the number of function response parts is equal to the number of "
                    "function call parts of the function call turn."
                )
            if any(r.get("name") not in calls for r in responses):
                return "function response names must match the function calls of the turn before"
        calls = [p["functionCall"]["name"] for p in parts if "functionCall" in p] if role == "model" else []
    return None


class GeminiWire:
    """Routes requests as the Gemini API does; the default answer echoes the last user text."""

    def route(self, upstream: Upstream, method: str, uri: str, headers: dict[str, str], body: Any) -> Script:
        path, _, query = uri.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if not (path.startswith("/v1beta/models/") and path.endswith(":streamGenerateContent")):
            return gemini_error(404, f"Requested entity was not found: {path}")
        if method != "POST":
            return gemini_error(400, "Method not allowed")
        key = headers.get("x-goog-api-key") or params.get("key")
        if upstream.api_key is not None and key != upstream.api_key:
            return gemini_error(400, "API key not valid. Please pass a valid API key.")
        if params.get("alt") != "sse":
            return gemini_error(400, "this scripted upstream only streams with alt=sse")
        problem = refusal(body)
        if problem is not None:
            return gemini_error(400, problem)
        if upstream.scripts:
            return upstream.scripts.popleft()
        last = body["contents"][-1]["parts"]
        return gemini_stream(["Echo: " + "".join(p.get("text", "") for p in last)])
