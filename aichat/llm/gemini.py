"""Gemini: Google's native ``streamGenerateContent`` API, on the shared streaming transport.

One call of :meth:`GeminiProvider.complete` is one ``POST {base_url}/v1beta/models/{model}
:streamGenerateContent?alt=sse`` with the key in ``x-goog-api-key``. The request is built from the
provider-neutral history (:mod:`aichat.llm.wire`): system messages become ``systemInstruction``;
assistant messages become ``model`` turns of a text part and one ``functionCall`` part per call, each
with the ``thoughtSignature`` Gemini gave it (a call made by another provider has none and is sent with
the placeholder signature Google documents for that case); tool results become ``functionResponse``
parts (``id``, the call's ``name``, ``response: {result}`` or ``{error}``), the results of one round in
one ``user`` turn; consecutive turns of one role are merged; images are ``inlineData`` parts. Tools are
one ``functionDeclarations`` list whose schemas go in ``parametersJsonSchema``, so MCP's JSON Schemas
are sent as they are (``parameters`` takes only an OpenAPI subset).

The stream is ``data:`` events, each a ``GenerateContentResponse``: text parts are passed on at once
(``thought`` parts are not part of the answer); every ``functionCall`` part is a whole call (parallel
calls are separate parts, in one event or several), given an id when Gemini sent none; ``finishReason``
and ``usageMetadata`` come with the last event. An ``error`` object in the stream fails the call; a prompt
blocked before any candidate is an error naming the block reason.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from twisted.web.http_headers import Headers

from aichat.llm.provider import Completion, LLMError, Usage
from aichat.llm.streaming import StreamingProvider
from aichat.llm.tools import ToolCall, ToolSpec
from aichat.llm.wire import (
    Image,
    call_names,
    finish_reason,
    parts_of,
    system_text,
    text_of,
    tool_calls_of,
)
from aichat.sse import SSEEvent
from aichat.transport.exchange import Errors, StreamingClient, error_fields

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"
#: What Google documents to send as the thought signature of a call Gemini did not make (history from
#: another provider, or from before signatures were kept).
FOREIGN_SIGNATURE = "skip_thought_signature_validator"
#: Request fields the client sets itself; ``llm.options`` cannot override them.
OWN_FIELDS = frozenset({"contents", "systemInstruction", "tools"})
#: Mid-stream error statuses worth another attempt (before any output).
RETRYABLE_ERRORS = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"})


def request_body(
    messages: list[dict[str, Any]],
    tools: Sequence[ToolSpec] | None,
    *,
    temperature: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``streamGenerateContent`` body for the neutral ``messages``; ``extra`` entries are request
    fields (``generationConfig``, ``safetySettings``, ...), merged with ours."""
    body: dict[str, Any] = {key: value for key, value in (extra or {}).items() if key not in OWN_FIELDS}
    body["contents"] = wire_contents(messages)
    system = system_text(messages)
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if tools:
        body["tools"] = [
            {
                "functionDeclarations": [
                    {"name": tool.name, "description": tool.description or "", "parametersJsonSchema": tool.schema}
                    for tool in tools
                ]
            }
        ]
    if temperature is not None:
        config = dict(body.get("generationConfig") or {})
        config.setdefault("temperature", temperature)
        body["generationConfig"] = config
    return body


def wire_contents(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The neutral history as Gemini ``contents`` (system messages left out: they are the instruction)."""
    names = call_names(messages)
    contents: list[dict[str, Any]] = []

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for message in messages:
        role = message.get("role")
        if role == "user":
            add("user", [_user_part(part) for part in parts_of(message.get("content"))])
        elif role == "assistant":
            parts: list[dict[str, Any]] = []
            text = text_of(message.get("content"))
            if text.strip():
                parts.append({"text": text})
            for call in tool_calls_of(message):
                parts.append(
                    {
                        "functionCall": {"id": call.id, "name": call.name, "args": call.parsed_arguments()},
                        "thoughtSignature": call.signature or FOREIGN_SIGNATURE,
                    }
                )
            add("model", parts)
        elif role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            if call_id not in names:
                continue
            output = text_of(message.get("content"))
            response = {"error": output} if message.get("is_error") else {"result": output}
            add("user", [{"functionResponse": {"id": call_id, "name": names[call_id], "response": response}}])
    return contents


def _user_part(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"text": part}
    if part.url:
        return {"fileData": {"fileUri": part.url}}
    return {"inlineData": {"mimeType": part.mime_type, "data": part.data}}


class ResponseStream:
    """The sink for one ``streamGenerateContent`` response (or one ``generateContent`` JSON object)."""

    def __init__(self, errors: Errors, on_text: Callable[[str], None] | None) -> None:
        self._errors = errors
        self._on_text = on_text
        self.started = False
        self.done = False
        self.garbage = 0
        self._text: list[str] = []
        self._calls: list[ToolCall] = []
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._model: str | None = None

    def completion(self) -> Completion:
        reason = finish_reason(self._finish, bool(self._calls)) if self._finish else None
        return Completion("".join(self._text), list(self._calls), reason, self._usage, self._model)

    def end(self, status: int) -> None:
        if not (self._text or self._calls):
            raise self._errors(
                "the model returned an empty answer: its stream ended without content", status=status, code="empty"
            )

    def event(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data:
            return
        try:
            document = json.loads(data)
        except ValueError:
            self.garbage += 1
            return
        if isinstance(document, list):
            for item in document:
                self._response(item, data)
        else:
            self._response(document, data)

    def whole(self, raw: bytes) -> None:
        """A ``generateContent`` answer, or a JSON array of stream responses (``alt=sse`` not honoured)."""
        errors = self._errors
        try:
            document = json.loads(raw)
        except ValueError:
            raise errors.failed("the model sent invalid JSON", errors.text(raw), code="protocol") from None
        for item in document if isinstance(document, list) else [document]:
            self._response(item, errors.text(raw))
        self.end(200)
        self.done = True

    def _response(self, document: Any, data: str) -> None:
        if not isinstance(document, dict):
            self.garbage += 1
            return
        if "error" in document:
            message, code = error_fields(document)
            raise self._errors.failed(
                "the model failed mid-stream",
                self._errors.scrub(message or data),
                code=code,
                retryable=code in RETRYABLE_ERRORS,
            )
        if isinstance(document.get("modelVersion"), str):
            self._model = document["modelVersion"]
        self._read_usage(document.get("usageMetadata"))
        candidates = document.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            feedback = document.get("promptFeedback")
            blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if blocked:
                raise self._errors(f"the model refused the prompt (block reason {blocked})", code="blocked")
            return
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            return
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                self._part(part)
        if isinstance(candidate.get("finishReason"), str):
            self._finish = candidate["finishReason"]
            self.done = True

    def _part(self, part: dict[str, Any]) -> None:
        call = part.get("functionCall")
        if isinstance(call, dict):
            args = call.get("args")
            signature = part.get("thoughtSignature")
            self._calls.append(
                ToolCall(
                    id=str(call.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                    name=str(call.get("name") or ""),
                    arguments=json.dumps(args if isinstance(args, dict) else {}, ensure_ascii=False),
                    signature=signature if isinstance(signature, str) and signature else None,
                )
            )
            return
        text = part.get("text")
        if isinstance(text, str) and text and not part.get("thought"):
            self._text.append(text)
            self.started = True
            if self._on_text is not None:
                self._on_text(text)

    def _read_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        try:
            prompt = int(usage.get("promptTokenCount") or 0)
            output = int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0)
            total = int(usage.get("totalTokenCount") or prompt + output)
        except (TypeError, ValueError):
            return
        self._usage = Usage(prompt, output, total)


class GeminiProvider(StreamingProvider):
    """A :class:`~aichat.llm.provider.Provider` for Gemini (``gemini`` | ``google``)."""

    def __init__(
        self,
        *,
        client: StreamingClient,
        model: str,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "gemini",
        temperature: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self._configure(client, name=name, model=model, api_key=api_key, base_url=base_url,
                        default_base_url=DEFAULT_BASE_URL, temperature=temperature, extra_body=extra_body)

    @property
    def url(self) -> str:
        """The streaming endpoint of the model (the API version is not doubled if the base URL has it)."""
        base = self.base_url if self.base_url.endswith(f"/{API_VERSION}") else f"{self.base_url}/{API_VERSION}"
        model = self.model if self.model.startswith(("models/", "tunedModels/")) else f"models/{self.model}"
        return f"{base}/{quote(model, safe='/')}:streamGenerateContent?alt=sse"

    def _headers(self) -> Headers:
        return Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"text/event-stream"],
                b"User-Agent": [b"aichat-backend"],
                b"x-goog-api-key": [self._api_key.encode()],
            }
        )

    def request_body(self, messages: list[dict[str, Any]], tools: Sequence[ToolSpec] | None) -> dict[str, Any]:
        """The JSON body sent for one completion."""
        return request_body(messages, tools, temperature=self.temperature, extra=self.extra_body)

    def _sink(self, errors: Any, on_text: Callable[[str], None] | None) -> ResponseStream:
        return ResponseStream(errors, on_text)


__all__ = ["DEFAULT_BASE_URL", "GeminiProvider", "LLMError", "ResponseStream", "request_body"]
