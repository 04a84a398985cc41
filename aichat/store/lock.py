"""One daemon per SQLite file: an exclusive ``flock`` on ``<database>.lock``, held while a store is open.

SQLite cannot be the bus between instances (a second daemon would not see the first one's streams,
approvals or busy sessions), so a second daemon on the same file refuses to start. The lock is a separate
file because closing any descriptor of the database itself would drop SQLite's own POSIX locks; it goes
away with the process, so a killed daemon leaves nothing to clean up. Stores of one process share it.
"""

from __future__ import annotations

import fcntl
import os

from aichat.store.base import StoreError

#: Locks this process holds: lock file's real path -> (descriptor, stores using it).
_HELD: dict[str, tuple[int, int]] = {}


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (the file holds the owner's pid, for the message)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key: str | None = None

    def acquire(self, database: str) -> None:
        """Take the lock, or raise :class:`StoreError` naming the process that holds it."""
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is not None:
            _HELD[key] = (held[0], held[1] + 1)
            self._key = key
            return
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"database {database} is in use by another aichat-backend (pid {holder}): a SQLite database "
                "serves one daemon; stop the other one, or run several instances on PostgreSQL (database.dsn)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        _HELD[key] = (fd, 1)
        self._key = key

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        fd, count = _HELD[key]
        if count > 1:
            _HELD[key] = (fd, count - 1)
        else:
            del _HELD[key]
            os.close(fd)
