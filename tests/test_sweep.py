"""A tiny sweep goes through Hydra multirun, the report and the charts; re-running skips finished runs;
wandb in offline mode writes its run files without a network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["backbone=tiny_bert", "data=bbcnews_small", "data.max_train_examples=40", "data.max_eval_examples=20",
        "trainer.enable_progress_bar=false", "compare_oracle=false"]

pytestmark = pytest.mark.slow


def run_raee(args: list[str], tmp_path: Path, mode: str = "disabled") -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE=mode, HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "raee.run", *args, f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_sweep_report_and_resume(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_raee(["-m", "exit=full,entropy", "logger=none", f"hydra.sweep.dir={sweep}", *TINY],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["method"] for p in summaries} == {"full", "entropy"}

    report = subprocess.run([sys.executable, "-m", "raee.report", str(sweep)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    out = sweep / "report"
    import pandas as pd

    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2
    for column in ("method", "accuracy", "mean_exit_layer", "layer_speedup", "wall_speedup", "retrieval_share"):
        assert column in table.columns
    for png in ("speed_vs_accuracy.png", "exit_layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same sweep again: both jobs are skipped, their summaries untouched
    before = {p: p.stat().st_mtime_ns for p in summaries}
    again = run_raee(["-m", "exit=full,entropy", "logger=none", f"hydra.sweep.dir={sweep}", *TINY],
                     tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipping:") == 2
    assert {p: p.stat().st_mtime_ns for p in summaries} == before


def test_wandb_offline_writes_run_files(tmp_path):
    out = tmp_path / "run"
    proc = run_raee(["exit=fixed", "exit.layer=1", "logger=wandb", f"hydra.run.dir={out}", *TINY], tmp_path,
                    mode="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, "wandb offline must write a local run directory"
    assert any(runs[0].rglob("*.wandb")), "the run's event file is missing"
