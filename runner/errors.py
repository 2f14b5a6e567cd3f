"""Errors that a user caused and can fix: reported as one clear line, without a traceback."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input (config, data files, environment); the message says what is wrong and the fix.
    The command exits with `exit_code`."""

    exit_code = 1


class Interrupted(UserError):
    """Training stopped on SIGINT or SIGTERM, after writing a checkpoint; the run ends KILLED.
    Exits 130 or 143, as a process killed by the signal would."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def reported(command: str) -> Iterator[None]:
    """Every command's handling of a `UserError`: `COMMAND: error: MESSAGE` on stderr, one line,
    and exit with the error's code."""
    try:
        yield
    except UserError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
