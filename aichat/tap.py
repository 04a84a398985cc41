"""The composition root: twistd ``Options`` and ``makeService``, the only place that picks the reactor.

The service tree itself is built by :class:`aichat.daemon.AichatService` from validated settings.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from aichat import __version__
from aichat.config import Overrides, Settings, load_settings
from aichat.validation import ConfigError

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port number: {value}")
    return port


_port.coerceDoc = "1..65535."  # type: ignore[attr-defined]


def _log_level(value: str) -> str:
    level = value.lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return level


_log_level.coerceDoc = "One of debug, info, warn, error, critical."  # type: ignore[attr-defined]


class Options(usage.Options):
    """Command-line options of the ``aichat-backend`` twistd plugin (and the ``aichat-backend`` command)."""

    synopsis = "[options]"
    longdesc = (
        "Serve the AI chat HTTP API. Settings come from the YAML config file, AICHAT_* environment "
        "variables and these flags (flag > environment > file > default)."
    )
    optFlags = [
        ["env-only", None, "Ignore the config file: defaults, environment and flags only."],
        ["log-json", None, "Write logs as JSON lines."],
        ["validate", None, "Check the configuration and the MCP servers file, print a summary, exit."],
        ["version", "v", "Print the version and exit."],
    ]
    optParameters = [
        ["config", "c", None, "Config file (default: config.yaml, or $AICHAT_CONFIG)."],
        ["port", None, None, "Listen port (server.port)", _port],
        ["host", None, None, "Listen address (server.host)."],
        ["log-level", None, None, "Log level (logging.level)", _log_level],
        ["log-file", None, None, "Log file, reopened on SIGHUP (logging.file); '' for stdout."],
        ["database-path", None, None, "SQLite database file (database.path)."],
        [
            "database-url",
            None,
            None,
            "postgres://USER@HOST:PORT/DB?sslmode=... or sqlite:PATH (database.dsn, $AICHAT_DATABASE_URL); "
            "the password may come from $PGPASSWORD or ~/.pgpass.",
        ],
        ["llm-provider", None, None, "openai, claude, gemini, ollama or mock (llm.provider)."],
        ["llm-model", None, None, "Model name (llm.model)."],
        ["api-key", None, None, "LLM API key (llm.api_key); prefer $AICHAT_API_KEY or the provider's own variable."],
        ["base-url", None, None, "The model server's base URL (llm.base_url); empty: the provider's own."],
        ["system-prompt", None, None, "System prompt (llm.system_prompt)."],
        ["mcp-servers-file", None, None, "MCP servers JSON file (mcp.servers_file)."],
    ]

    settings: Settings

    def opt_version(self) -> None:
        print(f"aichat-backend {__version__}")
        sys.exit(0)

    def overrides(self) -> Overrides:
        """The flags that override settings."""
        return Overrides(
            port=self["port"],
            host=self["host"],
            log_level=self["log-level"],
            log_json=bool(self["log-json"]),
            log_file=self["log-file"],
            database_path=self["database-path"],
            database_url=self["database-url"],
            llm_provider=self["llm-provider"],
            llm_model=self["llm-model"],
            api_key=self["api-key"],
            base_url=self["base-url"],
            system_prompt=self["system-prompt"],
            mcp_servers_file=self["mcp-servers-file"],
        )

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self["config"], env_only=bool(self["env-only"]), flags=self.overrides())
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(map(str, e.problems))) from None


def makeService(options: Options) -> IService:
    """Build the daemon's service tree from parsed options."""
    from twisted.internet import reactor

    from aichat.daemon import AichatService
    from aichat.metrics import Metrics

    return AichatService(options.settings, reactor, Metrics())
