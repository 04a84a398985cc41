"""Keeping secrets and server internals out of what is logged and shown.

:class:`Scrubber` removes an API key (and any bearer token) from a text; it runs before any text is cut to
a length, so half a key never survives the cut. :func:`short_reason` turns an upstream's error text
(already scrubbed) into a one-line reason a user may be shown.
"""

from __future__ import annotations

import re

#: Characters of an upstream's error text shown to a user.
REASON_LIMIT = 200
#: The shortest beginning of the key redacted at the end of a truncated text ("sk-" alone says nothing).
MIN_KEY_PREFIX = 4
_BEARER = re.compile(r"Bearer\s+[^\s\"',]+")
_TRACEBACK_LINE = re.compile(r'^\s*(?:Traceback \(most recent call last\)|File "[^"]*", line \d+)')
#: An absolute path of two or more segments, not part of a URL or of a relative path.
_PATH = re.compile(r"(?<![\w:/.~-])(?:/[\w.+@~-]+){2,}/?")


class Scrubber:
    """Removes ``secret`` (and every ``Bearer`` token) from texts."""

    def __init__(self, secret: str = "") -> None:
        self._secret = secret

    def __call__(self, text: str, *, truncated: bool = False) -> str:
        """``text`` without the secret or any bearer token; ``truncated`` text (cut at a read limit) also
        loses a trailing beginning of the secret."""
        key = self._secret
        if key:
            text = text.replace(key, "[redacted]")
            if truncated:
                for length in range(min(len(key) - 1, len(text)), MIN_KEY_PREFIX - 1, -1):
                    if text.endswith(key[:length]):
                        text = text[:-length] + "[redacted]"
                        break
        return _BEARER.sub("Bearer [redacted]", text)


def short_reason(text: str, limit: int = REASON_LIMIT) -> str:
    """A short reason for a user: ``text`` (already scrubbed) without traceback lines or the paths of files
    on the server, in one line of at most ``limit`` characters."""
    lines = [line for line in text.splitlines() if line.strip() and not _TRACEBACK_LINE.match(line)]
    reason = _PATH.sub(_hide_path, " ".join(" ".join(lines).split()))
    if len(reason) <= limit:
        return reason
    cut = reason[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"


def _hide_path(match: re.Match[str]) -> str:
    """A file on the server (its name has an extension, or it lies three folders deep) becomes ``…``; an
    API path such as ``/v1/chat/completions`` stays."""
    path = match.group(0).rstrip("/")
    last = path.rsplit("/", 1)[-1]
    return "…" if "." in last.strip(".") or path.count("/") >= 4 else match.group(0)
