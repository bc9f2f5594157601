"""Console hygiene for the entry points: one line per event, no advertisements, no third-party noise.

Called by ``raee.run`` (and usable by any script) after Hydra has configured logging:

- Lightning adds its own stderr handler to the ``lightning`` logger on import while its records also
  propagate to the root logger that Hydra configured: every line came out twice. Lightning's handler
  is removed when the root logger has handlers, so each record is written once (console and job log).
- Lightning's INFO banners (device availability, once per Trainer) are hidden unless
  ``log_level=INFO``/``DEBUG`` asks for them; its "Tip" advertisements never show.
- Deprecation warnings raised inside third-party code (not ours to fix) are silenced at the default
  level; ``log_level=INFO`` or lower shows them again.

The module is light (no torch import) because Hydra's logging config may name its filter.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from raee.errors import UserError

#: batches between progress-bar refreshes when the console is a log file (tqdm writes a refresh each time)
LOG_REFRESH_STEPS = 10

#: loggers of libraries whose INFO lines are details, not events of a run
THIRD_PARTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

#: (message regex, category) of third-party warnings that say nothing about the user's run
THIRD_PARTY_WARNINGS = (
    # torch deprecated LeafSpec; Lightning's own _pytree still uses it (every trainer.test)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # the backbone is frozen in eval mode on purpose while heads are trained
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
)


class DropAdvertisements(logging.Filter):
    """Drops log records that advertise other products (Lightning's "💡 Tip ... litlogger/litmodels")."""

    MARKERS = ("💡 Tip", "litlogger", "litmodels")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in self.MARKERS)


def level_number(level: str | int) -> int:
    """logging.WARNING for 'WARNING' (or 30); a clear error for a name that is no level."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).upper())
    if not isinstance(value, int):
        raise UserError(f"log_level={level!r} is not a logging level: use DEBUG, INFO, WARNING or ERROR")
    return value


def quiet_console(log_level: str | int = "WARNING") -> None:
    """Route Lightning's records through the configured handlers once, at ``log_level``, without ads."""
    import lightning  # noqa: F401 - its import adds the handler removed below

    level = level_number(log_level)
    root = logging.getLogger()
    lightning_logger = logging.getLogger("lightning")
    if root.handlers:
        for handler in list(lightning_logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                lightning_logger.removeHandler(handler)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for handler in [*root.handlers, *lightning_logger.handlers]:
        if not any(isinstance(f, DropAdvertisements) for f in handler.filters):
            handler.addFilter(DropAdvertisements())
    if level >= logging.WARNING:
        for message, category in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def labelled_progress_bar(description: str | None = None) -> Any:
    """Lightning's progress bar, readable wherever the console goes: rich on a terminal; tqdm when stdout
    is a file or a pipe (a job's log), because rich draws nothing there until the end, so a long fine-tune
    would look hung. ``description`` names the test pass, so that the passes of one run (full model,
    oracle, method) tell themselves apart."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    terminal = sys.stdout.isatty()
    base = RichProgressBar if _RICH_AVAILABLE and terminal else TQDMProgressBar
    # in a log every refresh is a line's worth of bytes: refresh every LOG_REFRESH_STEPS batches there
    kwargs = {} if terminal else {"refresh_rate": LOG_REFRESH_STEPS}

    class LabelledProgressBar(base):  # type: ignore[misc, valid-type]
        @property
        def test_description(self) -> str:
            return description or super().test_description

        def init_test_tqdm(self) -> Any:  # tqdm only: Lightning's is named "Testing" whatever the description
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            return Tqdm(desc=self.test_description, position=2 * self.process_position, disable=self.is_disabled,
                        leave=True, dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT)

    return LabelledProgressBar(**kwargs)
