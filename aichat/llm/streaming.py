"""What every HTTP provider does with its codec: encode the request, stream it through the shared transport
into the codec's sink, and read the completion the sink assembled.

A provider subclasses :class:`StreamingProvider` and supplies its URL, headers, request body and the sink
that parses its wire format (OpenAI chunks, Anthropic events, Gemini responses).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from twisted.web.http_headers import Headers

from aichat.llm.provider import Completion, check_messages
from aichat.llm.tools import ToolSpec
from aichat.transport import StreamingClient, StreamSink


class CompletionSink(StreamSink, Protocol):
    """A codec's stream parser that ends with one assembled completion."""

    def completion(self) -> Completion:
        """The answer the stream carried."""


class StreamingProvider:
    """:meth:`complete` and :meth:`close` over ``_client``, for the codec named by :meth:`_sink`."""

    _client: StreamingClient
    base_url: str

    def _configure(
        self,
        client: StreamingClient,
        *,
        name: str,
        model: str,
        api_key: str,
        base_url: str,
        default_base_url: str,
        temperature: float | None,
        extra_body: Mapping[str, Any] | None,
    ) -> None:
        """The fields every provider has (the key is kept private and never shown)."""
        self.name = name
        self.model = model
        self.base_url = (base_url or default_base_url).rstrip("/")
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self._api_key = api_key
        self._client = client
        client.provider_name, client.model = name, model

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    @property
    def url(self) -> str:
        """The endpoint one completion is posted to."""
        raise NotImplementedError

    def _headers(self) -> Headers:
        raise NotImplementedError

    def request_body(self, messages: list[dict[str, Any]], tools: Sequence[ToolSpec] | None) -> dict[str, Any]:
        """The JSON body sent for one completion."""
        raise NotImplementedError

    def _sink(self, errors: Any, on_text: Callable[[str], None] | None) -> CompletionSink:
        """The parser of one response stream."""
        raise NotImplementedError

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolSpec] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Stream one completion; see the provider's module docstring. Raises :class:`LLMError`."""
        check_messages(messages)
        body = json.dumps(self.request_body(messages, tools), ensure_ascii=False).encode()
        sink = await self._client.stream(
            self.url, self._headers(), body, lambda errors: self._sink(errors, on_text), where=self.base_url
        )
        return cast(CompletionSink, sink).completion()

    async def close(self) -> None:
        """Close the pooled connections this provider made (none when the daemon's shared client is used)."""
        await self._client.close()
