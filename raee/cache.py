"""Build-once cache directories that are safe when several processes need the same entry.

Fitted heads, exit databases, GGUF conversions, fine-tuned checkpoints and fetched assets are
directories that are expensive to make and cheap to load. :func:`load_or_build` makes each one
at most once, however many jobs of a sweep ask for it at the same time:

- a finished entry is loaded without any lock (the common, fast path);
- otherwise one process takes a file lock (``.<name>.lock`` beside the entry, via ``filelock``)
  and builds into a fresh temporary directory beside the target, then renames it into place;
  the others wait on the lock and load what the winner wrote;
- a process that dies while building leaves only a ``.<name>.building-*`` directory, which no
  loader looks at and the next builder removes; the lock dies with the process;
- an automatic cache entry that fails to load (truncated, edited) is rebuilt with a warning;
  a directory the user named (``auto=False``) is refused instead, with the loader's error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

T = TypeVar("T")

#: prefix of the directories a build writes into before the rename (never loaded)
BUILDING = "building-"


def lock_path(target: str | Path) -> Path:
    """The lock file that guards ``target``'s build (beside it, hidden)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_dead_builds(target: Path) -> None:
    """Remove temporary directories left by builders that died (only called while holding the lock)."""
    for stale in target.parent.glob(f".{target.name}.{BUILDING}*"):
        _remove(stale)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _try_load(target: Path, load: Callable[[Path], T]) -> tuple[T | None, Exception | None]:
    try:
        return load(target), None
    except Exception as err:  # noqa: BLE001 - any failure to load means the entry is unusable
        return None, err


def load_or_build(target: str | Path, build: Callable[[Path], None], load: Callable[[Path], T], *,
                  auto: bool = True, what: str = "cache entry", rebuild: bool = False) -> T:
    """Load the directory ``target``, building it first (once, under a lock) when needed.

    build: writes a complete entry into the empty directory it is given (a temporary one, renamed
        to ``target`` afterwards, so a reader never sees half an entry).
    load: reads an entry; any exception it raises marks the entry as damaged.
    auto: ``target`` is an automatic cache entry (rebuilt with a warning when damaged); False for a
        directory the user named, whose damage is an error (the loader's exception is re-raised).
    rebuild: build again even when a loadable entry exists (the user asked for it).
    """
    target = Path(target)
    if target.exists() and not rebuild:
        value, error = _try_load(target, load)
        if error is None:
            return value  # type: ignore[return-value]
        if not auto:
            raise error
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path(target))):
        if target.exists():
            if not rebuild:
                # another process may have (re)built it while we waited for the lock
                value, error = _try_load(target, load)
                if error is None:
                    return value  # type: ignore[return-value]
                if not auto:
                    raise error
                warnings.warn(f"{what} {target} is damaged ({type(error).__name__}: {error}); rebuilding it",
                              stacklevel=2)
        _clean_dead_builds(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{BUILDING}", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a cache entry gets normal permissions
        try:
            build(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.{BUILDING}old-{os.getpid()}")
                os.replace(target, old)
                _remove(old)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                _remove(tmp)
    return load(target)
