"""Errors caused by the user's input (config, data, checkpoints, artifacts), reported as one clear line.

`train.py` prints these without a stack trace and exits with status 2; anything else is a bug and keeps its trace.
"""


class UserError(Exception):
    """Bad input: the message names the file, key or value and what was expected."""


class InputFileError(UserError, ValueError):
    """A data, config or checkpoint file is malformed (truncated JSON, wrong schema, wrong architecture, ...)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the run needs is not where the config says it is."""
