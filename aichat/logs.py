"""Log observers: text or JSON lines, to standard output or to a file reopened on SIGHUP.

The observers are Twisted's own: a ``FileLogObserver`` per destination with a line formatter
(:func:`line_formatter`), a ``FilteringLogObserver`` for the level, and a ``LogPublisher`` that fans
events out to the log file and to standard error.

We never rotate by size (twistd's own ``--logfile`` does, and keeps every file forever); logrotate
moves the file and sends SIGHUP (``systemctl reload``), and :meth:`ReopenableFile.reopen` switches to
the new file between two writes, so no line is lost or split.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from zope.interface import implementer

#: The id of the HTTP request being served, set by the API site around each request's handling; coroutines
#: and turns started while serving it keep it (Twisted runs each coroutine in a copy of its creator's context).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


class ReopenableFile:
    """An append-mode text file that can be reopened at the same path (after logrotate moved it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] = self._open()

    def _open(self) -> IO[str]:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def reopen(self) -> None:
        """Close and open the path again; on failure keep writing to the old file."""
        with self._lock:
            try:
                new = self._open()
            except OSError:
                return
            old, self._file = self._file, new
            old.close()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _scalar_fields(event: LogEvent) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "isError", "system", "time", "why"):
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            fields[key] = value
    return fields


def json_line(event: LogEvent) -> str:
    """One event as a JSON object on one line: time, level, namespace, message and its scalar fields."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    record.update(_scalar_fields(event))
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def line_formatter(fmt: str = "text") -> Callable[[LogEvent], str | None]:
    """A ``FileLogObserver`` formatter: each event as one text or JSON line, with the id of the request being
    served, if any (a field in JSON, ``[request_id=...]`` at the end of a text line)."""

    def format_line(event: LogEvent) -> str | None:
        request_id = event.get("request_id") or REQUEST_ID.get()
        if request_id and "request_id" not in event:
            event = {**event, "request_id": request_id}
        if fmt == "json":
            return json_line(event)
        line = formatEventAsClassicLogText(event)
        if line and request_id:
            line = f"{line.rstrip(chr(10))} [request_id={request_id}]\n"
        return line

    return format_line


def line_observer(out: IO[str] | ReopenableFile, fmt: str = "text") -> FileLogObserver:
    """Twisted's ``FileLogObserver`` writing :func:`line_formatter` lines to ``out`` (flushed after each)."""
    # FileLogObserver uses only write() and flush(), which ReopenableFile has.
    return FileLogObserver(cast("IO[str]", out), line_formatter(fmt))


@implementer(ILogFilterPredicate)
class AnnouncedOrWarning:
    """Passes events logged with ``announce=True`` (start-up, listening, stopping) and warnings or worse."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        level = event.get("log_level")
        if event.get("announce") or (level is not None and level >= LogLevel.warn):
            return PredicateResult.yes
        return PredicateResult.no


def make_observer(path: str, level: str, fmt: str) -> tuple[ILogObserver, ReopenableFile | None]:
    """The daemon's observer for ``logging.*`` settings, and the file to reopen on SIGHUP, if any.

    With a log file, a ``LogPublisher`` fans each event out to the file and to standard error, where the
    start-up and shutdown announcements and every warning go, so ``journalctl -u aichat-backend`` shows them.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    if not path:
        return FilteringLogObserver(line_observer(sys.stdout, fmt), [predicate]), None
    target = ReopenableFile(path)
    to_file = FilteringLogObserver(line_observer(target, fmt), [predicate])
    to_stderr = FilteringLogObserver(line_observer(sys.stderr, "text"), [AnnouncedOrWarning()])
    return LogPublisher(to_file, to_stderr), target
