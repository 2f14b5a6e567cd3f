"""Errors that a user caused and can fix: reported as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input (config, data files, environment); the message says what is wrong and the fix."""


class Interrupted(UserError):
    """Training stopped on SIGINT or SIGTERM, after writing a checkpoint; the run ends KILLED."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
