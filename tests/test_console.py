"""The console of a default run: one line per event, no advertisement, no third-party noise; the
log_level knob brings Lightning's details back."""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest

from raee.logs import DropAdvertisements, level_number, quiet_console
from tests.test_launchers import csv_data, tiny_csv
from tests.test_sweep import run_raee


@pytest.mark.slow
def test_the_default_run_prints_each_line_once_without_ads_or_noise(tmp_path):
    # the default config (exit=raee, logger=wandb offline, progress bars on) on a tiny model and data file
    proc = run_raee(["backbone=tiny_bert", f"hydra.run.dir={tmp_path / 'run'}", *csv_data(tiny_csv(tmp_path / "t.csv"))],
                    tmp_path, mode="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    # progress bars redraw with carriage returns: each state is its own line; one event printed by two
    # handlers differs only in its prefix ("[time][logger][INFO] - msg" and "INFO: msg"), so prefixes go
    prefix = re.compile(r"^(\[[^\]]*\])*\s*(-\s*)?((DEBUG|INFO|WARNING|ERROR):\s*)?")
    lines = [prefix.sub("", line.strip()) for line in re.split(r"[\r\n]+", text) if line.strip()]
    # a bar's redraw of the same state (tqdm's start and its reset, in a log) is not an event
    redraw = re.compile(r"\[[^\]]*(it/s|s/it)\]$")
    repeated = {line: n for line, n in Counter(lines).items() if n > 1 and not redraw.search(line)}
    assert not repeated, f"lines printed more than once: {repeated}"
    for noise in ("💡", "Tip:", "litlogger", "litmodels", "deprecated", "WARNING", "GPU available"):
        assert noise not in text, f"{noise!r} in the console output:\n{text[-3000:]}"
    assert " result " in text and "accuracy:" in text and "wandb: offline run in" in text
    for description in ("test: full", "test: oracle", "test: raee"):
        assert description in text, "each test pass names itself"


@pytest.fixture()
def hydra_like_logging():
    """A root handler as Hydra installs one, and Lightning's own handler; restored afterwards."""
    import lightning  # noqa: F401

    root, lightning_logger = logging.getLogger(), logging.getLogger("lightning")
    saved = (root.handlers[:], lightning_logger.handlers[:], lightning_logger.level)
    handler = logging.StreamHandler()
    root.addHandler(handler)
    lightning_logger.addHandler(logging.StreamHandler())
    yield handler
    root.handlers[:], lightning_logger.handlers[:] = saved[0], saved[1]
    lightning_logger.setLevel(saved[2])


def test_quiet_console_routes_lightning_once_and_log_level_brings_details_back(hydra_like_logging):
    quiet_console("WARNING")
    lightning_logger = logging.getLogger("lightning")
    assert not [h for h in lightning_logger.handlers if isinstance(h, logging.StreamHandler)], \
        "records reach the console through the root handler only"
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.WARNING
    assert any(isinstance(f, DropAdvertisements) for f in hydra_like_logging.filters)
    quiet_console("INFO")
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO
    ad = logging.LogRecord("lightning.pytorch", logging.INFO, "", 0, "💡 Tip: try installing litlogger", None, None)
    event = logging.LogRecord("lightning.pytorch", logging.INFO, "", 0, "GPU available: False", None, None)
    assert not DropAdvertisements().filter(ad) and DropAdvertisements().filter(event)
    with pytest.raises(ValueError, match="log_level='LOUD' is not a logging level"):
        level_number("LOUD")


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_draw_live_on_a_terminal_and_as_lines_in_a_log(monkeypatch, terminal):
    # rich draws nothing into a log file until the end, so a fine-tune logged to a file looked hung
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from raee.logs import LOG_REFRESH_STEPS, labelled_progress_bar

    monkeypatch.setattr("sys.stdout.isatty", lambda: terminal)
    bar = labelled_progress_bar("test: raee")
    assert bar.test_description == "test: raee"
    if terminal:
        assert isinstance(bar, RichProgressBar)
    else:
        assert isinstance(bar, TQDMProgressBar) and not isinstance(bar, RichProgressBar)
        assert bar.refresh_rate == LOG_REFRESH_STEPS
    assert labelled_progress_bar().test_description  # unnamed: Lightning's own description
