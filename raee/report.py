"""Tables and charts of a sweep: ``python -m raee.report multirun/<date>/<time> [--out DIR] [--paper raee_table1]``.

Reads every run's summary.json below a directory (one row per run; failed runs, which left an
error.json instead, go to their own table), and writes to ``--out`` (default ``<dir>/report``):

- results.csv, results.md: one row per run, sorted by dataset (backbone, head), method, speed-up;
- speed_vs_accuracy.png: speed-up (x) against the task metric (y), one line per method, the
  Pareto front (runs no other run beats on both) ringed and joined;
- exit_layers.png: share of examples per exit layer, one panel per method;
- with ``--paper``: paper_comparison.md/csv (our numbers beside the paper's, :mod:`raee.paper_results`).

Speed-up on the charts: the run's own wall-clock speed-up (full model timed in the same process),
else the sweep's (throughput against the sweep's exit=full run), else the layer speed-up
(L / mean exit layer; hollow markers). The oracle reads labels, so it never joins the Pareto front.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raee.atomic import atomic_path, atomic_write_text

SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.json"
#: Hydra writes this into a sweep's top directory
SWEEP_MARKER = "multirun.yaml"

#: the per-run columns of :func:`collect`, in order (knob_<name> columns follow ``knobs``)
COLUMNS = (
    "method", "knobs", "dataset", "split", "backbone", "head", "num_layers", "task_metric", "task_metric_value",
    "accuracy", "macro_f1", "mcc", "spearman", "budget", "mean_exit_layer", "layer_speedup", "layers_saved", "flops_speedup",
    "wall_time_s", "full_wall_time_s", "wall_speedup", "sweep_wall_speedup", "throughput", "retrieval_share",
    "num_examples", "seed", "exit_layer_counts", "overrides", "sweep", "run_dir")
NUMERIC_COLUMNS = ("task_metric_value", "accuracy", "macro_f1", "mcc", "spearman", "mean_exit_layer", "layer_speedup",
                   "layers_saved", "flops_speedup", "wall_time_s", "full_wall_time_s", "wall_speedup",
                   "sweep_wall_speedup", "throughput", "retrieval_share")
FAILED_COLUMNS = ("run_dir", "method", "data", "backbone", "head", "error", "overrides")
#: methods in reading order; others follow alphabetically
METHOD_ORDER = ("full", "fixed", "entropy", "patience", "raee", "hashee", "oracle")
#: methods that read the labels: shown, but never on the Pareto front
BOUNDS = ("oracle",)
#: runs are compared (speed-up reference, Pareto front, chart panel) within one of these
GROUP_KEYS = ["dataset", "backbone", "head"]
HOW_TO_RUN = ("run a sweep first, e.g. `python -m raee.run -m +experiment=compare_all` or "
              "`python -m raee.run -m exit=full,entropy,raee`; each job writes summary.json into "
              "multirun/<...>/<date>/<time>/<job>/, then pass that sweep directory here")


# ----------------------------------------------------------------------------------------------- collect

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


def _fmt(value: Any) -> str:
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
    return ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items())


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """(run directories with a summary.json, run directories with only an error.json), sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}. Give the sweep directory Hydra printed, "
                                f"e.g. multirun/compare_all/<date>/<time> (or a parent of several sweeps)")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file: give the sweep directory that holds the run directories")
    ok = sorted({p.parent for p in root.rglob(SUMMARY_FILE)})
    failed = sorted({p.parent for p in root.rglob(ERROR_FILE)} - set(ok))
    return ok, failed


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable {path}: {err}") from err
    if not isinstance(summary, dict) or "method" not in summary:
        raise ValueError(f"{path} is not a run summary (no 'method' key)")
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
        row.update({f"knob_{k}": (_fmt(v) if isinstance(v, (list, tuple)) else v) for k, v in flat.items()})
        rows.append(row)
    return rows, bad


def budget_string(budget: dict[str, Any] | None) -> str:
    """How a run's weights were fine-tuned, e.g. 'head: 3 ep, 120 steps, lr 5e-05/0.001, seed 42' ('' if frozen)."""
    if not budget:
        return ""
    return (f"{budget.get('by')}: {budget.get('epochs')} ep, {budget.get('steps')} steps, "
            f"lr {_fmt(budget.get('lr'))}/{_fmt(budget.get('head_lr'))}, seed {budget.get('seed')}")


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
        raise FileNotFoundError(f"no {SUMMARY_FILE} below {root}{extra}: {HOW_TO_RUN}")
    for run_dir, error in bad:
        warnings.warn(f"skipped {run_dir}: {error}", stacklevel=2)
    df = pd.DataFrame(rows)
    knob_cols = sorted(c for c in df.columns if c.startswith("knob_"))
    df = add_sweep_speedup(df)
    df = df[[*COLUMNS[:2], *knob_cols, *COLUMNS[2:]]]
    df[list(NUMERIC_COLUMNS)] = df[list(NUMERIC_COLUMNS)].apply(pd.to_numeric, errors="coerce")  # None -> NaN
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- analysis

def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """bool mask (N,): True where no other point is at least as good in both x and y and better in one
    (both maximised). Points with a NaN coordinate are never on the front and dominate nothing."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of the same length, got shapes {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        better_eq = ok & (x >= x[i]) & (y >= y[i])
        strictly = (x > x[i]) | (y > y[i])
        front[i] = not np.any(better_eq & strictly)
    return front


def speed_axis(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(speed-up per run, its source: 'wall' | 'sweep_wall' | 'layer' | ''), the first measured of
    wall_speedup, sweep_wall_speedup, layer_speedup."""
    speed = pd.Series(np.nan, index=df.index)
    source = pd.Series("", index=df.index)
    for col, name in (("wall_speedup", "wall"), ("sweep_wall_speedup", "sweep_wall"), ("layer_speedup", "layer")):
        if col not in df.columns:
            continue
        vals = pd.to_numeric(df[col], errors="coerce")
        take = speed.isna() & vals.notna() & np.isfinite(vals)
        speed[take] = vals[take]
        source[take] = name
    return speed, source


def add_analysis(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``speedup``/``speedup_source`` (:func:`speed_axis`), ``pareto`` (on the front of its
    dataset/backbone/head; bounds excluded) and ``label`` (method + the knobs that vary within it)."""
    df = df.copy()
    df["speedup"], df["speedup_source"] = speed_axis(df)
    df["pareto"] = False
    filled = df[GROUP_KEYS].astype(str)
    for _, idx in filled.groupby(GROUP_KEYS).groups.items():
        sub = df.loc[idx]
        sub = sub[~sub["method"].isin(BOUNDS)]
        if len(sub):
            df.loc[sub.index, "pareto"] = pareto_front(sub["speedup"], sub["task_metric_value"])
    df["varying_knobs"] = varying_knobs(df)
    df["label"] = [f"{m} ({v})" if v else m for m, v in zip(df["method"], df["varying_knobs"])]
    return df


def varying_knobs(df: pd.DataFrame) -> pd.Series:
    """Per run, the knobs whose value differs between runs of the same method ('threshold=0.3')."""
    out = pd.Series("", index=df.index, dtype=object)
    knob_cols = [c for c in df.columns if c.startswith("knob_")]
    for _, sub in df.groupby("method", sort=False):
        cols = [c for c in knob_cols if sub[c].astype(str).nunique(dropna=False) > 1]
        for i, row in sub.iterrows():
            out[i] = ", ".join(f"{c[len('knob_'):]}={_fmt(row[c])}" for c in cols if pd.notna(row[c]))
    return out


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """By dataset (then backbone and head, so comparable runs stay together), method (reading order: full,
    fixed, entropy, patience, raee, hashee, oracle, then others), speed-up."""
    if "speedup" not in df.columns:
        df = add_analysis(df)
    key = pd.DataFrame({"d": df["dataset"].astype(str), "b": df["backbone"].astype(str), "h": df["head"].astype(str),
                        "m": [_method_rank(m) for m in df["method"]], "s": df["speedup"].fillna(-np.inf)},
                       index=df.index)
    return df.loc[key.sort_values(["d", "b", "h", "m", "s"], kind="stable").index].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- tables

def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (float, np.floating)):
        return format(float(value), fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, columns: dict[str, str] | None = None, formats: dict[str, str] | None = None,
                   default_fmt: str = ".4f") -> str:
    """A GitHub Markdown table of ``df``; ``columns`` maps column -> header (and picks/orders them)."""
    columns = columns or {c: c for c in df.columns}
    formats = formats or {}
    lines = ["| " + " | ".join(columns.values()) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_cell(row.get(c), formats.get(c, default_fmt)) for c in columns) + " |")
    return "\n".join(lines)


RESULT_HEADERS = {
    "dataset": "dataset", "backbone_short": "backbone", "head": "head", "method": "method", "knobs_shown": "knobs",
    "task_metric": "metric", "task_metric_value": "value", "accuracy": "accuracy", "macro_f1": "macro F1",
    "spearman": "Spearman", "budget": "fine-tuning budget",
    "mean_exit_layer": "mean exit layer", "num_layers": "L", "layer_speedup": "layer speed-up",
    "wall_speedup": "wall speed-up", "sweep_wall_speedup": "sweep wall speed-up", "flops_speedup": "FLOPs speed-up",
    "retrieval_share": "retrieval share", "num_examples": "n", "pareto": "Pareto", "run_dir": "run",
}
RESULT_FORMATS = {"mean_exit_layer": ".2f", "layer_speedup": ".2f", "wall_speedup": ".2f",
                  "sweep_wall_speedup": ".2f", "flops_speedup": ".2f", "retrieval_share": ".1%"}


def results_markdown(df: pd.DataFrame) -> str:
    """The results table (sorted) as Markdown; knobs shows what varies within a method, else all."""
    df = sort_runs(df if "speedup" in df.columns else add_analysis(df))
    df = df.assign(knobs_shown=[v or k for v, k in zip(df["varying_knobs"], df["knobs"].fillna(""))],
                   backbone_short=[str(b).rstrip("/").split("/")[-1] for b in df["backbone"]])
    shown = {c: h for c, h in RESULT_HEADERS.items()  # columns only some runs fill: hidden when none does
             if c not in ("spearman", "budget") or df[c].replace("", np.nan).notna().any()}
    return markdown_table(df, shown, RESULT_FORMATS)


def failed_markdown(failed: pd.DataFrame) -> str:
    return markdown_table(failed, {"run_dir": "run", "method": "method", "data": "data", "backbone": "backbone",
                                   "head": "head", "error": "error", "overrides": "overrides"})


def _csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    if "exit_layer_counts" in out.columns:
        out["exit_layer_counts"] = [json.dumps(v) if isinstance(v, (list, tuple)) else v
                                    for v in out["exit_layer_counts"]]
    return out


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    atomic_write_text(path, _csv_ready(df).to_csv(index=False))
    return Path(path)


# ----------------------------------------------------------------------------------------------- figures

def _new_figure(width: float, height: float) -> Any:
    # a bare Figure with its own Agg canvas: no pyplot, no global backend switch (safe in notebooks)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    ordered = sorted(set(methods), key=_method_rank)
    return {m: cmap(i % 10) for i, m in enumerate(ordered)}


def plot_speed_vs_metric(df: pd.DataFrame, path: str | Path) -> Path:
    """speed_vs_accuracy.png: one panel per dataset/backbone/head; one line per method through its runs
    sorted by speed-up; Pareto front ringed in black and joined by a dashed line."""
    df = df if "speedup" in df.columns else add_analysis(df)
    df = df[df["speedup"].notna() & df["task_metric_value"].notna()]
    groups = list(df.groupby(GROUP_KEYS, sort=True, dropna=False)) or [(("no runs with a speed-up",) * 3, df)]
    cols = min(len(groups), 2)
    rows = math.ceil(len(groups) / cols)
    fig = _new_figure(7.0 * cols, 5.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = _colors(df["method"].tolist())
    for ax, (key, sub) in zip(axes, groups):
        for method, runs in sorted(sub.groupby("method"), key=lambda kv: _method_rank(kv[0])):
            runs = runs.sort_values("speedup")
            c = colors[method]
            ax.plot(runs["speedup"], runs["task_metric_value"], "-", color=c, alpha=0.6, lw=1.2)
            layer_based = runs["speedup_source"] == "layer"
            marker = "*" if method in BOUNDS else "o"
            size = 120 if method in BOUNDS else 40
            name = f"{method} (bound, reads labels)" if method in BOUNDS else method
            ax.scatter(runs.loc[~layer_based, "speedup"], runs.loc[~layer_based, "task_metric_value"], s=size,
                       color=c, marker=marker, label=name, zorder=3)
            ax.scatter(runs.loc[layer_based, "speedup"], runs.loc[layer_based, "task_metric_value"], s=size,
                       facecolors="none", edgecolors=[c], marker=marker,
                       label=None if (~layer_based).any() else name, zorder=3)
            for _, r in runs.iterrows():
                if r["varying_knobs"]:
                    ax.annotate(r["varying_knobs"], (r["speedup"], r["task_metric_value"]),
                                textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
        front = sub[sub["pareto"]].sort_values("speedup")
        if len(front):
            ax.plot(front["speedup"], front["task_metric_value"], "--", color="black", lw=1, zorder=2)
            ax.scatter(front["speedup"], front["task_metric_value"], s=160, facecolors="none", edgecolors="black",
                       linewidths=1.5, label="Pareto front", zorder=4)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")  # the full model's speed
        metric = ", ".join(sorted(sub["task_metric"].dropna().astype(str).unique())) or "task metric"
        dataset, backbone, head = (str(k) for k in key)
        ax.set_title(f"{dataset} | {backbone.rstrip('/').split('/')[-1]} | {head}", fontsize=10)
        ax.set_xlabel("speed-up vs full model (wall-clock; hollow = layer-based, no timing)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if len(sub):
            ax.legend(fontsize=8, loc="best")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_exit_layers(df: pd.DataFrame, path: str | Path) -> Path:
    """exit_layers.png: per method a panel of grouped bars, one bar series per run, the share of
    examples exiting at each layer 0..L (from exit_layer_counts)."""
    df = df if "label" in df.columns else add_analysis(df)
    has = [isinstance(c, (list, tuple)) and sum(c) > 0 for c in df["exit_layer_counts"]]
    df = sort_runs(df[has]) if any(has) else df.iloc[0:0]
    methods = sorted(df["method"].unique(), key=_method_rank) or ["(no exit-layer counts)"]
    cols = min(len(methods), 3)
    rows = math.ceil(len(methods) / cols)
    fig = _new_figure(4.8 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    several = df[GROUP_KEYS].astype(str).drop_duplicates().shape[0] > 1
    for ax, method in zip(axes, methods):
        runs = df[df["method"] == method]
        n = max(len(runs), 1)
        width = 0.8 / n
        for j, (_, r) in enumerate(runs.iterrows()):
            counts = np.asarray(r["exit_layer_counts"], dtype=float)
            layers = np.arange(len(counts))
            label = r["varying_knobs"] or method
            if several:
                label += f" [{r['dataset']}, {str(r['backbone']).split('/')[-1]}]"
            ax.bar(layers - 0.4 + width * (j + 0.5), counts / counts.sum(), width=width, label=label)
        flops = pd.to_numeric(runs["flops_speedup"], errors="coerce").dropna()
        # token-level methods (HashEE): the example's exit is its [CLS] token's, the saving is in FLOPs
        title = method
        if len(flops):
            span = f"{flops.min():.2f}" if flops.nunique() == 1 else f"{flops.min():.2f}-{flops.max():.2f}"
            title += f" (token-level; FLOPs speed-up {span}x)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("exit layer (0 = embeddings)")
        ax.set_ylabel("share of examples")
        ax.set_ylim(0, 1.05)
        if len(runs):
            ax.set_xticks(np.arange(max(len(c) for c in runs["exit_layer_counts"])))
            if n > 1 or several:  # below the panel, never over the bars
                ax.legend(fontsize=7, ncol=2 if n > 3 else 1, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- wandb

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
        table = _csv_ready(df)
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


# ----------------------------------------------------------------------------------------------- report

def write_report(df: pd.DataFrame, out: str | Path, failed: pd.DataFrame | None = None,
                 paper: str | None = None) -> dict[str, Path]:
    """Writes results.csv/.md, the two PNGs, failed.csv (if any) and, with ``paper``, the paper
    comparison into ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = sort_runs(add_analysis(df))
    paths = {"results.csv": write_csv(df, out / "results.csv")}
    md = ["# Results", "", f"{len(df)} run(s). Speed-up: the run's own wall-clock speed-up (full model timed in "
          "the same process); 'sweep wall speed-up': throughput against the sweep's exit=full run. "
          "Pareto: no other run (oracle excluded) is both faster and better.", "", results_markdown(df)]
    if failed is not None and len(failed):
        md += ["", f"## Failed runs ({len(failed)})", "", failed_markdown(failed)]
        paths["failed.csv"] = write_csv(failed, out / "failed.csv")
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    paths["results.md"] = out / "results.md"
    paths["speed_vs_accuracy.png"] = plot_speed_vs_metric(df, out / "speed_vs_accuracy.png")
    paths["exit_layers.png"] = plot_exit_layers(df, out / "exit_layers.png")
    if paper:
        paths.update(write_paper_comparison(df, out, paper))
    return paths


COMPARISON_HEADERS = {
    "paper_method": "paper method", "method": "ours", "paper_dataset": "paper dataset", "dataset": "our dataset",
    "metric": "metric", "paper_value": "paper", "measured_value": "measured", "difference": "difference",
    "paper_gain_vs_full": "paper gain vs full", "our_gain_vs_full": "our gain vs full", "knobs": "knobs",
    "backbone_note": "backbone", "status": "status",
}
NOT_RUN_HEADERS = {"paper_method": "paper method", "paper_backbone": "paper backbone", "method": "ours",
                   "paper_dataset": "paper dataset", "metric": "metric", "paper_value": "paper",
                   "paper_gain_vs_full": "paper gain vs full", "status": "status"}
GAIN_HEADERS = {"paper_method": "paper method", "paper_backbone": "paper backbone",
                "paper_mean_gain_vs_full": "paper mean gain vs full", "paper_tasks": "tasks", "method": "ours",
                "knobs": "knobs", "dataset": "our dataset", "backbone": "our backbone",
                "our_gain_vs_full": "our gain vs full"}


def paper_comparison_markdown(comparison: pd.DataFrame, gains: pd.DataFrame, table: str) -> str:
    from raee.paper_results import get_table

    t = get_table(table)
    ran = comparison[~comparison["status"].str.startswith("not run")]
    not_run = comparison[comparison["status"].str.startswith("not run")]
    notes = [f"- {k}: {v}" for k, v in t.method_notes.items()]
    lines = [f"# Paper comparison: {t.title}", "", f"Source: {t.source}.", "",
             "Values in percent (accuracy x 100; CoLA: MCC x 100); difference = measured - paper; "
             "'gain vs full' = the method minus the full model on the same backbone and dataset "
             "(ours: same sweep).", f"- paper head: {t.head}", *notes, "",
             f"## Our runs ({len(ran)})", "", markdown_table(ran, COMPARISON_HEADERS, default_fmt=".2f"), "",
             "## Gain over the full model (comparable across datasets)", "",
             markdown_table(gains, GAIN_HEADERS, default_fmt=".2f"), "",
             f"## Paper numbers without a run ({len(not_run)})", "",
             markdown_table(not_run, NOT_RUN_HEADERS, default_fmt=".2f")]
    return "\n".join(lines) + "\n"


def write_paper_comparison(df: pd.DataFrame, out: str | Path, table: str) -> dict[str, Path]:
    from raee.paper_results import compare_gains, compare_with_paper

    out = Path(out)
    comparison, gains = compare_with_paper(df, table), compare_gains(df, table)
    md = paper_comparison_markdown(comparison, gains, table)
    atomic_write_text(out / "paper_comparison.md", md)
    return {"paper_comparison.csv": write_csv(comparison, out / "paper_comparison.csv"),
            "paper_gains.csv": write_csv(gains, out / "paper_gains.csv"),
            "paper_comparison.md": out / "paper_comparison.md"}


def build_parser() -> argparse.ArgumentParser:
    from raee.paper_results import PAPER_TABLES

    parser = argparse.ArgumentParser(
        prog="python -m raee.report",
        description="Tables and charts of a sweep: reads every summary.json below DIR (failed runs: error.json), "
                    "writes results.csv, results.md, speed_vs_accuracy.png, exit_layers.png and prints the table.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m raee.run -m +experiment=compare_all\n"
               "  python -m raee.report multirun/compare_all/<date>/<time>\n"
               "  python -m raee.report multirun/raee_table1/<date>/<time> --paper raee_table1 --out report/\n"
               "experiments/README.md describes every experiment config and output file.")
    parser.add_argument("root", metavar="DIR", help="a sweep directory (multirun/<...>/<date>/<time>) or any parent")
    parser.add_argument("--out", metavar="OUT", default=None, help="output directory (default: DIR/report)")
    parser.add_argument("--paper", choices=sorted(PAPER_TABLES), default=None,
                        help="also put our numbers beside a paper's table (paper_comparison.md/.csv)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and charts to wandb (WANDB_MODE respected; offline by default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.root)
    try:
        failed = collect_failed(root)
        if len(failed):
            print(f"## Failed runs ({len(failed)})\n\n{failed_markdown(failed)}\n")
        df = collect(root)
    except (FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else root / "report"
    paths = write_report(df, out, failed=failed, paper=args.paper)
    print(results_markdown(df))
    if args.paper:
        print("\n" + (out / "paper_comparison.md").read_text())
    if args.wandb:
        figures = {k.removesuffix(".png"): v for k, v in paths.items() if k.endswith(".png")}
        log_to_wandb(add_analysis(df), figures, group=wandb_group(args.root), directory=out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
