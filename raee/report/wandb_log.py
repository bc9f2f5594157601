"""Log a report's table and charts to wandb (optional; never fails the report)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from raee.report.tables import csv_ready


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_group(root: str | Path) -> str:
    """The wandb group raee.run gives a sweep's runs ('multirun/x/2026-01-01/12-00' -> 'multirun_x_2026-01-01_12-00'),
    so that the report lands beside them when DIR is given as Hydra printed it."""
    return Path(root).as_posix().replace("/", "_").strip("_.") or Path(root).resolve().name


def log_to_wandb(df: pd.DataFrame, figures: dict[str, str | Path] | Iterable[str | Path], group: str | None,
                 project: str = "raee", directory: str | Path | None = None) -> bool:
    """Log the results table and figures to the active wandb run, or to a new one (job_type "report").

    WANDB_MODE is respected (default offline: files under ``directory``/wandb, upload later with
    ``wandb sync``); online without a known API key falls back to offline instead of prompting.
    Never raises: returns False (with a printed reason) when wandb is disabled, missing or fails.
    """
    mode = os.environ.get("WANDB_MODE", "offline").lower()
    if mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        print("wandb: disabled (WANDB_MODE=disabled or WANDB_DISABLED); report not logged")
        return False
    try:
        import wandb
    except ImportError:
        print("wandb: not installed (pip install wandb); report not logged")
        return False
    if mode == "online" and not _wandb_key_known():
        print("wandb: WANDB_MODE=online but no API key (wandb login); logging offline instead")
        mode = "offline"
    figures = figures if isinstance(figures, dict) else {Path(p).stem: p for p in figures}
    run, created = wandb.run, False
    try:
        if run is None:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=project, group=group, job_type="report", mode=mode,
                             dir=str(directory) if directory is not None else None)
            created = True
        table = csv_ready(df)
        table = table.astype({c: str for c in table.columns if table[c].dtype == object})
        payload: dict[str, Any] = {"report/results": wandb.Table(dataframe=table)}
        payload.update({f"report/{name}": wandb.Image(str(p)) for name, p in figures.items()})
        run.log(payload)
    except Exception as err:  # noqa: BLE001 - logging is optional; the files are already written
        print(f"wandb: logging failed ({type(err).__name__}: {err}); the report files are unaffected")
        return False
    finally:
        if created and run is not None:
            run.finish()
    print(f"wandb: logged the report (mode={mode}, group={group})")
    return True
