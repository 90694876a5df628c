"""Errors that mean "the user gave us something wrong" (reported in one line, exit 2)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a value or an option. The CLI prints one line."""


class ConfigError(UserError):
    """A run config that cannot be loaded: unknown key, wrong type, bad value."""


class DataError(UserError):
    """Input data that cannot be read: missing files, truncated archives, bad labels."""


def one_line(exc: BaseException) -> str:
    """The last meaningful line of an exception message.

    Errors raised in DataLoader workers come back wrapped with the worker's
    traceback in their message; the user needs only the final line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in ("specialists.errors.DataError: ", "DataError: ", "UserError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last
