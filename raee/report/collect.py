"""Collect a sweep: one row per run from every summary.json below a directory, failed runs from error.json."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raee.errors import MissingFileError, UserError

SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.json"
#: Hydra writes this into a sweep's top directory
SWEEP_MARKER = "multirun.yaml"

#: the per-run columns of :func:`collect`, in order (knob_<name> columns follow ``knobs``)
COLUMNS = (
    "method", "knobs", "dataset", "split", "backbone", "head", "num_layers", "task_metric", "task_metric_value",
    "accuracy", "macro_f1", "mcc", "spearman", "budget", "mean_exit_layer", "mean_layers_computed", "layer_speedup",
    "computed_layer_speedup", "layers_saved", "flops_speedup", "key_layer_equivalents", "retrieval_layer_equivalents",
    "cost_layer_equivalents", "cost_speedup", "wall_per_cost_speedup", "retrieval_overhead_s",
    "wall_time_s", "full_wall_time_s", "wall_speedup",
    "sweep_wall_speedup", "throughput", "retrieval_share", "full_accuracy", "oracle_accuracy", "oracle_mean_exit_layer",
    "tuned_knob", "calibrated", "calibration_met", "val_accuracy", "val_full_accuracy", "val_mean_layers_computed",
    "num_examples", "seed", "exit_layer_counts", "overrides", "sweep", "run_dir",
    # generation runs (raee.generation): the task type, quality and speed in their own units
    "task_type", "rougeL", "rouge1", "rouge2", "exact_match", "full_task_metric_value", "tokens_per_s",
    "full_tokens_per_s", "prefill_flops_speedup", "decode_flops_speedup", "mean_generated_tokens",
    "full_mean_generated_tokens", "prompt_mean_exit_layer", "decode_wall_speedup", "latency_speedup",
    "acceptance_rate", "same_as_full_share")
NUMERIC_COLUMNS = ("task_metric_value", "accuracy", "macro_f1", "mcc", "spearman", "mean_exit_layer",
                   "mean_layers_computed", "layer_speedup", "computed_layer_speedup", "layers_saved", "flops_speedup",
                   "key_layer_equivalents", "retrieval_layer_equivalents", "cost_layer_equivalents", "cost_speedup",
                   "wall_per_cost_speedup", "retrieval_overhead_s",
                   "wall_time_s", "full_wall_time_s", "wall_speedup", "sweep_wall_speedup", "throughput",
                   "retrieval_share", "full_accuracy", "oracle_accuracy", "oracle_mean_exit_layer", "val_accuracy",
                   "val_full_accuracy", "val_mean_layers_computed", "rougeL", "rouge1", "rouge2", "exact_match",
                   "full_task_metric_value", "tokens_per_s", "full_tokens_per_s", "prefill_flops_speedup",
                   "decode_flops_speedup", "mean_generated_tokens", "full_mean_generated_tokens",
                   "prompt_mean_exit_layer", "decode_wall_speedup", "latency_speedup", "acceptance_rate",
                   "same_as_full_share")
FAILED_COLUMNS = ("run_dir", "method", "data", "backbone", "head", "error", "overrides")
HOW_TO_RUN = ("run a sweep first, e.g. `python -m raee.run -m +experiment=compare_all` or "
              "`python -m raee.run -m exit=full,entropy,raee`; each job writes summary.json into "
              "multirun/<...>/<date>/<time>/<job>/, then pass that sweep directory here")


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel else "."


def _sweep_dir(run_dir: Path, root: Path) -> Path:
    """The sweep a run belongs to: the nearest ancestor (up to ``root``) holding Hydra's multirun.yaml,
    else the run's parent. (Walking up matters: an override value with '/' nests the job directory.)"""
    for parent in [run_dir, *run_dir.parents]:
        if (parent / SWEEP_MARKER).exists():
            return parent
        if parent == root:
            break
    return run_dir.parent if run_dir != root else root


def _overrides(run_dir: Path) -> str:
    """The job's Hydra overrides ('exit=entropy,exit.threshold=0.3'), '' when there are none."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    import yaml  # PyYAML comes with Hydra

    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return ""
    return ",".join(str(i) for i in items)


def _hydra_choices(run_dir: Path) -> dict[str, str]:
    """The config-group options Hydra composed for a job ({'exit': 'patience', 'data': ...}), {} if unknown."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    import yaml

    try:
        choices = (yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    except (yaml.YAMLError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in (choices or {}).items()}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value)


def flatten_knobs(knobs: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """{'k': 12, 'key_encoder': {'layer': 1}} -> {'k': 12, 'key_encoder.layer': 1} (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in (knobs or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_knobs(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def knobs_string(flat: dict[str, Any]) -> str:
    """'threshold=0.3, min_layer=1' ('' for no knobs)."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in flat.items())


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """(run directories with a summary.json, run directories with only an error.json), sorted."""
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"no such directory: {root}. Give the sweep directory Hydra printed, "
                               f"e.g. multirun/compare_all/<date>/<time> (or a parent of several sweeps)")
    if not root.is_dir():
        raise UserError(f"{root} is a file: give the sweep directory that holds the run directories")
    ok = sorted({p.parent for p in root.rglob(SUMMARY_FILE)})
    failed = sorted({p.parent for p in root.rglob(ERROR_FILE)} - set(ok))
    return ok, failed


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"unreadable {path}: {err}") from err
    if not isinstance(summary, dict) or "method" not in summary:
        raise UserError(f"{path} is not a run summary (no 'method' key)")
    return summary


def _method_from_overrides(overrides: Sequence[str]) -> str:
    for item in overrides:
        key, _, value = str(item).lstrip("+~").partition("=")
        if key == "exit":
            return value
    return ""


def collect_failed(root: str | Path, extra: Iterable[tuple[Path, str]] = ()) -> pd.DataFrame:
    """One row per failed run (an error.json and no summary.json): run_dir, method, data, backbone, head,
    error, overrides (method/data/backbone/head from Hydra's record of the job, else the overrides).

    ``extra``: (run directory, error) pairs to add, e.g. unreadable summaries.
    """
    root = Path(root)
    _, failed = find_runs(root)
    rows = []
    for run_dir in failed:
        try:
            info = json.loads((run_dir / ERROR_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            info = {"error": f"unreadable {ERROR_FILE}: {err}", "overrides": []}
        overrides = info.get("overrides") or []
        choices = _hydra_choices(run_dir)
        rows.append({"run_dir": _rel(run_dir, root), "method": choices.get("exit") or _method_from_overrides(overrides),
                     "data": choices.get("data", ""), "backbone": choices.get("backbone", ""),
                     "head": choices.get("head", ""), "error": str(info.get("error", "")).strip(),
                     "overrides": ",".join(map(str, overrides))})
    for run_dir, error in extra:
        choices = _hydra_choices(run_dir)
        rows.append({"run_dir": _rel(run_dir, root), "method": choices.get("exit", ""), "data": choices.get("data", ""),
                     "backbone": choices.get("backbone", ""), "head": choices.get("head", ""), "error": error,
                     "overrides": _overrides(run_dir)})
    return pd.DataFrame(rows, columns=list(FAILED_COLUMNS))


def _summaries(root: Path) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    ok, _ = find_runs(root)
    rows, bad = [], []
    for run_dir in ok:
        try:
            summary = _read_summary(run_dir / SUMMARY_FILE)
        except ValueError as err:
            bad.append((run_dir, str(err)))
            continue
        flat = flatten_knobs(summary.get("knobs"))
        row = {c: summary.get(c) for c in COLUMNS}
        row["budget"] = budget_string(summary.get("budget"))
        row.update(knobs=knobs_string(flat), overrides=_overrides(run_dir), run_dir=_rel(run_dir, root),
                   sweep=_rel(_sweep_dir(run_dir, root), root))
        if row["throughput"] is None and row["wall_time_s"] and row["num_examples"]:
            row["throughput"] = row["num_examples"] / row["wall_time_s"]
        row.update(calibration_columns(summary.get("calibration")))
        row.update({f"knob_{k}": (format_value(v) if isinstance(v, (list, tuple)) else v) for k, v in flat.items()})
        rows.append(row)
    return rows, bad


def budget_string(budget: dict[str, Any] | None) -> str:
    """How a run's weights were fine-tuned, e.g. 'head: 3 ep, 120 steps, lr 5e-05/0.001, seed 42' ('' if frozen)."""
    if not budget:
        return ""
    return (f"{budget.get('by')}: {budget.get('epochs')} ep, {budget.get('steps')} steps, "
            f"lr {format_value(budget.get('lr'))}/{format_value(budget.get('head_lr'))}, seed {budget.get('seed')}")


def calibration_columns(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """A summary's calibration record (what was chosen on the validation split) as flat columns."""
    if not calibration:
        return {"calibrated": False}
    val = calibration.get("validation") or {}
    return {"calibrated": True, "calibration_met": calibration.get("met"),
            "val_accuracy": val.get("accuracy"), "val_full_accuracy": val.get("full_accuracy"),
            "val_mean_layers_computed": val.get("mean_layers_computed")}


def add_sweep_speedup(df: pd.DataFrame) -> pd.DataFrame:
    """``sweep_wall_speedup`` = throughput / throughput of the exit=full run(s) of the same sweep,
    dataset, split, backbone and head (mean over repeats); NaN where the sweep has no full run."""
    df = df.copy()
    df["sweep_wall_speedup"] = np.nan
    keys = ["sweep", "dataset", "split", "backbone", "head"]
    filled = df[keys].astype(str)  # None-safe grouping
    for _, idx in filled.groupby(keys).groups.items():
        group = df.loc[idx]
        full = pd.to_numeric(group.loc[group["method"] == "full", "throughput"], errors="coerce")
        full = full[full > 0]
        if full.empty:
            continue
        df.loc[idx, "sweep_wall_speedup"] = pd.to_numeric(group["throughput"], errors="coerce") / full.mean()
    return df


def add_sweep_retrieval_cost(df: pd.DataFrame) -> pd.DataFrame:
    """Runs timed without the full model beside them (a sweep's curve points, compare_full=false) have no
    ``retrieval_layer_equivalents``: count their measured retrieval in layers of the sweep's exit=full run (one
    layer on one example = its wall time / (examples x L)) and add it to their cost (:mod:`raee.cost`)."""
    df = df.copy()
    keys = ["sweep", "dataset", "split", "backbone", "head"]
    for _, idx in df[keys].astype(str).groupby(keys).groups.items():
        group = df.loc[idx]
        full = group[group["method"] == "full"]
        per_layer = (full["wall_time_s"] / (full["num_examples"] * full["num_layers"])).astype(float)
        per_layer = per_layer[per_layer > 0]
        missing = group.index[group["retrieval_layer_equivalents"].isna() & (group["retrieval_overhead_s"] > 0)
                              & group["cost_layer_equivalents"].notna()]
        if per_layer.empty or not len(missing):
            continue
        retrieval = df.loc[missing, "retrieval_overhead_s"] / df.loc[missing, "num_examples"] / per_layer.mean()
        df.loc[missing, "retrieval_layer_equivalents"] = retrieval
        df.loc[missing, "cost_layer_equivalents"] += retrieval
        df.loc[missing, "cost_speedup"] = df.loc[missing, "num_layers"] / df.loc[missing, "cost_layer_equivalents"]
    return df


def collect(root: str | Path) -> pd.DataFrame:
    """Every run below ``root`` (recursively) as one row: the summary's metrics, ``knobs`` as a readable
    string and one ``knob_<name>`` column per knob (nested knobs dotted), ``sweep_wall_speedup``,
    ``run_dir`` and ``sweep`` (relative to root). Failed runs are not here: see :func:`collect_failed`.

    Raises FileNotFoundError when root does not exist or holds no summary.json.
    """
    root = Path(root)
    rows, bad = _summaries(root)
    if not rows:
        failed = collect_failed(root, bad)
        extra = f" ({len(failed)} failed run(s) left error.json: see collect_failed)" if len(failed) else ""
        raise MissingFileError(f"no {SUMMARY_FILE} below {root}{extra}: {HOW_TO_RUN}")
    for run_dir, error in bad:
        warnings.warn(f"skipped {run_dir}: {error}", stacklevel=2)
    df = pd.DataFrame(rows)
    knob_cols = sorted(c for c in df.columns if c.startswith("knob_"))
    df = add_sweep_speedup(df)
    df = df[[*COLUMNS[:2], *knob_cols, *COLUMNS[2:]]]
    df[list(NUMERIC_COLUMNS)] = df[list(NUMERIC_COLUMNS)].apply(pd.to_numeric, errors="coerce")  # None -> NaN
    return add_sweep_retrieval_cost(df).reset_index(drop=True)
