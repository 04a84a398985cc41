"""The settings a command-line flag or an ``AICHAT_*`` variable sets, declared once: one :class:`Setting` each.

From :data:`SETTINGS` come twistd's flags (:func:`option_flags`, :func:`option_parameters`, whose help
names the key, the variable and the default), the values the flags give (:func:`flag_values`) and the
values the environment gives (:func:`environment_values`), all keyed by the dotted key of ``config.yaml``.
A coercer parses a flag and its variable alike. Defaults are not written here: they live in the typed
records of :mod:`aichat.config`, and the help reads them from there (:func:`default_of`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aichat.validation import Problem

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

#: What an ``AICHAT_*`` variable of a switch says to turn it on; anything else leaves it off.
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def text(value: str) -> str:
    """Any string, as given."""
    return value


def integer(value: str) -> int:
    """A decimal integer."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"not an integer: {value!r}") from None


def port(value: str) -> int:
    """A TCP port, 1 to 65535."""
    number = integer(value)
    if not 1 <= number <= 65535:
        raise ValueError(f"invalid port number: {value}")
    return number


def log_level(value: str) -> str:
    """One of :data:`LOG_LEVELS`, in any case; ``warning`` is ``warn``."""
    level = value.strip().lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return level


port.coerceDoc = "1..65535."  # type: ignore[attr-defined]
log_level.coerceDoc = f"One of {', '.join(LOG_LEVELS)}."  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Setting:
    """One setting that can be given outside ``config.yaml``.

    ``flag`` is the long option without its dash, ``env`` the variable. A ``switch`` is a flag without a
    value: given (or its variable true), it sets ``key`` to ``switch``. ``flag_clears`` are keys the flag
    empties unless they are given on the command line too. ``default_note`` is shown in ``-help`` instead of
    the record's default, where the default is derived or long.
    """

    key: str
    help: str
    flag: str | None = None
    env: str | None = None
    coerce: Callable[[str], Any] = text
    switch: Any = None
    flag_clears: tuple[str, ...] = ()
    default_note: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("server.host", "Listen address.", "host", "AICHAT_HOST"),
    Setting("server.port", "Listen port.", "port", "AICHAT_PORT", port),
    Setting(
        "database.path",
        "SQLite database file; on the command line it also overrides a database URL of the file or "
        "environment.",
        "database-path",
        "AICHAT_DATABASE_PATH",
        flag_clears=("database.dsn",),
    ),
    Setting(
        "database.dsn",
        "postgres://USER@HOST:PORT/DB?sslmode=... or sqlite:PATH; the password may come from $PGPASSWORD or "
        "~/.pgpass.",
        "database-url",
        "AICHAT_DATABASE_URL",
        default_note="none: SQLite at database.path",
    ),
    Setting("llm.provider", "openai, claude, gemini, ollama or mock.", "llm-provider", "AICHAT_LLM_PROVIDER"),
    Setting("llm.model", "Model name.", "llm-model", "AICHAT_LLM_MODEL", default_note="the provider's own"),
    Setting(
        "llm.api_key",
        "LLM API key; prefer the variable (or the provider's own, such as $OPENAI_API_KEY) to the flag.",
        "api-key",
        "AICHAT_API_KEY",
        default_note="none",
    ),
    Setting(
        "llm.base_url", "The model server's base URL.", "base-url", "AICHAT_LLM_BASE_URL",
        default_note="the provider's own",
    ),
    Setting(
        "llm.system_prompt", "System prompt.", "system-prompt", "AICHAT_SYSTEM_PROMPT",
        default_note="PMM's assistant prompt",
    ),
    Setting("mcp.servers_file", "MCP servers JSON file.", "mcp-servers-file", "AICHAT_MCP_SERVERS_FILE"),
    Setting(
        "logging.file", "Log file, reopened on SIGHUP.", "log-file", "AICHAT_LOG_FILE", default_note="stdout"
    ),
    Setting("logging.level", "Log level.", "log-level", "AICHAT_LOG_LEVEL", log_level),
    Setting("logging.format", "Write logs as JSON lines.", "log-json", "AICHAT_LOG_JSON", switch="json"),
)


def by_key(key: str, rows: Iterable[Setting] = SETTINGS) -> Setting:
    """The row of ``key``."""
    for row in rows:
        if row.key == key:
            return row
    raise KeyError(key)


def default_of(key: str, root: type) -> Any:
    """The default of the dotted ``key`` in the settings record ``root`` (a dataclass of section records)."""
    value: Any = root
    for name in key.split("."):
        fields = {item.name: item for item in dataclasses.fields(value)}
        item = fields[name]
        if item.default is not dataclasses.MISSING:
            value = item.default
        elif item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
        else:
            raise KeyError(key)
    return value


def _help(row: Setting, root: type) -> str:
    default = row.default_note or repr(default_of(row.key, root))
    env = f"; ${row.env}" if row.env else ""
    return f"{row.help} ({row.key}{env}; default: {default})"


def option_flags(root: type, rows: Iterable[Setting] = SETTINGS) -> list[list[Any]]:
    """twistd ``optFlags`` for the switches in ``rows``."""
    return [[row.flag, None, _help(row, root)] for row in rows if row.flag and row.switch is not None]


def option_parameters(root: type, rows: Iterable[Setting] = SETTINGS) -> list[list[Any]]:
    """twistd ``optParameters`` for the valued settings in ``rows``; absent flags stay ``None``."""
    return [
        [row.flag, None, None, _help(row, root), row.coerce]
        for row in rows
        if row.flag and row.switch is None
    ]


def flag_values(options: Mapping[str, Any], rows: Iterable[Setting] = SETTINGS) -> dict[str, Any]:
    """The settings the parsed command line gives, by dotted key.

    twistd stores an absent parameter as ``None`` and an absent switch as ``0``; an empty value is taken as
    not given, as the reference does.
    """
    rows = tuple(rows)
    given: dict[str, Any] = {}
    for row in rows:
        raw = options.get(row.flag) if row.flag else None
        if raw is None or raw == "" or (row.switch is not None and not raw):
            continue
        given[row.key] = row.switch if row.switch is not None else raw
    for row in rows:
        if row.key in given:
            for cleared in row.flag_clears:
                given.setdefault(cleared, "")
    return given


def environment_values(
    environ: Mapping[str, str], problems: list[Problem], rows: Iterable[Setting] = SETTINGS
) -> dict[str, Any]:
    """The settings the ``AICHAT_*`` variables give, by dotted key; unparsable ones go to ``problems``.

    An empty variable is not given, as in the reference.
    """
    given: dict[str, Any] = {}
    for row in rows:
        raw = environ.get(row.env, "") if row.env else ""
        if raw == "":
            continue
        if row.switch is not None:
            if raw.strip().lower() in TRUE_WORDS:
                given[row.key] = row.switch
            continue
        try:
            given[row.key] = row.coerce(raw)
        except ValueError as e:
            problems.append(Problem("environment", row.env or row.key, str(e)))
    return given
