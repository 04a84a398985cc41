"""Load ``config.yaml``: expand ``${VAR}``, validate against the schema, apply env and flags, build settings.

Precedence, highest first: command-line flag, ``AICHAT_*`` environment variable, YAML file, default.
Which flags and variables set which keys is declared once, in :mod:`aichat.settings_table`; the defaults
are those of the records below, and nowhere else.
The provider's own key variables (``OPENAI_API_KEY``; ``ANTHROPIC_API_KEY`` for Claude;
``GEMINI_API_KEY`` then ``GOOGLE_API_KEY`` for Gemini) are fallbacks for ``llm.api_key``. Relative paths
in the file are resolved against the file's own folder. Every problem found is reported at once (see
:mod:`aichat.validation`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from aichat.llm.catalog import lookup, mask_url, resolve
from aichat.settings_table import by_key, default_of, environment_values
from aichat.store.dsn import DSNError, mask_password, parse_dsn
from aichat.validation import SECRET_KEYS, ConfigError, Problem, validate

DEFAULT_CONFIG_PATH = "config.yaml"

DEFAULT_SYSTEM_PROMPT = (
    "You are an AI assistant for PMM (Percona Monitoring and Management), a comprehensive database "
    "monitoring and management platform. PMM supports MySQL, PostgreSQL, MongoDB, and other database "
    "technologies. You help users with database monitoring, performance optimization, query analysis, "
    "backup management, and troubleshooting database issues. When providing assistance, focus on "
    "PMM-specific features, best practices for database monitoring, and actionable insights for database "
    "performance optimization."
)


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the HTTP API listens."""

    host: str = "0.0.0.0"
    port: int = 3001
    shutdown_grace_seconds: float = 10.0
    #: Time from a request's first byte until its head and body are in; a slower client gets 408.
    request_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class DatabaseSettings:
    """The store: a SQLite file at ``path`` unless ``dsn`` is a PostgreSQL URL (which may hold a password)."""

    path: str = "/var/lib/aichat-backend/aichat.db"
    #: A ``postgres://`` or ``postgresql://`` URL; empty for SQLite at ``path``.
    dsn: str = field(default="", repr=False)
    #: Memory for recently used sessions' histories (0: read every history from the database).
    history_cache_mb: int = 64
    pool_size: int = 10
    connect_timeout_seconds: float = 5.0
    statement_timeout_seconds: float = 30.0

    @property
    def engine(self) -> str:
        """``postgres`` or ``sqlite``."""
        return "postgres" if self.dsn else "sqlite"

    def shown(self) -> str:
        """The database as it may be printed or logged: the path, or the URL with its password masked."""
        return mask_password(self.dsn) if self.dsn else self.path


@dataclass(frozen=True)
class LLMSettings:
    """The model provider; ``api_key`` is a secret and never shown."""

    provider: str = "openai"
    api_key: str = field(default="", repr=False)
    #: Empty: the provider's default model (from :mod:`aichat.llm.catalog`).
    model: str = ""
    base_url: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 0.7
    timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    max_response_bytes: int = 8 * 1024 * 1024
    max_retries: int = 3
    max_idle_connections: int = 256
    #: Claude's required ``max_tokens`` when ``options`` gives none.
    max_tokens: int = 4096
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", resolve(self.provider).default_model)


@dataclass(frozen=True)
class MCPSettings:
    """Where the MCP servers are configured."""

    servers_file: str = "mcp-servers.json"
    max_line_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class LoggingSettings:
    """Log destination (empty file = standard output), level and format."""

    file: str = ""
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class AuthSettings:
    """Who may assert ``X-User-ID`` and which bearer tokens map to which users.

    Tokens are kept only as SHA-256 digests.
    """

    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    token_digests: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Digests of the operator tokens that may act on shared state (restarting an MCP server).
    admin_digests: frozenset[str] = field(default_factory=frozenset, repr=False)


@dataclass(frozen=True)
class MetricsSettings:
    """Who may scrape ``GET /metrics``: peers in ``allowed_networks``, or the bearer token (kept as a digest)."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    token_digest: str = field(default="", repr=False)


@dataclass(frozen=True)
class CORSSettings:
    """Origins whose pages may read responses: none by default; ``*`` any, without credentials."""

    origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitSettings:
    """Request size limits, checked before a body is read."""

    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_file_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class ApprovalSettings:
    """Which tool calls need the user's approval and how long a pending request lives."""

    policy: str = "always"
    auto_approve: tuple[str, ...] = ()
    expire_seconds: float = 3600.0


@dataclass(frozen=True)
class ChatSettings:
    """The tool loop, history budget and stream lifetimes."""

    max_tool_rounds: int = 10
    tool_concurrency: int = 8
    history_budget_chars: int = 100_000
    approval: ApprovalSettings = field(default_factory=ApprovalSettings)
    stream_keep_seconds: float = 300.0
    stream_max_seconds: float = 600.0
    keepalive_seconds: float = 15.0
    title_generation: bool = True
    #: SSE readers one stream may have at once; one more is answered 429.
    max_stream_readers: int = 16
    #: Bytes of events a reader that does not read may fall behind by before it is dropped.
    max_reader_lag_bytes: int = 1024 * 1024
    #: Whether ``GET /v1/chat/stream?message=`` runs a turn (a plain link could start one: opt-in).
    legacy_stream_get: bool = False
    #: With several instances on PostgreSQL: how soon a dead instance's turn is ended by another.
    turn_lease_seconds: float = 10.0
    #: With several instances on PostgreSQL: text deltas within this many seconds share one event row.
    event_batch_seconds: float = 0.02


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs to start, after precedence and validation."""

    config_path: str | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    mcp: MCPSettings = field(default_factory=MCPSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    cors: CORSSettings = field(default_factory=CORSSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    warnings: tuple[str, ...] = ()


#: Settings given on the command line, by dotted key (see :func:`aichat.settings_table.flag_values`).
Overrides = Mapping[str, Any]


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: Any, environ: Mapping[str, str], unset: set[str], *, secret: bool = False) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of ``value``.

    A string that is exactly one placeholder takes the YAML type of what it expands to, so
    ``port: ${PORT}`` gives an integer; under a secret key (:data:`~aichat.validation.SECRET_KEYS`) it stays
    a string, so a key made of digits is neither turned into a number nor shown in a type error. Names of
    unset variables without a default go to ``unset``.
    """
    if isinstance(value, dict):
        return {key: expand(item, environ, unset, secret=secret or key in SECRET_KEYS) for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item, environ, unset, secret=secret) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        unset.add(name)
        return ""

    result = _PLACEHOLDER.sub(substitute, value)
    if _PLACEHOLDER.fullmatch(value) and result and not secret:
        try:
            typed = yaml.safe_load(result)
        except yaml.YAMLError:
            return result
        if isinstance(typed, bool | int | float):
            return typed
    return result


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    section, key = dotted.split(".")
    target = document.setdefault(section, {})
    if not isinstance(target, dict):
        return
    target[key] = value


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(str(path), "$", f"cannot read file: {e.strerror or e}")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([Problem(str(path), "$", f"invalid YAML: {where}{problem}")]) from None


def token_digest(token: str) -> str:
    """The form in which bearer tokens are kept and compared."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def load_settings(
    path: str | None = None,
    *,
    env_only: bool = False,
    environ: Mapping[str, str] | None = None,
    flags: Overrides | None = None,
) -> Settings:
    """Build :class:`Settings` from the file at ``path`` (default ``config.yaml``), env and flags.

    A missing file is an error when ``path`` was given explicitly; the default path may be absent
    (then defaults apply, as in the reference). Raises :class:`ConfigError` listing every problem.
    """
    environ = os.environ if environ is None else environ
    flags = flags or {}
    explicit = path is not None or bool(environ.get("AICHAT_CONFIG"))
    config_path = Path(path or environ.get("AICHAT_CONFIG") or DEFAULT_CONFIG_PATH)
    problems: list[Problem] = []
    unset: set[str] = set()
    document: Any = {}
    base_dir = Path.cwd()
    shown_path: str | None = None
    if not env_only and (explicit or config_path.exists()):
        raw = _read_yaml(config_path)
        document = {} if raw is None else expand(raw, environ, unset)
        base_dir = config_path.resolve().parent
        shown_path = str(config_path)
        if not isinstance(document, dict):
            raise ConfigError([Problem(str(config_path), "$", "the top level must be a mapping of sections")])
        problems.extend(validate(document, "config", str(config_path)))
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in document.items()}
    env_values = environment_values(environ, problems)
    for dotted, value in {**env_values, **flags}.items():
        _set(merged, dotted, value)
    llm_doc: dict[str, Any] = merged["llm"] if isinstance(merged.get("llm"), dict) else {}
    asked = llm_doc.get("provider", LLMSettings.provider)
    notes: list[str] = []
    if isinstance(asked, str):
        if not llm_doc.get("api_key"):
            fallback = next((environ[v] for v in resolve(asked).key_variables if environ.get(v)), None)
            if fallback:
                _set(merged, "llm.api_key", fallback)
        if lookup(asked) is None:
            notes.append(f"llm.provider {asked!r} is not a known provider: using the OpenAI-compatible client")
    if not problems:
        problems.extend(
            validate(merged, "config", "environment and flags")
        )
    if problems:
        raise ConfigError(problems)
    dsn_source = _dsn_source(flags, environ, shown_path)
    settings = _build(merged, base_dir, shown_path, problems, dsn_source)
    if problems:
        raise ConfigError(problems)
    warnings = tuple(f"${{{name}}} is not set; using an empty string" for name in sorted(unset))
    return replace(settings, warnings=(*warnings, *notes))


def _dsn_source(flags: Overrides, environ: Mapping[str, str], shown_path: str | None) -> tuple[str, str]:
    """Where the effective ``database.dsn`` came from, as (file, key) for a :class:`Problem`."""
    row = by_key("database.dsn")
    if flags.get(row.key):
        return "flags", f"-{row.flag}"
    if row.env and environ.get(row.env):
        return "environment", row.env
    return shown_path or "config", "$.database.dsn"


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    candidate = Path(value).expanduser()
    return os.path.normpath(candidate if candidate.is_absolute() else (base / candidate))


def _conninfo_problem(dsn: str) -> str | None:
    """libpq's complaint about a PostgreSQL URL it cannot parse (password masked), or ``None``."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as e:
        return f"invalid PostgreSQL URL {mask_password(dsn)}: {' '.join(str(e).split())}"
    return None


def _database(
    doc: dict[str, Any], base: Path, problems: list[Problem], dsn_source: tuple[str, str]
) -> DatabaseSettings:
    path = doc.get("path", DatabaseSettings.path)
    dsn = doc.get("dsn", "").strip()
    if dsn:
        try:
            url = parse_dsn(dsn)
        except DSNError as e:
            problems.append(Problem(dsn_source[0], dsn_source[1], str(e)))
            url = None
        if url is not None and url.engine == "sqlite":
            path, dsn = url.path, ""
        elif url is None:
            dsn = ""
        else:
            problem = _conninfo_problem(dsn)
            if problem:
                problems.append(Problem(dsn_source[0], dsn_source[1], problem))
    tuning = {key: doc[key] for key in ("history_cache_mb", "pool_size", "connect_timeout_seconds",
                                         "statement_timeout_seconds") if key in doc}
    return DatabaseSettings(path=_resolve(base, path), dsn=dsn, **tuning)


def _build(
    doc: dict[str, Any],
    base: Path,
    shown_path: str | None,
    problems: list[Problem],
    dsn_source: tuple[str, str] = ("config", "$.database.dsn"),
) -> Settings:
    def section(name: str) -> dict[str, Any]:
        value = doc.get(name) or {}
        return value if isinstance(value, dict) else {}

    server = ServerSettings(**section("server"))
    database = _database(section("database"), base, problems, dsn_source)
    llm = LLMSettings(**section("llm"))
    mcp_doc = dict(section("mcp"))
    servers_file = _resolve(base, mcp_doc.get("servers_file", MCPSettings.servers_file))
    mcp = MCPSettings(**{**mcp_doc, "servers_file": servers_file})
    logging_doc = dict(section("logging"))
    if logging_doc.get("file"):
        logging_doc["file"] = _resolve(base, logging_doc["file"])
    logging = LoggingSettings(**logging_doc)

    def networks_of(doc: dict[str, Any], dotted: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        networks = []
        default = [str(network) for network in default_of(dotted, Settings)]
        for index, cidr in enumerate(doc.get(dotted.rsplit(".", 1)[1], default)):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                problems.append(Problem(shown_path or "config", f"$.{dotted}[{index}]", f"not an IP network: {cidr!r}"))
        return networks

    auth_doc = section("auth")
    networks = networks_of(auth_doc, "auth.trusted_proxies")
    digests: dict[str, str] = {}
    for entry in auth_doc.get("tokens", []):
        digests[token_digest(entry["token"])] = str(entry["user_id"])
    admins = frozenset(token_digest(token) for token in auth_doc.get("admin_tokens", []))
    auth = AuthSettings(trusted_proxies=tuple(networks), token_digests=digests, admin_digests=admins)

    cors = CORSSettings(origins=tuple(section("cors").get("origins", [])))
    limits = LimitSettings(**section("limits"))
    chat_doc = dict(section("chat"))
    approval_doc = chat_doc.pop("approval", {})
    approval = ApprovalSettings(**{**approval_doc, "auto_approve": tuple(approval_doc.get("auto_approve", ()))})
    chat = ChatSettings(**chat_doc, approval=approval)
    metrics_doc = section("metrics")
    token = metrics_doc.get("token", "")
    metrics = MetricsSettings(
        allowed_networks=tuple(networks_of(metrics_doc, "metrics.allowed_networks")),
        token_digest=token_digest(token) if token else "",
    )
    return Settings(
        config_path=shown_path,
        server=server,
        database=database,
        llm=llm,
        mcp=mcp,
        logging=logging,
        auth=auth,
        cors=cors,
        limits=limits,
        chat=chat,
        metrics=metrics,
    )


def _database_line(database: DatabaseSettings) -> str:
    if database.engine == "postgres":
        return (
            f"{database.shown()} (PostgreSQL, pool {database.pool_size}, connect timeout "
            f"{database.connect_timeout_seconds:g} s, statement timeout {database.statement_timeout_seconds:g} s, "
            "no history cache: other instances may write)"
        )
    return f"{database.path} (SQLite, history cache {database.history_cache_mb} MB)"


def summary(settings: Settings) -> list[str]:
    """A one-screen description of ``settings`` for ``-validate``; secrets are shown only as set/unset."""
    llm = settings.llm
    return [
        f"config file:    {settings.config_path or '(none: defaults, environment and flags)'}",
        f"listen:         {settings.server.host or '0.0.0.0'}:{settings.server.port}",
        f"database:       {_database_line(settings.database)}",
        f"llm:            provider={llm.provider} model={llm.model} "
        f"base_url={mask_url(llm.base_url) if llm.base_url else _default_url(llm.provider)} "
        f"api_key={'set' if llm.api_key else 'not set'}",
        f"mcp servers:    {settings.mcp.servers_file}",
        f"logging:        {settings.logging.file or 'stdout'} level={settings.logging.level} "
        f"format={settings.logging.format}",
        f"auth:           trusted proxies {', '.join(map(str, settings.auth.trusted_proxies)) or 'none'}; "
        f"{len(settings.auth.token_digests)} bearer token(s)",
        f"metrics:        /metrics from {', '.join(map(str, settings.metrics.allowed_networks)) or 'no network'}"
        f"{' or with its bearer token' if settings.metrics.token_digest else ''}",
        f"approvals:      policy={settings.chat.approval.policy} max_tool_rounds={settings.chat.max_tool_rounds}",
    ]


def _default_url(provider: str) -> str:
    kind = resolve(provider)
    return f"{kind.default_base_url} (default)" if kind.default_base_url else "(none)"
