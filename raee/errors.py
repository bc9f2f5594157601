"""The errors raee raises on purpose: a user's input, configuration or file is wrong.

Their message names the problem and the fix. The command-line entry points print it as one paragraph,
``error: <message>``, exit with status 2 and show no traceback (``HYDRA_FULL_ERROR=1`` or
``log_level=DEBUG`` show it); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix: a knob out of range, a missing column, a damaged database.

    A ``ValueError``, so code (and tests) that catch ``ValueError`` keep working."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or a run needs) does not exist."""
