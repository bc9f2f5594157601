"""Charts of a sweep (matplotlib, no pyplot): speed against the task metric, exit-layer shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raee.atomic import atomic_path
from raee.report.analysis import BOUNDS, GROUP_KEYS, add_analysis, method_rank, sort_runs


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
    ordered = sorted(set(methods), key=method_rank)
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
        for method, runs in sorted(sub.groupby("method"), key=lambda kv: method_rank(kv[0])):
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
    methods = sorted(df["method"].unique(), key=method_rank) or ["(no exit-layer counts)"]
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


def plot_pareto(df: pd.DataFrame, path: str | Path, axis: str = "layers") -> Path:
    """pareto_layers.png (axis="layers": accuracy against the cost in layer equivalents, keys included, lower is
    better; :func:`raee.report.pareto.cost_column`) or
    pareto_speedup.png (axis="speedup": against the wall-clock speed-up). One panel per dataset/backbone/head,
    one line per curve (:func:`raee.report.pareto.curve_names`); dominated runs hollow, calibrated runs as
    large stars, the oracle as a black star and the full model's accuracy as a dotted line."""
    from raee.report.pareto import add_pareto

    if axis not in ("layers", "speedup"):
        raise ValueError(f"axis={axis!r}: use 'layers' or 'speedup'")
    df = df if "speedup" in df.columns else add_analysis(df)
    df = df if "curve" in df.columns else add_pareto(df)
    x_col, dom_col = ("cost", "dominated_layers") if axis == "layers" else ("speedup", "dominated_speed")
    df = df[pd.to_numeric(df[x_col], errors="coerce").notna() & df["task_metric_value"].notna()]
    groups = list(df.groupby(GROUP_KEYS, sort=True, dropna=False)) or [(("no runs",) * 3, df)]
    cols = min(len(groups), 2)
    rows = math.ceil(len(groups) / cols)
    fig = _new_figure(7.5 * cols, 5.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    curves = sorted(df["curve"].unique(), key=lambda c: (method_rank(c.split(" ")[0]), c))
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(curves) <= 10 else "tab20"]
    color = {c: cmap(i % cmap.N) for i, c in enumerate(curves)}
    for ax, (key, sub) in zip(axes, groups):
        for curve in [c for c in curves if c in set(sub["curve"])]:
            runs = sub[sub["curve"] == curve].sort_values(x_col)
            c = color[curve]
            x, y = pd.to_numeric(runs[x_col]), runs["task_metric_value"]
            if runs["method"].iloc[0] in BOUNDS:
                ax.scatter(x, y, s=180, marker="*", color="black", label=f"{curve} (reads labels)", zorder=5)
                continue
            ax.plot(x, y, "-", color=c, alpha=0.7, lw=1.2)
            dom = runs[dom_col].astype(bool).to_numpy()
            ax.plot([], [], "o-", color=c, label=curve)  # one legend entry per curve
            if (~dom).any():
                ax.scatter(x[~dom], y[~dom], s=36, color=c, zorder=3)
            if dom.any():
                ax.scatter(x[dom], y[dom], s=36, facecolors="white", edgecolors=[c], zorder=3)
            cal = runs.get("calibrated", pd.Series(False, index=runs.index)).fillna(False).astype(bool).to_numpy()
            if cal.any():
                ax.scatter(x[cal], y[cal], s=220, marker="*", color=c, edgecolors="black", linewidths=0.8, zorder=4)
        full = sub.loc[sub["method"] == "full", "task_metric_value"]
        full_value = full.mean() if len(full) else pd.to_numeric(sub.get("full_accuracy"), errors="coerce").median()
        if pd.notna(full_value):
            ax.axhline(full_value, color="grey", lw=0.8, ls=":", label="full model's accuracy")
        dataset, backbone, head = (str(k) for k in key)
        ax.set_title(f"{dataset} | {backbone.rstrip('/').split('/')[-1]} | {head}   "
                     "(hollow = dominated, star = calibrated on validation)", fontsize=9)
        generation = (sub.get("task_type", pd.Series("", index=sub.index)).astype(str) == "generation").all()
        if axis == "layers":
            ax.set_xlabel("FLOPs per token, in layers of the full model (L / FLOPs speed-up)" if generation
                          else "cost per example in backbone layer equivalents (layers, keys, retrieval)")
        else:
            ax.set_xlabel("wall-clock speed-up vs the full model (same process" +
                          (", generated tokens/s)" if generation else ")"))
        if axis == "speedup":
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_ylabel(", ".join(sorted(sub["task_metric"].dropna().astype(str).unique())) or "task metric")
        ax.grid(alpha=0.3)
        if len(sub):
            ax.legend(fontsize=7, loc="lower right" if axis == "layers" else "lower left")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    return _save(fig, path)
