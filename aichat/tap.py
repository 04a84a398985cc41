"""The composition root: twistd ``Options`` and ``makeService``, the only place that picks the reactor.

The service tree itself is built by :class:`aichat.daemon.AichatService` from validated settings.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from aichat import __version__
from aichat.config import Overrides, Settings, load_settings
from aichat.settings_table import flag_values, option_flags, option_parameters
from aichat.validation import ConfigError


class Options(usage.Options):
    """Command-line options of the ``aichat-backend`` twistd plugin (and the ``aichat-backend`` command)."""

    synopsis = "[options]"
    longdesc = (
        "Serve the AI chat HTTP API. Settings come from the YAML config file, AICHAT_* environment "
        "variables and these flags (flag > environment > file > default)."
    )
    optFlags = [
        ["env-only", None, "Ignore the config file: defaults, environment and flags only."],
        *option_flags(Settings),
        ["validate", None, "Check the configuration and the MCP servers file, print a summary, exit."],
        ["version", "v", "Print the version and exit."],
    ]
    optParameters = [
        ["config", "c", None, "Config file (default: config.yaml, or $AICHAT_CONFIG)."],
        *option_parameters(Settings),
    ]

    settings: Settings

    def opt_version(self) -> None:
        print(f"aichat-backend {__version__}")
        sys.exit(0)

    def overrides(self) -> Overrides:
        """The settings the flags give, by dotted key."""
        return flag_values(self)

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
