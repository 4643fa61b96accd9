"""Errors a user can fix: the CLI prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input: a config, a data file, a path or a command-line flag."""


class ConfigError(UserError):
    """A config key that does not exist, a value of the wrong type, or an unknown name."""


class DataError(UserError):
    """A data file that cannot be read as expected; the message names the file and line."""


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or meta-gradient during training."""
