"""The ``aichat-backend`` command: Go-style flags, ``-validate``, ``-version``, ``db copy``; otherwise runs twistd.

Flags take one or two dashes (``-config FILE``, ``--config=FILE``), as the reference and its packaging
guide use them. Without ``-validate`` the daemon runs in the foreground through twistd with the same
service and options as ``twistd -n --pidfile= aichat-backend ...``. Exit codes: 0 success, 1 invalid
configuration, 2 usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted.python import usage

from aichat import __version__
from aichat.config import Settings, load_settings, summary
from aichat.validation import ConfigError, Problem

PROGRAM = "aichat-backend"


def normalize(argv: Sequence[str]) -> list[str]:
    """Turn Go-style ``-flag`` into ``--flag``; single-letter flags (``-c``, ``-v``) stay as they are."""
    out: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[index:])
            break
        if arg.startswith("-") and not arg.startswith("--") and len(arg.split("=", 1)[0]) > 2:
            arg = "-" + arg
        out.append(arg)
    return out


def _options_class() -> type[usage.Options]:
    from aichat.tap import Options

    class CLIOptions(Options):
        # Parsing only: settings are loaded by main() so that errors are reported without usage text.
        def postOptions(self) -> None:
            self.overrides()

        def getSynopsis(self) -> str:
            return f"Usage: {PROGRAM} [options]"

        def opt_help(self) -> None:
            """Show this help and exit."""
            print(self.__str__())
            print(
                "Flags take one or two dashes. Without -validate the daemon runs in the foreground\n"
                "(the same as `twistd -n --pidfile= aichat-backend [options]`).\n\n"
                "Database: SQLite at database.path by default; a PostgreSQL URL in database.dsn,\n"
                "$AICHAT_DATABASE_URL or -database-url (postgres://USER@HOST:PORT/DB?sslmode=...; the password\n"
                "may come from $PGPASSWORD or ~/.pgpass) selects PostgreSQL.\n\n"
                "  aichat-backend db copy --from SRC --to DST [--force]\n"
                "      copy every session, message, attachment and approval between databases\n"
                "      (SQLite <-> PostgreSQL); see `aichat-backend db --help`."
            )
            sys.exit(0)

        opt_h = opt_help

    return CLIOptions


def _mcp_problems(settings: Settings) -> tuple[list[Problem], list[str]]:
    """Validate the MCP servers file named by ``settings``; return problems and summary lines."""
    from aichat.mcp import load_servers_file_if_present

    try:
        servers = load_servers_file_if_present(settings.mcp.servers_file)
    except ConfigError as e:
        return e.problems, []
    if servers is None:
        return [], [f"warning: MCP servers file {settings.mcp.servers_file} not found: no MCP servers"]
    enabled = [s for s in servers if s.enabled]
    names = ", ".join(f"{s.name} ({s.transport}{'' if s.enabled else ', disabled'})" for s in servers)
    return [], [f"mcp servers:    {len(enabled)} enabled of {len(servers)}: {names or 'none'}"]


def _database_problems(settings: Settings) -> list[Problem]:
    """PostgreSQL only: connect and read the schema's state (changing nothing); SQLite is checked at start."""
    database = settings.database
    if database.engine != "postgres":
        return []
    from aichat.store.postgres import check_database

    problem = check_database(database.dsn, database.connect_timeout_seconds)
    return [] if problem is None else [Problem(database.shown(), "database.dsn", problem)]


def _load(options: usage.Options) -> Settings | list[Problem]:
    """Settings for the parsed options, or the problems that prevent them."""
    from aichat.tap import Options

    assert isinstance(options, Options)
    try:
        return load_settings(options["config"], env_only=bool(options["env-only"]), flags=options.overrides())
    except ConfigError as e:
        return e.problems


def validate(options: usage.Options) -> int:
    """``-validate``: print a summary and return 0, or print every problem and return 1."""
    settings = _load(options)
    if isinstance(settings, list):
        return _report(settings)
    problems, mcp_lines = _mcp_problems(settings)
    problems.extend(_database_problems(settings))
    if problems:
        return _report(problems)
    print(f"{PROGRAM} {__version__}: configuration is valid")
    for line in summary(settings):
        print("  " + line)
    for line in mcp_lines:
        print("  " + line)
    for warning in settings.warnings:
        print(f"  warning: {warning}")
    return 0


def _report(problems: list[Problem]) -> int:
    print(f"{PROGRAM}: configuration is invalid ({len(problems)} problem(s)):", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def run_daemon(argv: list[str]) -> int:
    """Run the daemon in the foreground through twistd, with our plugin and these options."""
    from twisted.scripts import twistd

    sys.argv = [PROGRAM, "--nodaemon", "--pidfile=", PROGRAM, *argv]
    twistd.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aichat-backend`` console script and ``python -m aichat``."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0] == "db":
        from aichat.store.copy import main as db_main

        return db_main(given[1:])
    args = normalize(given)
    options = _options_class()()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        print(f"Try '{PROGRAM} -help' for usage.", file=sys.stderr)
        return 2
    if options["validate"]:
        return validate(options)
    # Report configuration problems cleanly before twistd would print them with its usage text.
    settings = _load(options)
    if isinstance(settings, list):
        return _report(settings)
    return run_daemon(args)


if __name__ == "__main__":
    sys.exit(main())
