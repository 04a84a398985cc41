"""Model providers: the interface the chat turn codes against, an OpenAI-compatible streaming client and an
offline mock.

``provider`` holds the types (:class:`Completion`, :class:`ToolCall`, :class:`LLMError`) and the
:class:`Provider` protocol; ``openai`` the treq client; ``mock`` the deterministic offline provider;
``factory`` builds one of them from the ``llm`` settings.
"""

from aichat.llm.provider import Completion, LLMError, Provider, ToolCall, Usage

__all__ = ["Completion", "LLMError", "Provider", "ToolCall", "Usage"]
