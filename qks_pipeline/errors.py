"""User-facing errors: one line naming the file and the problem; the CLI prints it and exits 1."""

from __future__ import annotations

# the most characters of a path (or a value from a file) that a message echoes
ECHO_LIMIT = 200
# room kept for the marker of what `shorten` leaves out
MARKER_ROOM = 40


def shorten(text: object, limit: int = ECHO_LIMIT) -> str:
    """`text` as at most `limit` characters: a longer one keeps its start and end, and its middle
    becomes a marker counting the characters left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - MARKER_ROOM, 2)
    head = keep // 2
    return f"{text[:head]}...[{len(text) - keep:,} characters]...{text[head - keep :]}"


class QKSError(Exception):
    """An error a user can cause (bad manifest, missing file, stale cache): one line, exit 1.

    The path is echoed shortened to `ECHO_LIMIT` characters.
    """

    def __init__(self, message: str, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None and line is not None:
            where = f"{shorten(path)}:{line}: "
        elif path is not None:
            where = f"{shorten(path)}: "
        self.message = where + message
        super().__init__(self.message)
