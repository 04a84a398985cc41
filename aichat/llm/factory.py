"""Build the configured model provider from the ``llm`` settings.

``provider`` selects it (the names, defaults and key variables are in :mod:`aichat.llm.catalog`):
``openai`` (the default) is the Chat Completions client against ``base_url`` (OpenAI's own when empty),
so any OpenAI-compatible server works; ``ollama`` is the same client with the base URL
``http://localhost:11434/v1`` unless one is given and no key; ``claude`` | ``anthropic`` is the Messages
API client; ``gemini`` | ``google`` the native Gemini client; ``mock`` is the offline provider. An unknown
name falls back to the OpenAI client with a warning, as the reference does.

Settings are read by attribute or key, with these names and defaults: ``provider``, ``api_key``, ``model``,
``base_url``, ``temperature`` (None: not sent), ``timeout_seconds`` (deadline to the first byte, 60),
``connect_timeout_seconds`` (10), ``idle_timeout_seconds`` (60), ``max_response_bytes`` (8 MiB),
``max_retries`` (2: three attempts in all), ``max_idle_connections`` (256), ``max_tokens`` (Claude's
required ``max_tokens`` when ``options`` has none, 4096), ``options`` (extra request fields such as
``max_tokens``), and for the mock ``mock_delay_seconds`` (0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

from aichat.llm.anthropic import DEFAULT_MAX_TOKENS, ClaudeProvider
from aichat.llm.catalog import DEFAULT_MODELS, lookup, mask_url, resolve
from aichat.llm.gemini import GeminiProvider
from aichat.llm.mock import MockProvider
from aichat.llm.openai import OpenAIProvider
from aichat.llm.provider import LLMError, Provider
from aichat.metrics import Metrics
from aichat.transport import DEFAULT_MAX_IDLE_CONNECTIONS, HTTPClient, Limits, RetryPolicy, StreamingClient

OLLAMA_BASE_URL = "http://localhost:11434/v1"

log = Logger()

__all__ = ["DEFAULT_MODELS", "OLLAMA_BASE_URL", "build_provider"]


def _get(settings: Any, key: str, default: Any) -> Any:
    value = settings.get(key) if isinstance(settings, Mapping) else getattr(settings, key, None)
    return default if value is None else value


def build_provider(
    settings: Any, reactor: Any, *, http: HTTPClient | None = None, metrics: Metrics | None = None
) -> Provider:
    """The provider ``settings`` describe. ``reactor`` is the real reactor (or, with ``http`` given, any
    ``IReactorTime``); ``http`` is the daemon's shared client (without it the provider makes its own pool).
    ``metrics`` counts the model requests. Raises :class:`ValueError` when a provider that needs a key has
    none (the OpenAI client also accepts a ``base_url`` of its own instead)."""
    asked = str(_get(settings, "provider", "openai") or "openai").lower()
    kind = resolve(asked)
    if lookup(asked) is None:
        log.warn("Unknown LLM provider {provider!r}: using the OpenAI-compatible client", provider=asked)
    model = str(_get(settings, "model", "") or DEFAULT_MODELS[kind.name])
    if kind.wire == "mock":
        return MockProvider(reactor, model=model, delay=float(_get(settings, "mock_delay_seconds", 0.0)))
    api_key = str(_get(settings, "api_key", ""))
    base_url = str(_get(settings, "base_url", ""))
    options = _get(settings, "options", {})
    extra = dict(options) if isinstance(options, Mapping) else None
    temperature = _get(settings, "temperature", None)
    temperature = None if temperature is None else float(temperature)
    connect_timeout = float(_get(settings, "connect_timeout_seconds", 10.0))
    first_byte_timeout = float(_get(settings, "timeout_seconds", 60.0))
    idle_timeout = float(_get(settings, "idle_timeout_seconds", 60.0))
    max_response_bytes = int(_get(settings, "max_response_bytes", 8 * 1024 * 1024))
    max_attempts = 1 + int(_get(settings, "max_retries", 2))
    max_idle_connections = int(_get(settings, "max_idle_connections", DEFAULT_MAX_IDLE_CONNECTIONS))
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
                max_tokens=int(_get(settings, "max_tokens", DEFAULT_MAX_TOKENS)),
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
