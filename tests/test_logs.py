"""The daemon's log observers: line formats, the request id, fan-out to file and stderr, reopen on SIGHUP."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from twisted.logger import FileLogObserver, Logger, LogLevel, LogPublisher

from aichat.logs import REQUEST_ID, ReopenableFile, line_formatter, line_observer, make_observer


def emit(observer: object, level: LogLevel, text: str, **fields: object) -> None:
    """Log one event through ``observer`` as a Logger would."""
    Logger(namespace="aichat.test", observer=observer).emit(level, text, **fields)  # type: ignore[arg-type]


def test_text_lines_carry_the_request_id() -> None:
    """A text line is Twisted's classic format, with the request being served appended."""
    out = io.StringIO()
    observer = line_observer(out, "text")
    assert isinstance(observer, FileLogObserver)
    token = REQUEST_ID.set("req-1")
    try:
        emit(observer, LogLevel.info, "Hello {who}", who="world")
    finally:
        REQUEST_ID.reset(token)
    emit(observer, LogLevel.info, "No request")
    first, second = out.getvalue().splitlines()
    assert first.endswith("[aichat.test#info] Hello world [request_id=req-1]")
    assert second.endswith("[aichat.test#info] No request")


def test_json_lines_hold_the_fields() -> None:
    """A JSON line has time, level, namespace, the formatted message, scalar fields and the request id."""
    out = io.StringIO()
    observer = line_observer(out, "json")
    emit(observer, LogLevel.warn, "Tool {tool} failed", tool="echo", count=2, request_id="req-2",
         ignored=object())
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warn"
    assert record["namespace"] == "aichat.test"
    assert record["message"] == "Tool echo failed"
    assert (record["tool"], record["count"], record["request_id"]) == ("echo", 2, "req-2")
    assert "ignored" not in record
    assert not line.startswith("\x1e")


def test_the_formatter_skips_events_with_nothing_to_say() -> None:
    """An event without a format gives no text line (and FileLogObserver then writes nothing)."""
    assert line_formatter("text")({"log_level": LogLevel.info}) is None


def test_a_log_file_and_stderr_are_fanned_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a file: the file gets every event at the level, stderr only announcements and warnings."""
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    path = tmp_path / "logs" / "aichat.log"
    observer, target = make_observer(str(path), "info", "json")
    assert isinstance(observer, LogPublisher)
    assert isinstance(target, ReopenableFile)
    emit(observer, LogLevel.debug, "too quiet")
    emit(observer, LogLevel.info, "ordinary")
    emit(observer, LogLevel.info, "Listening", announce=True)
    emit(observer, LogLevel.warn, "trouble")
    in_file = [json.loads(line)["message"] for line in path.read_text().splitlines()]
    assert in_file == ["ordinary", "Listening", "trouble"]
    on_stderr = stderr.getvalue().splitlines()
    assert [line.rsplit("] ", 1)[1] for line in on_stderr] == ["Listening", "trouble"]


def test_stdout_alone_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a file the lines go to standard output, filtered by level; nothing to reopen."""
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    observer, target = make_observer("", "warn", "text")
    assert target is None
    emit(observer, LogLevel.info, "hidden")
    emit(observer, LogLevel.error, "shown")
    assert [line.rsplit("] ", 1)[1] for line in stdout.getvalue().splitlines()] == ["shown"]


def test_reopen_moves_to_the_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After logrotate moves the file, reopen() (SIGHUP) writes whole lines to a new file at the path."""
    monkeypatch.setattr("sys.stderr", io.StringIO())
    path = tmp_path / "aichat.log"
    observer, target = make_observer(str(path), "info", "text")
    assert target is not None
    emit(observer, LogLevel.info, "before")
    path.rename(tmp_path / "aichat.log.1")
    emit(observer, LogLevel.info, "still the old file")
    target.reopen()
    emit(observer, LogLevel.info, "after")
    target.close()
    old = (tmp_path / "aichat.log.1").read_text().splitlines()
    assert [line.rsplit("] ", 1)[1] for line in old] == ["before", "still the old file"]
    assert [line.rsplit("] ", 1)[1] for line in path.read_text().splitlines()] == ["after"]


def test_a_failing_destination_does_not_silence_the_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If standard error cannot be written, the log file still gets every line."""

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("stderr closed")

    monkeypatch.setattr("sys.stderr", Broken())
    path = tmp_path / "aichat.log"
    observer, _ = make_observer(str(path), "info", "text")
    emit(observer, LogLevel.warn, "first")
    emit(observer, LogLevel.warn, "second")
    lines = path.read_text().splitlines()
    assert [line.rsplit("] ", 1)[1] for line in lines if "#warn]" in line][:2] == ["first", "second"]
