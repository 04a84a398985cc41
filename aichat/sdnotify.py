"""systemd readiness notification (``sd_notify``) without a dependency.

systemd starts a ``Type=notify`` service with ``NOTIFY_SOCKET`` naming an ``AF_UNIX`` datagram socket;
the daemon sends ``READY=1`` once it serves and ``STOPPING=1`` when it begins to shut down (see
``sd_notify(3)``). Outside systemd the variable is unset and :func:`notify` does nothing.

The path is either a filesystem path (``/run/systemd/notify``) or, starting with ``@``, a Linux
abstract-namespace name (the ``@`` stands for a leading NUL byte).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def _address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or ``None`` if it is not usable."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte, the rest of the name verbatim.
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    if value.startswith("/"):
        return value
    # systemd also accepts "vsock:..." addresses (VMs); this daemon never runs there.
    return None


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``) to the service manager.

    Returns ``True`` if the datagram was sent, ``False`` if there is no (usable) ``NOTIFY_SOCKET``
    or sending failed. It never raises: readiness notification must not crash the daemon.
    """
    address = _address(environ.get("NOTIFY_SOCKET", ""))
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True
