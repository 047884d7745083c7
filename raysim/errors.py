"""The one error type a user can cause: it names the file and the field."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input from a user: a file, a field in it, and what is wrong.

    The CLI prints ``str(err)`` as one line and exits non-zero, with no
    traceback unless ``--debug`` is given.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        self.message = message
        where = ": ".join(part for part in (file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
