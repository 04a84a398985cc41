"""Unit tests of :mod:`aichat.sdnotify` against real ``AF_UNIX`` datagram sockets (no systemd needed)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from aichat.sdnotify import notify


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a filesystem path, as systemd's ``/run/systemd/notify``."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


def test_sends_state_to_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    assert notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"
    assert notify("STOPPING=1\nSTATUS=bye", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_sends_state_to_abstract_socket() -> None:
    name = f"aichat-sdnotify-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_default_environ_is_process_environment(
    path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_no_usable_socket_is_a_no_op(value: str) -> None:
    environ = {"NOTIFY_SOCKET": value} if value else {}
    assert notify("READY=1", environ) is False


def test_unreachable_socket_returns_false(tmp_path: Path) -> None:
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False


def test_empty_state_sends_nothing(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    assert notify("", {"NOTIFY_SOCKET": path}) is False
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
