"""Markdown and CSV tables of a sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raee.atomic import atomic_write_text
from raee.report.analysis import add_analysis, sort_runs


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
    "spearman": "Spearman", "budget": "fine-tuning budget", "tokens_per_s": "tokens/s",
    "mean_exit_layer": "mean exit layer", "mean_layers_computed": "layers computed",
    "cost_layer_equivalents": "cost (layer equiv., keys incl.)", "num_layers": "L",
    "layer_speedup": "layer speed-up",
    "wall_speedup": "wall speed-up", "sweep_wall_speedup": "sweep wall speed-up", "flops_speedup": "FLOPs speed-up",
    "retrieval_share": "retrieval share", "num_examples": "n", "pareto": "Pareto", "run_dir": "run",
}
RESULT_FORMATS = {"tokens_per_s": ".1f", "mean_exit_layer": ".2f", "mean_layers_computed": ".2f",
                  "cost_layer_equivalents": ".2f", "layer_speedup": ".2f", "wall_speedup": ".2f",
                  "sweep_wall_speedup": ".2f", "flops_speedup": ".2f", "retrieval_share": ".1%"}


def results_markdown(df: pd.DataFrame) -> str:
    """The results table (sorted) as Markdown; knobs shows what varies within a method, else all."""
    df = sort_runs(df if "speedup" in df.columns else add_analysis(df))
    df = df.assign(knobs_shown=[v or k for v, k in zip(df["varying_knobs"], df["knobs"].fillna(""))],
                   backbone_short=[str(b).rstrip("/").split("/")[-1] for b in df["backbone"]])
    headers = {c: h for c, h in RESULT_HEADERS.items()  # columns only some runs fill: hidden when none does
               if c not in ("spearman", "budget", "tokens_per_s")
               or (c in df.columns and df[c].replace("", np.nan).notna().any())}
    if "split" in df.columns and (df["split"].fillna("test") != "test").any():
        # runs on another split (a search on validation) say so beside the dataset
        headers = {"dataset": "dataset", "split": "split", **headers}
    return markdown_table(df, headers, RESULT_FORMATS)


PARETO_HEADERS = {
    "dataset": "dataset", "backbone_short": "backbone", "head": "head", "curve": "curve", "runs": "runs",
    "undominated": "undominated", "best_within_1": "best within 1 layer", "best_within_2": "best within 2 layers",
    "fewest_layers_at_full": "lowest cost at >= full", "oracle_gap": "oracle gap", "calibrated_runs": "calibrated",
}
PARETO_FORMATS = {"fewest_layers_at_full": ".2f", "oracle_gap": ".3f"}


def pareto_markdown(df: pd.DataFrame) -> str:
    """The trade-off section: how curves, costs, dominance and the oracle gap are defined, then one row per curve
    (:func:`raee.report.pareto.curve_table`)."""
    from raee.report.pareto import curve_table

    table = curve_table(df)
    if not len(table):
        return "No runs to draw curves from."
    table = table.assign(backbone_short=[str(b).rstrip("/").split("/")[-1] for b in table["backbone"]])
    refs = table.drop_duplicates(["dataset", "backbone", "head"])
    lines = [
        "Cost = backbone layer equivalents per example, keys included: layers computed (layers run before planning "
        "count for every example) + a separate key encoder's FLOPs / one layer's + measured search and aggregation "
        "time / one layer's time (docs/concepts/cost-accounting.md); token-level exits (HashEE) and generation runs: "
        "L / FLOPs speed-up, FLOPs per token in layers of the full model. "
        "A run is dominated when another run of the same "
        "dataset/backbone/head (oracle excluded) is at least as accurate at no more cost. Oracle gap: within the "
        "box from the oracle's point (its layers, its accuracy) to the full model (L layers, its accuracy), the "
        "share of the area the curve's runs do not reach (0 = reaches the oracle, 1 = never more accurate than the "
        "full model).", "",
        *(f"- {r['dataset']} | {r['backbone_short']} | {r['head']}: full model {r['full_value']:.4f}; oracle "
          f"{r['oracle_value']:.4f} at {r['oracle_cost']:.2f} layers" for _, r in refs.iterrows()), "",
        markdown_table(table, PARETO_HEADERS, PARETO_FORMATS)]
    return "\n".join(lines)


def failed_markdown(failed: pd.DataFrame) -> str:
    return markdown_table(failed, {"run_dir": "run", "method": "method", "data": "data", "backbone": "backbone",
                                   "head": "head", "error": "error", "overrides": "overrides"})


def csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    if "exit_layer_counts" in out.columns:
        out["exit_layer_counts"] = [json.dumps(v) if isinstance(v, (list, tuple)) else v
                                    for v in out["exit_layer_counts"]]
    return out


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    atomic_write_text(path, csv_ready(df).to_csv(index=False))
    return Path(path)
