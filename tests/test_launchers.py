"""Sweeps through Hydra's launcher and sweeper plugins, in real processes: parallel local jobs (joblib)
sharing one head cache, the submitit launcher's local executor, and an Optuna search whose Pareto set
the report shows. Skipped where the plugins are not installed (pip install -e '.[launchers,optuna]')."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from raee.report import main as report_main
from tests.test_sweep import run_raee

pytestmark = pytest.mark.slow

TINY = ["backbone=tiny_bert", "logger=none", "compare_oracle=false", "trainer.enable_progress_bar=false"]


def tiny_csv(path: Path, n: int = 45) -> Path:
    """Three separable topics in one CSV (text,label), split here by data=csv."""
    topics = {"sport": "match goal team striker league", "money": "shares bank market rates profit",
              "film": "actor film award festival cinema"}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = list(topics)[i % 3]
            words = topics[label].split()
            writer.writerow([" ".join(words[i % 5:] + words[: i % 5]), label])
    return path


def csv_data(path: Path) -> list[str]:
    return ["data=csv", f"data.file={path}", "data.train_file=null", "data.name=topics", "data.text_column=text",
            "data.label_column=label"]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_joblib_runs_jobs_in_parallel_processes_one_level_deep_sharing_one_head(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[launchers]'")
    (tmp_path / "data").mkdir()
    data = tiny_csv(tmp_path / "data" / "topics.csv")
    sweep = tmp_path / "sweep"
    proc = run_raee(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "exit=full,entropy",
                     f"hydra.sweep.dir={sweep}", *csv_data(data), *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = job_dirs(sweep)
    # data.file=<absolute path>: one directory per job directly under the sweep directory
    assert len(jobs) == 2 and all((j / "summary.json").is_file() for j in jobs), [j.name for j in jobs]
    assert all(j.name.startswith(f"{i}_") and "data.file=topics.csv" in j.name for i, j in enumerate(jobs))
    overrides = (jobs[0] / ".hydra" / "overrides.yaml").read_text()
    assert f"data.file={data}" in overrides, "the job's files keep the full override"
    heads = [p for p in (tmp_path / "cache" / "heads").iterdir() if not p.name.startswith(".")]
    assert len(heads) == 1, "both jobs use the same fitted head"
    assert report_main([str(sweep)]) == 0
    assert {"full", "entropy"} <= set(capsys.readouterr().out.split())


def two_job_sweep(tmp_path: Path, launcher: list[str]) -> Path:
    """exit=full,entropy through ``launcher`` on a tiny model and data; checks both summaries; the sweep dir."""
    sweep = tmp_path / "sweep"
    proc = run_raee(["-m", *launcher, "exit=full,entropy", f"hydra.sweep.dir={sweep}", "data=bbcnews_small",
                     "data.max_train_examples=30", "data.max_eval_examples=10", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    assert {json.loads((j / "summary.json").read_text())["method"] for j in jobs} == {"full", "entropy"}
    return sweep


def test_submitit_local_executor_runs_a_two_job_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[launchers]'")
    sweep = two_job_sweep(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])
    assert list((sweep / ".submitit").glob("*/*_log.out")), "submitit ran each job as its own process"


def test_ray_launcher_runs_a_two_job_sweep_on_a_local_ray_instance(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="pip install -e '.[ray]'")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    two_job_sweep(tmp_path, ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"])


def test_optuna_search_returns_objectives_and_the_report_shows_its_pareto_set(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[optuna]'")
    sweep = tmp_path / "search"
    proc = run_raee(["-m", "+hparams_search=entropy_optuna", "hydra.sweeper.n_trials=3",
                     "objectives=[accuracy,mean_exit_layer]", f"hydra.sweep.dir={sweep}",
                     *csv_data(tiny_csv(tmp_path / "topics.csv")), *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((j / "summary.json").read_text()) for j in job_dirs(sweep)]
    assert len(summaries) == 3 and {s["split"] for s in summaries} == {"validation"}, "search on validation"
    import yaml

    solutions = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    # the objectives the sweeper saw are the jobs' summary fields (main returned them)
    seen = {(s["accuracy"], s["mean_exit_layer"]) for s in summaries}
    assert solutions and all(tuple(s["values"]) in seen for s in solutions)
    assert report_main([str(sweep)]) == 0
    pareto = (sweep / "report" / "optuna_pareto.md").read_text()
    assert "accuracy (maximize)" in pareto and "mean_exit_layer (minimize)" in pareto
    rows = [line for line in pareto.splitlines() if line.startswith("| ")][2:]  # after header and rule
    assert len(rows) == len(solutions)
    names = {j.name for j in job_dirs(sweep)}
    assert all(row.rstrip(" |").rsplit("| ", 1)[-1] in names for row in rows), "each trial names its run"
    printed = capsys.readouterr().out
    assert "Optuna Pareto set" in printed and "| dataset | split |" in printed, "the table says: validation"
