"""The one error type a user can cause: it names the file and the field."""

from __future__ import annotations


def describe_error(error: BaseException) -> str:
    """An error in one line; a remote one (Ray wraps it with the remote traceback) as its cause."""
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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
