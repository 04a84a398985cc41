"""Session titles: the prompt that asks the model for one, and the reference's clean-up and fallback rules.

Lengths are counted in characters, not bytes (the reference could cut a UTF-8 sequence in half).
"""

from __future__ import annotations

MAX_TITLE = 50
FALLBACK_WORDS = 6
FALLBACK_CHARS = 40
DEFAULT_TITLES = ("New Chat Session", "New Chat")


def title_prompt(user_text: str, assistant_text: str) -> str:
    """The single user message that asks for a title."""
    return (
        "Based on this conversation, generate a concise, descriptive title (max 50 characters):\n\n"
        f"User: {user_text[:2000]}\nAssistant: {assistant_text[:2000]}\n\n"
        "Respond with ONLY the title, no quotes, no punctuation at the end, no explanation."
    )


def fallback_title(user_text: str) -> str:
    """The first words of the user's message (at most 6 and 40 characters), or ``New Chat``."""
    words = user_text.split()
    chosen: list[str] = []
    length = 0
    for word in words[:FALLBACK_WORDS]:
        added = len(word) + (1 if chosen else 0)
        if length + added > FALLBACK_CHARS:
            break
        chosen.append(word)
        length += added
    if not chosen:
        return "New Chat"
    title = " ".join(chosen)
    return title + "..." if len(chosen) < len(words) else title


def clean_title(raw: str, user_text: str) -> str:
    """Trim, strip quotes, cut to 50 characters; too short or 'untitled' gives the fallback."""
    title = raw.strip().splitlines()[0].strip() if raw.strip() else ""
    title = title.strip("\"'“”‘’` ").strip()
    if len(title) > MAX_TITLE:
        title = title[: MAX_TITLE - 3].rstrip() + "..."
    if len(title) < 5 or title.lower() == "untitled":
        return fallback_title(user_text)
    return title


def is_automatic(title: str) -> bool:
    """Titles the daemon gave by default, which a generated title may replace."""
    return title in DEFAULT_TITLES or title.startswith("Chat - ")
