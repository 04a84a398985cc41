"""The one place that reaches into Twisted's private attributes; each use is named, explained and tested.

Twisted gives no public way to do these two things, and both are measured or observable behaviour:

* :func:`clear_stop_signal` — twistd re-raises the signal that stopped the reactor once shutdown is over
  (``twisted.scripts.twistd`` reads ``reactor._exitSignal``), so a daemon stopped by SIGTERM would die "by
  SIGTERM" even after a complete graceful stop. Clearing it makes that stop exit 0, as systemd expects.
* :class:`DirectStdin` — writing a request to an idle child's stdin pipe at once instead of after the next
  reactor iteration halves the latency of a sequential MCP call. It reads the pipe writer's buffer
  (``dataBuffer``, ``offset``, ``_tempDataBuffer``) to be sure nothing is queued ahead of the new bytes.

If a Twisted release renames any of these, :func:`clear_stop_signal` does nothing and :func:`direct_stdin`
returns ``None`` (the transport's own buffered write is used): both degrade to Twisted's public behaviour.
``tests/test_twisted_internals.py`` holds them against the installed Twisted so such a change is seen.

The HTTP server's reliance on ``HTTPChannel`` internals (the request deadline, JSON answers to oversized
heads, the request target a body limit is chosen by) stays in :class:`aichat.api.site.APIChannel`, where
it is documented and tested the same way: only ``api/`` knows HTTP.
"""

from __future__ import annotations

import os
import signal
from typing import Any

#: The signals whose re-raising after a graceful stop :func:`clear_stop_signal` prevents.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_WRITER_ATTRIBUTES = ("fd", "offset", "dataBuffer", "_tempDataBuffer")


def clear_stop_signal(reactor: Any) -> bool:
    """Forget that SIGTERM or SIGINT stopped ``reactor``, so twistd exits 0; True if there was one."""
    if getattr(reactor, "_exitSignal", None) in STOP_SIGNALS:
        reactor._exitSignal = None
        return True
    return False


class DirectStdin:
    """Writes to a child's stdin pipe synchronously while the pipe writer has nothing queued."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def write(self, data: bytes) -> bytes:
        """Write as much of ``data`` as the pipe takes now, if nothing is queued; return the rest.

        The rest (all of ``data`` when the writer has queued bytes or the write fails) must go through
        the transport's buffered ``write``, which keeps the order.
        """
        writer = self._writer
        if writer._tempDataBuffer or writer.offset < len(writer.dataBuffer):
            return data
        try:
            written = os.write(writer.fd, data)
        except OSError:
            return data
        return data[written:]


def direct_stdin(transport: Any) -> DirectStdin | None:
    """A :class:`DirectStdin` for a process transport's stdin (fd 0), or None if it is not Twisted's pipe
    writer of a POSIX process (a fake transport in tests, or a Twisted whose internals changed)."""
    writer = getattr(transport, "pipes", {}).get(0)
    if writer is None or not all(hasattr(writer, name) for name in _WRITER_ATTRIBUTES):
        return None
    return DirectStdin(writer)
