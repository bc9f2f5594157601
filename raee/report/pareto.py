"""Speed-accuracy trade-off curves of a sweep: one curve per method (and per rule/key), dominated runs, and the
gap to the oracle.

- A **curve** is a method plus the knobs that tell its variants apart (the aggregation rule, the key encoder,
  min_layer, ...) but not the knob a sweep or a calibration moves along the curve (threshold, patience, ...).
- **Cost** is the run's cost per example in backbone layer equivalents with its keys included
  (``cost_layer_equivalents``: layers computed, the layers run before planning counting for every example, plus
  a separate key encoder's FLOPs and the measured retrieval, :mod:`raee.cost`), falling back to the mean layers
  computed, then the mean exit layer, for older summaries; for token-level exits (HashEE) and generation runs
  L / FLOPs speed-up (FLOPs per token, in layers of the full model).
- A run is **dominated** when another run of the same dataset/backbone/head (the label-reading oracle
  excluded) is at least as accurate at no more cost, and strictly better in one of the two.
- The **oracle gap** of a curve: within the box spanned by the oracle's point (its cost L_o, its accuracy
  A_o) and the full model (L layers, accuracy A_full), the share of the box's area that none of the curve's
  runs reaches, i.e. ∫_{L_o}^{L} (A_o - clip(a(c), A_full, A_o)) dc / ((L - L_o)(A_o - A_full)) with a(c) the
  best accuracy the curve offers within cost c. 0: the curve reaches the oracle's point; 1: it is never more
  accurate than the full model (at any cost); it says how much of the room between the full model and the
  oracle a method turns into accuracy or saved layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raee.report.analysis import BOUNDS, GROUP_KEYS
from raee.report.collect import format_value

#: knobs that move a run along its method's curve (a summary's tuned_knob adds its own)
SWEPT_KNOBS = ("threshold", "patience", "layer", "aggregator.threshold")
#: methods whose exits are per token: every example computes all layers, on fewer tokens
TOKEN_LEVEL = ("hashee",)
#: knobs that record how a run was calibrated: the same curve
CALIBRATION_KNOBS = ("target", "max_drop", "max_layer", "max_cost", "gain_per_layer", "gain_confidence")


def dominated(cost: Sequence[float], value: Sequence[float]) -> np.ndarray:
    """bool mask (N,): True where another point costs no more and is worth at least as much, and is strictly
    better in one. Points with a NaN coordinate are never dominated and dominate nothing."""
    cost, value = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    if cost.shape != value.shape or cost.ndim != 1:
        raise ValueError(f"cost and value must be 1-d of the same length, got {cost.shape} and {value.shape}")
    ok = np.isfinite(cost) & np.isfinite(value)
    out = np.zeros(cost.shape, dtype=bool)
    for i in np.flatnonzero(ok):
        at_least = ok & (cost <= cost[i]) & (value >= value[i])
        out[i] = bool(np.any(at_least & ((cost < cost[i]) | (value > value[i]))))
    return out


def cost_column(df: pd.DataFrame) -> pd.Series:
    """Cost per run in layer equivalents with the keys included, else its mean layers computed, else its mean
    exit layer. Token-level exits (HashEE) run every example through all L layers with fewer tokens, so their
    cost is L / FLOPs speed-up: the layers an example-level exit would compute for the same FLOPs."""
    def column(name: str) -> pd.Series:
        return pd.to_numeric(df.get(name, pd.Series(np.nan, index=df.index)), errors="coerce")

    layers = column("cost_layer_equivalents").fillna(column("mean_layers_computed")).fillna(column("mean_exit_layer"))
    generation = df.get("task_type", pd.Series("", index=df.index)).astype(str) == "generation"
    token_level = (df.get("method", pd.Series("", index=df.index)).isin(TOKEN_LEVEL) | generation) & (
        column("flops_speedup") > 0)
    return layers.where(~token_level, column("num_layers") / column("flops_speedup"))


def curve_names(df: pd.DataFrame) -> pd.Series:
    """Per run: the method, plus the identity knobs that vary between its runs ('raee_dynamic (aggregator.rule=
    VotePosterior)'); swept and calibration knobs are left out."""
    out = pd.Series("", index=df.index, dtype=object)
    knob_cols = [c for c in df.columns if c.startswith("knob_")]
    for method, sub in df.groupby("method", sort=False):
        tuned = sub.get("tuned_knob", pd.Series(dtype=object)).dropna()
        swept = set(SWEPT_KNOBS) | {k for knobs in tuned for k in str(knobs).split(",")}  # "a,b": several tuned
        skip = {f"knob_{k}" for k in (*swept, *CALIBRATION_KNOBS)}
        cols = [c for c in knob_cols if c not in skip and sub[c].astype(str).nunique(dropna=False) > 1]
        for i, row in sub.iterrows():
            parts = [f"{c[len('knob_'):]}={format_value(row[c])}" for c in cols if pd.notna(row[c])]
            out[i] = f"{method} ({', '.join(parts)})" if parts else str(method)
    return out


def add_pareto(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``cost`` (:func:`cost_column`), ``curve`` (:func:`curve_names`), ``dominated_layers`` (accuracy
    against cost) and ``dominated_speed`` (accuracy against the ``speedup`` column, when present), both within
    each dataset/backbone/head; bounds (the oracle) neither count nor get marked."""
    df = df.copy()
    df["cost"] = cost_column(df)
    df["curve"] = curve_names(df)
    df["dominated_layers"] = False
    df["dominated_speed"] = False
    for _, idx in df[GROUP_KEYS].astype(str).groupby(GROUP_KEYS).groups.items():
        sub = df.loc[idx]
        sub = sub[~sub["method"].isin(BOUNDS)]
        if not len(sub):
            continue
        df.loc[sub.index, "dominated_layers"] = dominated(sub["cost"], sub["task_metric_value"])
        if "speedup" in df.columns:
            df.loc[sub.index, "dominated_speed"] = dominated(-pd.to_numeric(sub["speedup"], errors="coerce"),
                                                             sub["task_metric_value"])
    return df


def best_within(cost: np.ndarray, value: np.ndarray, budget: float) -> float:
    """The best value among points costing at most ``budget`` (NaN when none)."""
    ok = np.isfinite(cost) & np.isfinite(value) & (cost <= budget + 1e-9)
    return float(value[ok].max()) if ok.any() else float("nan")


def oracle_gap(cost: Sequence[float], value: Sequence[float], oracle: tuple[float, float],
               full: tuple[float, float]) -> float:
    """The share of the box [oracle cost, full cost] x [full value, oracle value] that the points do not reach
    (see the module docstring); NaN when the box is empty."""
    cost, value = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    (c_o, v_o), (c_f, v_f) = oracle, full
    if not (np.isfinite([c_o, v_o, c_f, v_f]).all() and c_f > c_o and v_o > v_f):
        return float("nan")
    edges = np.unique(np.clip(np.concatenate([[c_o, c_f], cost[np.isfinite(cost)]]), c_o, c_f))
    missed = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        reach = best_within(cost, value, lo)  # constant on [lo, hi)
        reach = v_f if not np.isfinite(reach) else min(max(reach, v_f), v_o)
        missed += (v_o - reach) * (hi - lo)
    return missed / ((c_f - c_o) * (v_o - v_f))


def references(group: pd.DataFrame) -> tuple[tuple[float, float], tuple[float, float]]:
    """((oracle cost, oracle accuracy), (L, full accuracy)) of one dataset/backbone/head: from its exit=oracle
    and exit=full runs, else from what every run measured beside itself (compare_full / compare_oracle)."""
    metric = pd.to_numeric(group["task_metric_value"], errors="coerce")
    num_layers = float(pd.to_numeric(group["num_layers"], errors="coerce").max())
    oracle_runs, full_runs = group[group["method"].isin(BOUNDS)], group[group["method"] == "full"]
    if len(oracle_runs):
        oracle = (float(cost_column(oracle_runs).mean()), float(metric[oracle_runs.index].mean()))
    else:
        oracle = (float(pd.to_numeric(group.get("oracle_mean_exit_layer"), errors="coerce").median()),
                  float(pd.to_numeric(group.get("oracle_accuracy"), errors="coerce").median()))
    measured = pd.to_numeric(group.get("full_accuracy"), errors="coerce")
    if "full_task_metric_value" in group.columns:  # generation runs: the full model's ROUGE measured beside them
        measured = measured.fillna(pd.to_numeric(group["full_task_metric_value"], errors="coerce"))
    full_value = float(metric[full_runs.index].mean()) if len(full_runs) else float(measured.median())
    return oracle, (num_layers, full_value)


def curve_table(df: pd.DataFrame, budgets: Sequence[float] = (1.0, 2.0)) -> pd.DataFrame:
    """One row per dataset/backbone/head and curve: its runs, best accuracy within each layer budget, the fewest
    layers at or above the full model's accuracy, the oracle gap, and its calibrated run(s) if any."""
    df = df if "curve" in df.columns else add_pareto(df)
    rows = []
    for key, group in df.groupby(GROUP_KEYS, sort=True, dropna=False):
        oracle, full = references(group)
        for curve, runs in group[~group["method"].isin(BOUNDS)].groupby("curve", sort=False):
            cost = runs["cost"].to_numpy(float)
            value = pd.to_numeric(runs["task_metric_value"], errors="coerce").to_numpy(float)
            at_full = cost[np.isfinite(value) & (value >= full[1] - 1e-9)]
            row = dict(zip(GROUP_KEYS, key), curve=curve, method=runs["method"].iloc[0], runs=len(runs),
                       full_value=full[1], oracle_value=oracle[1], oracle_cost=oracle[0],
                       fewest_layers_at_full=float(at_full.min()) if len(at_full) else float("nan"),
                       oracle_gap=oracle_gap(cost, value, oracle, full),
                       undominated=int((~runs["dominated_layers"]).sum()))
            row.update({f"best_within_{b:g}": best_within(cost, value, b) for b in budgets})
            calibrated = runs[runs.get("calibrated", pd.Series(False, index=runs.index)).fillna(False).astype(bool)]
            row["calibrated_runs"] = "; ".join(
                f"{r['varying_knobs'] or r['knobs']}: {r['task_metric_value']:.4f} at {r['cost']:.2f} layers"
                f"{'' if r['dominated_layers'] else ' (undominated)'}" for _, r in calibrated.iterrows()
            ) if "varying_knobs" in runs.columns else ""
            rows.append(row)
    return pd.DataFrame(rows)
