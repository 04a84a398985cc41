"""The packaged migrations: numbered SQL files, one folder per engine, applied in order and recorded."""

from __future__ import annotations

from importlib import resources

#: Where each engine's migrations live, under ``aichat/store/``.
FOLDERS = {"sqlite": "migrations", "postgres": "migrations/postgres"}


def migrations(engine: str = "sqlite") -> list[tuple[int, str, str]]:
    """``engine``'s migrations as (version, name, SQL), in version order."""
    folder = resources.files("aichat.store")
    for part in FOLDERS[engine].split("/"):
        folder = folder.joinpath(part)
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text("utf-8")))
    return sorted(found)


def statements(sql: str) -> list[str]:
    """Split a migration into statements (ours hold no semicolons inside literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]
