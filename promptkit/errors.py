"""promptkit's own error types.

The command line turns a ``UserError`` (bad input: a flag, a file, a dataset, saved prompts, a model) into one
line and exit code 1, as it does an OS error about the user's files (missing, no permission, disk full). Any
other exception is a bug in promptkit or its dependencies and keeps its traceback (``--debug``: always).
"""

from __future__ import annotations


class UserError(Exception):
    """Input that promptkit cannot use; the message says what and where, and how to fix it."""


class ConfigError(UserError, ValueError):
    """A method setting or flag that is unknown, of the wrong type or out of range, or that cannot work here: an
    unknown protocol name, a device or backend this machine lacks, an output path that cannot be written."""
