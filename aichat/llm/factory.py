"""Build the configured model provider from the ``llm`` settings.

``provider`` selects it (the names, defaults and key variables are in :mod:`aichat.llm.catalog`):
``openai`` (the default) is the Chat Completions client against ``base_url`` (OpenAI's own when empty),
so any OpenAI-compatible server works; ``ollama`` is the same client with the base URL
``http://localhost:11434/v1`` unless one is given and no key; ``claude`` | ``anthropic`` is the Messages
API client; ``gemini`` | ``google`` the native Gemini client; ``mock`` is the offline provider. An unknown
name falls back to the OpenAI client with a warning, as the reference does.

The settings are the typed :class:`aichat.config.LLMSettings` record, whose defaults are the only ones.
``max_retries`` is the number of retries after the first attempt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from aichat.llm.anthropic import ClaudeProvider
from aichat.llm.catalog import lookup, mask_url, resolve
from aichat.llm.gemini import GeminiProvider
from aichat.llm.mock import MockProvider
from aichat.llm.openai import OpenAIProvider
from aichat.llm.provider import LLMError, Provider
from aichat.metrics import Metrics
from aichat.transport import HTTPClient, Limits, RetryPolicy, StreamingClient

if TYPE_CHECKING:
    from aichat.config import LLMSettings

log = Logger()

__all__ = ["build_provider"]


def build_provider(
    settings: LLMSettings, reactor: Any, *, http: HTTPClient | None = None, metrics: Metrics | None = None
) -> Provider:
    """The provider ``settings`` describe. ``reactor`` is the real reactor (or, with ``http`` given, any
    ``IReactorTime``); ``http`` is the daemon's shared client (without it the provider makes its own pool).
    ``metrics`` counts the model requests. Raises :class:`ValueError` when a provider that needs a key has
    none (the OpenAI client also accepts a ``base_url`` of its own instead)."""
    asked = settings.provider.lower()
    kind = resolve(asked)
    if lookup(asked) is None:
        log.warn("Unknown LLM provider {provider!r}: using the OpenAI-compatible client", provider=asked)
    model = settings.model
    if kind.wire == "mock":
        return MockProvider(reactor, model=model)
    api_key = settings.api_key
    base_url = settings.base_url
    extra = dict(settings.options)
    temperature = settings.temperature
    connect_timeout = settings.connect_timeout_seconds
    first_byte_timeout = settings.timeout_seconds
    idle_timeout = settings.idle_timeout_seconds
    max_response_bytes = settings.max_response_bytes
    max_attempts = 1 + settings.max_retries
    max_idle_connections = settings.max_idle_connections
    provider: Any
    if kind.wire == "openai":
        if kind.name == "openai" and not api_key and not base_url:
            raise ValueError(
                "OpenAI API key is required (set OPENAI_API_KEY or AICHAT_API_KEY environment variable)"
            )
        provider = OpenAIProvider(
            reactor=reactor,
            http=http,
            name=kind.name,
            model=model,
            api_key=api_key,
            base_url=base_url or kind.default_base_url,
            temperature=temperature,
            extra_body=extra,
            connect_timeout=connect_timeout,
            first_byte_timeout=first_byte_timeout,
            idle_timeout=idle_timeout,
            max_response_bytes=max_response_bytes,
            max_attempts=max_attempts,
            max_idle_connections=max_idle_connections,
            metrics=metrics,
        )
    else:
        if not api_key:
            variables = " or ".join(["AICHAT_API_KEY", *kind.key_variables])
            raise ValueError(f"{kind.name} API key is required (set llm.api_key, {variables})")
        client = StreamingClient(
            reactor,
            http=http,
            secret=api_key,
            limits=Limits(first_byte_timeout, idle_timeout, max_response_bytes),
            retries=RetryPolicy(max_attempts=max(1, max_attempts)),
            connect_timeout=connect_timeout,
            max_idle_connections=max_idle_connections,
            error_type=LLMError,
            metrics=metrics,
        )
        if kind.wire == "anthropic":
            provider = ClaudeProvider(
                client=client,
                name=kind.name,
                model=model,
                api_key=api_key,
                base_url=base_url or kind.default_base_url,
                max_tokens=settings.max_tokens,
                temperature=temperature,
                extra_body=extra,
            )
        else:
            provider = GeminiProvider(
                client=client,
                name=kind.name,
                model=model,
                api_key=api_key,
                base_url=base_url or kind.default_base_url,
                temperature=temperature,
                extra_body=extra,
            )
    log.info(
        "LLM provider {provider}: model {model} at {base_url} (API key {key_state})",
        provider=kind.name,
        model=model,
        base_url=mask_url(provider.base_url),
        key_state="set" if api_key else "not set",
    )
    return provider
