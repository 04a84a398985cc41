"""Build the configured model provider from the ``llm`` settings.

``provider`` selects it: ``openai`` (the default) is the Chat Completions client against ``base_url``
(OpenAI's own when empty), so any OpenAI-compatible server works; ``ollama`` is the same client with the
base URL ``http://localhost:11434/v1`` unless one is given and no key; ``mock`` is the offline provider.
An unknown name falls back to the OpenAI client with a warning, as the reference does.

Settings are read by attribute or key, with these names and defaults: ``provider``, ``api_key``, ``model``,
``base_url``, ``temperature`` (None: not sent), ``timeout_seconds`` (deadline to the first byte, 60),
``connect_timeout_seconds`` (10), ``idle_timeout_seconds`` (60), ``max_response_bytes`` (8 MiB),
``max_retries`` (2: three attempts in all), ``max_idle_connections`` (256), ``options`` (extra request
fields such as ``max_tokens``), and for the mock ``mock_delay_seconds`` (0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

from aichat.llm.mock import MockProvider
from aichat.llm.openai import DEFAULT_BASE_URL, DEFAULT_MAX_IDLE_CONNECTIONS, HTTPClient, OpenAIProvider
from aichat.llm.provider import Provider

OLLAMA_BASE_URL = "http://localhost:11434/v1"
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "ollama": "llama3.1:8b", "mock": "mock-model"}

log = Logger()


def _get(settings: Any, key: str, default: Any) -> Any:
    value = settings.get(key) if isinstance(settings, Mapping) else getattr(settings, key, None)
    return default if value is None else value


def build_provider(settings: Any, reactor: Any, *, http: HTTPClient | None = None) -> Provider:
    """The provider ``settings`` describe. ``reactor`` is the real reactor (or, with ``http`` given, any
    ``IReactorTime``). Raises :class:`ValueError` when the OpenAI provider has neither a key nor a
    ``base_url`` of its own."""
    kind = str(_get(settings, "provider", "openai") or "openai").lower()
    model = str(_get(settings, "model", "") or DEFAULT_MODELS.get(kind, DEFAULT_MODELS["openai"]))
    if kind == "mock":
        return MockProvider(reactor, model=model, delay=float(_get(settings, "mock_delay_seconds", 0.0)))
    api_key = str(_get(settings, "api_key", ""))
    base_url = str(_get(settings, "base_url", ""))
    if kind == "ollama":
        base_url = base_url or OLLAMA_BASE_URL
    elif kind != "openai":
        log.warn("Unknown LLM provider {provider!r}: using the OpenAI-compatible client", provider=kind)
        kind = "openai"
    if kind == "openai" and not api_key and not base_url:
        raise ValueError("OpenAI API key is required (set OPENAI_API_KEY or AICHAT_API_KEY environment variable)")
    options = _get(settings, "options", {})
    temperature = _get(settings, "temperature", None)
    provider = OpenAIProvider(
        reactor=reactor,
        http=http,
        name=kind,
        model=model,
        api_key=api_key,
        base_url=base_url or DEFAULT_BASE_URL,
        temperature=None if temperature is None else float(temperature),
        extra_body=dict(options) if isinstance(options, Mapping) else None,
        connect_timeout=float(_get(settings, "connect_timeout_seconds", 10.0)),
        first_byte_timeout=float(_get(settings, "timeout_seconds", 60.0)),
        idle_timeout=float(_get(settings, "idle_timeout_seconds", 60.0)),
        max_response_bytes=int(_get(settings, "max_response_bytes", 8 * 1024 * 1024)),
        max_attempts=1 + int(_get(settings, "max_retries", 2)),
        max_idle_connections=int(_get(settings, "max_idle_connections", DEFAULT_MAX_IDLE_CONNECTIONS)),
    )
    log.info(
        "LLM provider {provider}: model {model} at {base_url} (API key {key_state})",
        provider=kind,
        model=model,
        base_url=provider.base_url,
        key_state="set" if api_key else "not set",
    )
    return provider
