"""Model providers: the interface the chat turn codes against, an OpenAI-compatible streaming client and an
offline mock.

``tools`` holds the tool loop's records (:class:`ToolSpec`, :class:`ToolCall`, the
:data:`~aichat.llm.tools.Execution` outcomes); ``provider`` the completion types (:class:`Completion`,
:class:`LLMError`) and the :class:`Provider` protocol; ``wire`` what the non-OpenAI codecs share;
``anthropic`` and ``gemini`` their codecs; ``openai`` the treq client; ``mock`` the deterministic offline provider;
``factory`` builds one of them from the ``llm`` settings.
"""

from aichat.llm.provider import Completion, LLMError, Provider, Usage
from aichat.llm.tools import Execution, Failed, Succeeded, ToolCall, ToolSpec

__all__ = ["Completion", "Execution", "Failed", "LLMError", "Provider", "Succeeded", "ToolCall", "ToolSpec", "Usage"]
