"""twistd plugin: ``twistd aichat-backend`` builds the service tree in :mod:`aichat.tap`."""

from twisted.application.service import ServiceMaker

aichatBackend = ServiceMaker(
    "aichat-backend",
    "aichat.tap",
    "AI chat backend: HTTP chat API, OpenAI-compatible LLMs and MCP tools",
    "aichat-backend",
)
