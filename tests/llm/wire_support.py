"""What the per-provider upstream tests share: a scripted upstream on a real port speaking one wire
format, a provider built by the factory against it, and a script rendered to the bytes it would send."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from aichat.config import LLMSettings
from aichat.llm.factory import build_provider
from aichat.llm.provider import Completion, LLMError, Provider
from aichat.llm.tools import specs_from_openai
from tests.upstream import Event, Raw, Script, Send, Upstream, Wire

KEY = "sk-wire-SECRET-31415926"
reactor: Any = global_reactor
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "everything__echo",
            "description": "Echoes back the input",
            "parameters": {
                "type": "object",
                "properties": {"message": {"type": "string"}},
                "required": ["message"],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "everything__get-sum",
            "description": "Adds two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    },
]


def render(script: Script) -> bytes:
    """The body bytes ``script`` sends (its events and raw bytes; pauses and cuts left out)."""
    out = []
    for step in script.steps:
        if isinstance(step, Event):
            out.append(f"event: {step.name}\ndata: {json.dumps(step.data, separators=(',', ':'))}\n\n".encode())
        elif isinstance(step, Raw):
            out.append(step.data)
        elif isinstance(step, Send):
            data = step.data if isinstance(step.data, str) else json.dumps(step.data, separators=(",", ":"))
            out.append(f"data: {data}\n\n".encode())
    return b"".join(out)


class WireTestCase(TestCase):
    """One upstream speaking ``wire`` and a provider of ``kind`` against it per test."""

    timeout = 30
    kind = ""

    def wire(self) -> Wire:
        raise NotImplementedError

    def setUp(self) -> None:
        self.upstream = Upstream(reactor, wire=self.wire(), api_key=KEY)
        self.upstream.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.upstream.stop()))

    def provider(self, **settings: Any) -> Provider:
        """The factory's provider for the upstream, with fast retries; closed at cleanup."""
        options: dict[str, Any] = {
            "provider": self.kind,
            "api_key": KEY,
            "base_url": self.upstream.root_url,
            "model": "test-model",
            "temperature": 0.2,
            "max_retries": 2,
        }
        options.update(settings)
        provider = build_provider(LLMSettings(**options), reactor)
        client = getattr(provider, "_client", None)
        if client is not None:
            object.__setattr__(client, "retries", type(client.retries)(client.retries.max_attempts, 0.01, 0.05, 0.2))
        self.addCleanup(lambda: Deferred.fromCoroutine(provider.close()))
        return provider

    async def complete(
        self, messages: list[dict[str, Any]] | None = None, provider: Provider | None = None, **kwargs: Any
    ) -> tuple[Completion, list[str]]:
        seen: list[str] = []
        tools = kwargs.pop("tools", None)
        result = await (provider or self.provider()).complete(
            messages or [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            None if tools is None else specs_from_openai(tools),
            on_text=seen.append,
        )
        return result, seen

    async def failure(self, messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> LLMError:
        try:
            await self.complete(messages, **kwargs)
        except LLMError as error:
            self.assertNotIn(KEY, error.message + error.detail)
            await self.settled()
            return error
        raise AssertionError("the completion did not fail")

    async def settled(self) -> None:
        """Wait until the upstream has seen every request end and the client has had a turn to put a
        connection whose response was whole back in its pool (so cleanup closes it)."""
        for request in self.upstream.requests:
            await request.closed
        await deferLater(reactor, 0)
