"""The errors raee raises on purpose: a user's input, configuration, file or environment is wrong.

Their message names the problem and the fix. The command-line entry points print it as one paragraph,
``error: <message>``, exit with status 2 and show no traceback (``HYDRA_FULL_ERROR=1`` or
``log_level=DEBUG`` show it; see :mod:`raee.cli`); any other exception is a bug and keeps its traceback.
Each subclass also derives from the built-in type that code catching it expects (a missing file is a
``FileNotFoundError``, a missing package an ``ImportError``).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix: a knob out of range, a missing column, a damaged database.

    A ``ValueError``, so code (and tests) that catch ``ValueError`` keep working."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or a run needs) does not exist."""


class MissingPackageError(UserError, ImportError):
    """An option the user chose needs a pip package that is not installed; the message names it."""


class UnreachableError(UserError, ConnectionError):
    """A hub the user named could not be reached (no network, offline mode, unknown name)."""


class SystemLimitError(UserError, OSError):
    """The operating system refuses what a run needs (e.g. open files); the message names the limit."""
