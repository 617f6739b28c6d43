"""User-facing errors: one line naming the file and the problem; the CLI prints it and exits 1."""

from __future__ import annotations


class QKSError(Exception):
    """An error a user can cause (bad manifest, missing file, stale cache): one line, exit 1."""

    def __init__(self, message: str, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None and line is not None:
            where = f"{path}:{line}: "
        elif path is not None:
            where = f"{path}: "
        self.message = where + message
        super().__init__(self.message)
