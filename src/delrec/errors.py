"""The one exception type the CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations


class DelrecError(Exception):
    """A user-facing error: bad input, a mismatched artifact, a missing file.

    The message names the file (and line or field where known) and what was expected, so the
    CLI can print it as is, without a traceback.
    """

    def __init__(self, message: str, *, path: object | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.path = path
        self.field = field
