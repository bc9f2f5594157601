"""Analysis of a collected sweep: the speed axis, the Pareto front, labels and the reading order of runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raee.report.collect import format_value

METHOD_ORDER = ("full", "fixed", "entropy", "patience", "raee", "hashee", "confidence", "self_speculative", "oracle")
#: methods that read the labels: shown, but never on the Pareto front
BOUNDS = ("oracle",)
#: runs are compared (speed-up reference, Pareto front, chart panel) within one of these
GROUP_KEYS = ["dataset", "backbone", "head"]


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
    wall_speedup, sweep_wall_speedup, then the counted ones: cost_speedup (L / layer equivalents, keys included),
    layer_speedup (source 'layer' for both: not timed)."""
    speed = pd.Series(np.nan, index=df.index)
    source = pd.Series("", index=df.index)
    for col, name in (("wall_speedup", "wall"), ("sweep_wall_speedup", "sweep_wall"), ("cost_speedup", "layer"),
                      ("layer_speedup", "layer")):
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
            out[i] = ", ".join(f"{c[len('knob_'):]}={format_value(row[c])}" for c in cols if pd.notna(row[c]))
    return out


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """By dataset (then backbone and head, so comparable runs stay together), method (reading order: full,
    fixed, entropy, patience, raee, hashee, oracle, then others), speed-up."""
    if "speedup" not in df.columns:
        df = add_analysis(df)
    key = pd.DataFrame({"d": df["dataset"].astype(str), "b": df["backbone"].astype(str), "h": df["head"].astype(str),
                        "m": [method_rank(m) for m in df["method"]], "s": df["speedup"].fillna(-np.inf)},
                       index=df.index)
    return df.loc[key.sort_values(["d", "b", "h", "m", "s"], kind="stable").index].reset_index(drop=True)
