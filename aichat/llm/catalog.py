"""The model providers the daemon knows, in one table: names, default model and base URL, key variables.

This is the one place these are written; the configuration (:mod:`aichat.config`), ``-validate`` and
the factory (:mod:`aichat.llm.factory`) read it. It imports nothing heavy, so the configuration can.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class ProviderKind:
    """One provider: ``name`` and its ``aliases``, the ``wire`` format its client speaks, its defaults,
    the environment variables its key falls back to (after ``llm.api_key`` and ``AICHAT_API_KEY``), and
    whether it needs a key at all (a local server does not)."""

    name: str
    wire: str
    default_model: str
    default_base_url: str
    key_variables: tuple[str, ...] = ()
    needs_key: bool = True
    aliases: tuple[str, ...] = ()


PROVIDERS: tuple[ProviderKind, ...] = (
    ProviderKind("openai", "openai", "gpt-4o-mini", "https://api.openai.com/v1", ("OPENAI_API_KEY",)),
    ProviderKind(
        "claude",
        "anthropic",
        "claude-3-5-haiku-20241022",
        "https://api.anthropic.com",
        ("ANTHROPIC_API_KEY",),
        aliases=("anthropic",),
    ),
    ProviderKind(
        "gemini",
        "gemini",
        "gemini-2.5-flash",
        "https://generativelanguage.googleapis.com",
        ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        aliases=("google",),
    ),
    ProviderKind(
        "ollama", "openai", "llama3.1:8b", "http://localhost:11434/v1", ("OPENAI_API_KEY",), needs_key=False
    ),
    ProviderKind("mock", "mock", "mock-model", "", needs_key=False),
)

_BY_NAME = {name: kind for kind in PROVIDERS for name in (kind.name, *kind.aliases)}

#: The default model of each provider name (aliases included).
DEFAULT_MODELS = {name: kind.default_model for name, kind in _BY_NAME.items()}


def lookup(name: str) -> ProviderKind | None:
    """The provider called ``name`` (case-insensitive), ``None`` for an unknown one."""
    return _BY_NAME.get(name.strip().lower())


def resolve(name: str) -> ProviderKind:
    """The provider called ``name``; an unknown name gets the OpenAI client, as the reference does."""
    return lookup(name) or _BY_NAME["openai"]


def mask_url(url: str) -> str:
    """``url`` with its userinfo (``user:password@``, which may hold a token) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
