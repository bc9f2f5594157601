"""How a command ends on an error: a user's error as one paragraph, a bug with its full traceback.

Every entry point (``raee``, ``raee-build-db``, ``raee-report``, the experiments/ scripts) runs its work
inside :func:`user_errors`. A :class:`~raee.errors.UserError` then prints ``error: <message>`` on stderr,
as one paragraph, and exits with status 2: no traceback, and no chained third-party error (FAISS's,
pandas') above the message, which already says what went wrong and how to fix it. Also counted as the
user's: the same error wrapped by ``hydra.utils.instantiate`` (raised in a constructor), a config value
left at ``???`` and Hydra's own composition errors (an unknown config option). Any other exception is a
bug and keeps its full traceback. ``HYDRA_FULL_ERROR=1`` or ``log_level=DEBUG`` print a user's error's
traceback too (with the chained error that caused it) above the same ``error:`` line and status.

    with user_errors(cfg.get("log_level")):
        run(cfg)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from raee.errors import UserError

#: exit status of a command that stopped on a user's error (argparse uses 2 for bad arguments too)
USER_ERROR_STATUS = 2


def user_error(err: BaseException) -> BaseException | None:
    """The user's error that ``err`` is or wraps, else None (a bug).

    Hydra's ``instantiate`` wraps what a constructor raised in an InstantiationException (the original
    as its ``__cause__``); only such wrappers are looked through, so a bug raised while handling a user's
    error stays a bug."""
    from hydra.errors import CompactHydraException, InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    while isinstance(err, InstantiationException):
        err = err.__cause__ or err.__context__
    return err if isinstance(err, (UserError, MissingMandatoryValue, CompactHydraException)) else None


def user_message(err: BaseException) -> str | None:
    """One paragraph (a single line) saying what the user got wrong and how to fix it; None for a bug."""
    from omegaconf.errors import MissingMandatoryValue

    found = user_error(err)
    if found is None:
        return None
    if isinstance(found, MissingMandatoryValue):
        key = found.full_key or "a config value"
        message = f"{key} has no value (it is ??? in the config): give it on the command line, e.g. {key}=..."
    else:
        message = str(found)
    return re.sub(r"\s*\n\s*", " ", message.strip())


def show_tracebacks(log_level: str | int | None = None) -> bool:
    """Whether the user asked for every error's traceback: HYDRA_FULL_ERROR=1 (as Hydra reads it) or
    log_level=DEBUG."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    if log_level is None:
        return False
    level = log_level if isinstance(log_level, int) else logging.getLevelName(str(log_level).upper())
    return isinstance(level, int) and level <= logging.DEBUG


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_STATUS)


@contextmanager
def user_errors(log_level: str | int | None = None) -> Iterator[None]:
    """Run the body; a user's error ends the command with :func:`fail` (after its traceback when
    :func:`show_tracebacks`), anything else propagates with its traceback."""
    try:
        yield
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        if show_tracebacks(log_level):  # the whole chain: the user's error and the third-party one under it
            traceback.print_exception(err)
        fail(message)
