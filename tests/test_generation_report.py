"""The report reads generation runs: ROUGE-L against FLOPs and against wall-clock speed-up, dominated runs marked."""

from __future__ import annotations

import pandas as pd
import pytest

from raee.report import collect, write_report
from raee.run import run_job
from tests.test_generation_run import compose_cfg, csv_overrides

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny decoding: one thread (conftest)


def test_report_of_generation_runs(tmp_path):
    sweep = tmp_path / "sweep"
    base = csv_overrides(tmp_path) + ["data.max_eval_examples=3", "data.max_new_tokens=3"]
    for i, exit_args in enumerate((["exit=full"], ["exit=fixed", "exit.layer=1"], ["exit=fixed", "exit.layer=2"])):
        run_job(compose_cfg(base + exit_args), str(sweep / f"{i}_job"), multirun=False)
    df = collect(sweep)
    assert set(df["task_type"]) == {"generation"} and set(df["method"]) == {"full", "fixed"}
    assert df["rougeL"].notna().all() and (df["task_metric_value"] == df["rougeL"]).all()
    paths = write_report(df, tmp_path / "report")
    table = pd.read_csv(paths["results.csv"])
    # cost: FLOPs per token in layers of the full model (L / FLOPs speed-up); the full model costs L
    full = table[table["method"] == "full"].iloc[0]
    assert full["cost"] == pytest.approx(3.0)
    fixed = table[table["method"] == "fixed"].sort_values("cost")
    assert list(fixed["cost"]) == sorted(fixed["cost"]) and fixed["cost"].iloc[0] < 3.0
    assert "dominated_layers" in table.columns and "dominated_speed" in table.columns
    # ROUGE-L ties (a random model scores 0 everywhere): the cheaper runs dominate the full model
    if table["task_metric_value"].nunique() == 1:
        assert bool(full["dominated_layers"])
    for name in ("pareto_layers.png", "pareto_speedup.png", "speed_vs_accuracy.png", "exit_layers.png"):
        assert paths[name].stat().st_size > 0
    assert "tokens/s" in (tmp_path / "report" / "results.md").read_text()
