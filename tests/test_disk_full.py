"""A full disk under the real daemon: writes answer 507 JSON naming the cause, reads go on, the log says
"disk full" once per episode, and writes work again by themselves once space is freed.

The database lives on a small tmpfs mounted for the test (root can mount one on these machines; CI runs
as root). Where mounting is not allowed the test is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BIN, free_port
from tests.test_daemon import Daemon, get_json, start, write_daemon_config

pytestmark = pytest.mark.slow

USER = {"X-User-ID": "4", "Content-Type": "application/json"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until the disk refuses another byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 65536
        while True:
            try:
                f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    return filler


def test_full_disk_is_507_reads_go_on_and_writes_recover(tmp_path: Path, small_disk: Path) -> None:
    """Filling the database's disk: every write is 507 with the cause (never 500), reads answer, the log has
    one "disk full" line and no rollback noise; freeing space makes writes succeed with no restart."""
    port = free_port()
    config = write_daemon_config(tmp_path, port)
    config.write_text(config.read_text().replace(str(tmp_path / "state" / "aichat.db"), str(small_disk / "a.db")))
    daemon: Daemon = start(tmp_path, [str(BIN / "aichat-backend"), "-config", str(config)], port)
    try:
        status, body = get_json(daemon.base + "/v1/chat/sessions", USER, "POST", b'{"title": "before"}')
        assert status == 201
        filler = fill(small_disk)
        statuses = []
        for i in range(60):
            title = f'{{"title": "while full {i} {"x" * 2000}"}}'.encode()
            status, body = get_json(daemon.base + "/v1/chat/sessions", USER, "POST", title)
            statuses.append(status)
            if status == 507:
                assert isinstance(body, dict) and "disk is full" in body["error"]
        assert 507 in statuses and 500 not in statuses, statuses
        status, body = get_json(daemon.base + "/v1/chat/send", USER, "POST", b'{"message": "hello"}')
        assert status == 507 and isinstance(body, dict) and "disk is full" in body["error"], (status, body)
        status, listing = get_json(daemon.base + "/v1/chat/sessions", USER)
        assert status == 200 and isinstance(listing, dict)
        assert "before" in [s["title"] for s in listing["sessions"]]
        os.unlink(filler)
        status, body = get_json(daemon.base + "/v1/chat/sessions", USER, "POST", b'{"title": "after"}')
        assert status == 201, body
        status, body = get_json(daemon.base + "/v1/chat/send", USER, "POST", b'{"message": "hello again"}')
        assert status == 200, body
    finally:
        with contextlib.suppress(Exception):
            daemon.stop()
    log = daemon.log.read_text()
    assert log.count("Database disk full") == 1, log[-3000:]
    assert "Database writes succeed again" in log
    assert "cannot rollback" not in log and "Traceback" not in log, log[-3000:]
