"""Building the provider from the ``llm`` settings: presets, limits, the key requirement, and no key in
the log."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from aichat.config import LLMSettings
from aichat.llm import factory
from aichat.llm.factory import build_provider
from aichat.llm.mock import MockProvider
from aichat.llm.openai import OpenAIProvider
from tests.llm.fakes import FakeHTTP

KEY = "sk-factory-SECRET-777"


class FactoryTests(SynchronousTestCase):
    """build_provider with the typed ``llm`` settings."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(factory, "log", Logger(observer=cast(ILogObserver, self.events.append)))

    def build(self, settings: LLMSettings) -> Any:
        """Build with a fake HTTP client and clock."""
        return build_provider(settings, Clock(), http=FakeHTTP())

    def test_openai_default(self) -> None:
        """No provider means OpenAI at its own URL, with the configured limits and options."""
        provider = self.build(
            LLMSettings(
                api_key=KEY,
                model="gpt-4o-mini",
                base_url="",
                temperature=0.7,
                timeout_seconds=30,
                connect_timeout_seconds=5,
                idle_timeout_seconds=20,
                max_response_bytes=4096,
                max_retries=4,
                options={"max_tokens": 100},
            )
        )
        self.assertIsInstance(provider, OpenAIProvider)
        self.assertEqual((provider.name, provider.model), ("openai", "gpt-4o-mini"))
        self.assertEqual(provider.url, "https://api.openai.com/v1/chat/completions")
        self.assertEqual(
            (provider.first_byte_timeout, provider.connect_timeout, provider.idle_timeout),
            (30.0, 5.0, 20.0),
        )
        self.assertEqual((provider.max_response_bytes, provider.max_attempts), (4096, 5))
        self.assertEqual((provider.temperature, provider.extra_body), (0.7, {"max_tokens": 100}))
        self.assertNotIn(KEY, repr(provider))
        self.assertTrue(self.events)
        for event in self.events:
            self.assertNotIn(KEY, formatEvent(event))
            self.assertNotIn(KEY, repr(event))

    def test_ollama_preset(self) -> None:
        """ollama: the local base URL, its default model, no key needed."""
        provider = self.build(LLMSettings(provider="ollama"))
        self.assertEqual((provider.name, provider.model), ("ollama", "llama3.1:8b"))
        self.assertEqual(provider.base_url, "http://localhost:11434/v1")
        self.assertEqual(
            self.build(LLMSettings(provider="ollama", base_url="http://gpu:11434/v1")).base_url, "http://gpu:11434/v1"
        )

    def test_mock(self) -> None:
        """mock: the offline provider."""
        provider = self.build(LLMSettings(provider="mock"))
        self.assertIsInstance(provider, MockProvider)
        self.assertEqual(provider.model, "mock-model")

    def test_openai_needs_a_key_unless_self_hosted(self) -> None:
        """Without a key OpenAI is refused with the reference's message; a custom base_url needs none."""
        with self.assertRaises(ValueError) as caught:
            self.build(LLMSettings(provider="openai"))
        self.assertIn("OpenAI API key is required", str(caught.exception))
        provider = self.build(LLMSettings(base_url="http://127.0.0.1:8000/v1", model="local"))
        self.assertEqual(provider.url, "http://127.0.0.1:8000/v1/chat/completions")

    def test_unknown_provider_falls_back(self) -> None:
        """An unknown name uses the OpenAI-compatible client and says so."""
        provider = self.build(LLMSettings(provider="vllm", base_url="http://h/v1", model="m"))
        self.assertEqual(provider.name, "openai")
        self.assertTrue(any("Unknown LLM provider" in formatEvent(e) for e in self.events))

    def test_idle_connections_follow_the_setting(self) -> None:
        """The provider's own pool keeps as many idle connections per host as llm.max_idle_connections says
        (256 by default), so a burst of concurrent turns does not reconnect on the next burst."""
        from twisted.internet import reactor

        default = build_provider(LLMSettings(base_url="http://h/v1", model="m"), reactor)
        tuned = build_provider(LLMSettings(base_url="http://h/v1", model="m", max_idle_connections=1000), reactor)
        for provider, expected in ((default, 256), (tuned, 1000)):
            assert isinstance(provider, OpenAIProvider) and provider._pool is not None
            self.assertEqual(provider._pool.maxPersistentPerHost, expected)
