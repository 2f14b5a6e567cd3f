"""Errors that a user caused and can fix: reported as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input (config, data files, environment); the message says what is wrong and the fix."""
