"""Database URLs: which engine a ``database.dsn`` names, and how to show it without its password.

``postgres://`` and ``postgresql://`` URLs are handed to libpq as they are (host, port, dbname, user,
password, ``sslmode`` and the other query options); a password left out of the URL comes from
``PGPASSWORD`` or ``~/.pgpass`` as libpq finds it. ``sqlite:PATH`` names a SQLite file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

POSTGRES_SCHEMES = ("postgres", "postgresql")
SCHEMES_HELP = "postgres://, postgresql:// or sqlite:PATH"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


class DSNError(ValueError):
    """A database URL that names no engine we have; the message never holds the password."""


@dataclass(frozen=True)
class DatabaseURL:
    """An engine and where its database is: a SQLite ``path`` or a PostgreSQL ``conninfo`` URL."""

    engine: str
    path: str = ""
    conninfo: str = field(default="", repr=False)

    def shown(self) -> str:
        """The URL or path as it may be logged or printed."""
        return mask_password(self.conninfo) if self.engine == "postgres" else self.path


def mask_password(url: str) -> str:
    """``url`` with any password (in the user info or a ``password=`` option) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_PASSWORD.sub(r"\1***", url)
    authority_end = len(rest)
    for mark in "/?#":
        index = rest.find(mark)
        if index != -1:
            authority_end = min(authority_end, index)
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        authority = f"{userinfo}@{host}"
    tail = _QUERY_PASSWORD.sub(r"\1***", tail)
    return f"{scheme}://{authority}{tail}"


def scheme_of(dsn: str) -> str:
    """The URL scheme of ``dsn`` (lower case), or ``""`` if it has none."""
    match = _SCHEME.match(dsn)
    return match.group(1).lower() if match else ""


def parse_dsn(dsn: str) -> DatabaseURL:
    """The engine and location ``dsn`` names; :class:`DSNError` for any other scheme."""
    scheme = scheme_of(dsn)
    if scheme in POSTGRES_SCHEMES and dsn[len(scheme) :].startswith("://"):
        return DatabaseURL("postgres", conninfo=dsn)
    if scheme == "sqlite":
        path = dsn[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]  # sqlite:///abs/path, as SQLAlchemy spells it
        if not path:
            raise DSNError("sqlite: needs a file path (sqlite:PATH)")
        return DatabaseURL("sqlite", path=path)
    shown = f"scheme {scheme!r}" if scheme else "no scheme"
    raise DSNError(f"unknown database URL ({shown}): use {SCHEMES_HELP}")
