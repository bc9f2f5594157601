"""report.html: one self-contained interactive page of a sweep (plotly, its script inlined: opens with no network).

- the speed-accuracy chart, one per dataset/backbone/head: one point per run; hovering shows the run's
  overrides and numbers; clicking a method in the legend hides or shows it; a menu switches the x axis
  between the speed-up and the cost in layer equivalents with the keys included (:mod:`raee.cost`);
- the results table, sortable by clicking a header;
- the exit-layer histograms: the share of examples leaving at each layer, one bar series per run.

The page records what it drew in ``document.body.dataset`` (``runs``, ``points``) so that a browser test
can check it (tests/test_report_html.py).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raee.atomic import atomic_write_text
from raee.report.analysis import BOUNDS, GROUP_KEYS, add_analysis, method_rank, sort_runs
from raee.report.pareto import add_pareto

#: results-table columns of the page: column -> (header, format)
TABLE_COLUMNS: dict[str, tuple[str, str]] = {
    "dataset": ("dataset", ""), "backbone_short": ("backbone", ""), "head": ("head", ""), "method": ("method", ""),
    "knobs": ("knobs", ""), "task_metric": ("metric", ""), "task_metric_value": ("value", ".4f"),
    "accuracy": ("accuracy", ".4f"), "mean_exit_layer": ("mean exit layer", ".2f"),
    "mean_layers_computed": ("layers computed", ".2f"),
    "cost_layer_equivalents": ("cost (layer equiv., keys incl.)", ".2f"), "num_layers": ("L", ""),
    "layer_speedup": ("layer speed-up", ".2f"), "wall_speedup": ("wall speed-up", ".2f"),
    "sweep_wall_speedup": ("sweep wall speed-up", ".2f"), "flops_speedup": ("FLOPs speed-up", ".2f"),
    "retrieval_share": ("retrieval share", ".1%"), "calibrated": ("calibrated", ""), "pareto": ("Pareto", ""),
    "num_examples": ("n", ""), "overrides": ("overrides", ""), "run_dir": ("run", ""),
}
#: long text columns: wrapped, not one wide line
WRAPPED = ("knobs", "overrides", "run_dir")
HOVER_FIELDS = ("label", "overrides", "task_metric", "task_metric_value", "accuracy", "cost",
                "speedup", "speedup_source", "layer_speedup", "retrieval_share", "run_dir", "layers_shown")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.dataset.order !== 'asc';
    table.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y);
      var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (isNaN(nx) - isNaN(ny)) || String(x).localeCompare(String(y));
      return asc ? cmp : -cmp;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
p.note { color: #555; max-width: 70em; }
table.sortable { border-collapse: collapse; font-size: 12px; }
table.sortable th { cursor: pointer; background: #f0f0f0; position: sticky; top: 0; }
table.sortable th[data-order=asc]::after { content: ' \\25B2'; } table.sortable th[data-order=desc]::after { content: ' \\25BC'; }
table.sortable td, table.sortable th { border: 1px solid #ddd; padding: 2px 6px; white-space: nowrap; }
table.sortable td.num { text-align: right; }
table.sortable td.wrap { white-space: normal; min-width: 16em; max-width: 30em; }
div.scroll { overflow: auto; max-height: 40em; }
"""


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _cell(value: Any, fmt: str) -> tuple[str, str, bool]:
    """(shown text, sort value, numeric?)"""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", "", False
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else ""), ("1" if value else "0"), True
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (format(float(value), fmt) if fmt else str(value)), repr(float(value)), True
    return str(value), str(value), False


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value if isinstance(value, (str, int, bool)) or value is None else str(value)


def results_table_html(df: pd.DataFrame) -> str:
    """The sortable results table (every run, in the report's order)."""
    cols = {c: v for c, v in TABLE_COLUMNS.items() if c in df.columns}
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols.values())
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c, (_, fmt) in cols.items():
            shown, key, numeric = _cell(r[c], fmt)
            cls = ' class="num"' if numeric else (' class="wrap"' if c in WRAPPED else "")
            cells.append(f'<td{cls} data-value="{html.escape(key, quote=True)}">{html.escape(shown)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable" id="results"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _group_title(key: tuple[Any, ...]) -> str:
    dataset, backbone, head = (str(k) for k in key)
    return f"{dataset} | {backbone.rstrip('/').split('/')[-1]} | {head}"


def method_colors(df: pd.DataFrame) -> dict[str, str]:
    """One colour per method, in the report's method order (the same in every chart of the page)."""
    methods = sorted(df["method"].astype(str).unique(), key=method_rank)
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def speed_figure(group: pd.DataFrame, title: str) -> Any:
    """One point per run: x = speed-up (menu: cost in layer equivalents), y = the task metric; one trace per
    method."""
    import plotly.graph_objects as go

    colors = method_colors(group)
    methods = list(colors)
    fig = go.Figure()
    xs_speed, xs_layers = [], []
    layers = pd.to_numeric(group.get("mean_layers_computed", pd.Series(index=group.index, dtype=float)), errors="coerce")
    group = group.assign(layers_shown=layers.fillna(pd.to_numeric(group["mean_exit_layer"], errors="coerce")))
    for method in methods:
        runs = group[group["method"].astype(str) == method].sort_values("speedup")
        hover = [[_jsonable(r.get(f)) for f in HOVER_FIELDS] for _, r in runs.iterrows()]
        symbol = ["star" if method in BOUNDS else ("circle-open" if s == "layer" else "circle")
                  for s in runs["speedup_source"]]
        xs_speed.append([_jsonable(v) for v in runs["speedup"]])
        xs_layers.append([_jsonable(v) for v in runs["cost"]])
        fig.add_trace(go.Scatter(
            x=xs_speed[-1], y=[_jsonable(v) for v in runs["task_metric_value"]], mode="lines+markers",
            name=f"{method} (reads labels)" if method in BOUNDS else method, customdata=hover,
            marker={"size": 14 if method in BOUNDS else 9, "symbol": symbol, "color": colors[method],
                    "line": {"width": [2 if p else 0 for p in runs["pareto"]], "color": "black"}},
            line={"width": 1, "color": colors[method]},
            hovertemplate=("<b>%{customdata[0]}</b><br>overrides: %{customdata[1]}<br>%{customdata[2]}: "
                           "%{customdata[3]:.4f} (accuracy %{customdata[4]:.4f})<br>layers computed: "
                           "%{customdata[11]:.2f}<br>cost with keys: %{customdata[5]:.2f} layer equivalents<br>"
                           "speed-up: %{customdata[6]:.2f}x (%{customdata[7]}; layer "
                           "speed-up %{customdata[8]:.2f}x)<br>retrieval share: %{customdata[9]:.1%}<br>"
                           "run: %{customdata[10]}<extra></extra>")))
    speed_title = "speed-up vs the full model (wall-clock; open circles: layer-based, no timing)"
    layer_title = ("cost per example in layer equivalents: layers, keys, retrieval (token-level exits: L / FLOPs "
                   "speed-up)")
    fig.update_layout(
        title={"text": title, "font": {"size": 14}}, height=480, template="plotly_white",
        xaxis_title=speed_title, yaxis_title=", ".join(sorted(group["task_metric"].dropna().astype(str).unique())),
        legend={"title": {"text": "click to hide / show"}}, margin={"t": 90},
        updatemenus=[{"type": "buttons", "direction": "right", "x": 0, "y": 1.13, "xanchor": "left",
                      "buttons": [{"label": "x: speed-up", "method": "update",
                                   "args": [{"x": xs_speed}, {"xaxis.title.text": speed_title}]},
                                  {"label": "x: cost (layer equivalents)", "method": "update",
                                   "args": [{"x": xs_layers}, {"xaxis.title.text": layer_title}]}]}])
    return fig


def exit_figure(group: pd.DataFrame, title: str) -> Any:
    """The share of examples per exit layer: one bar series per run (legend click hides it)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    colors, seen = method_colors(group), {}
    for _, r in group.iterrows():
        counts = r.get("exit_layer_counts")
        if isinstance(counts, str):
            counts = json.loads(counts)
        if not isinstance(counts, (list, tuple)) or sum(counts) <= 0:
            continue
        share = np.asarray(counts, dtype=float) / float(sum(counts))
        method = str(r["method"])
        seen[method] = seen.get(method, 0) + 1  # several runs of one method: same colour, lighter each time
        fig.add_trace(go.Bar(x=list(range(len(share))), y=share.tolist(), name=str(r["label"]),
                             legendgroup=method, marker_color=colors[method],
                             marker_opacity=max(1.0 - 0.15 * (seen[method] - 1), 0.35),
                             hovertemplate="%{fullData.name}<br>layer %{x}: %{y:.1%}<extra></extra>"))
    fig.update_layout(title={"text": title, "font": {"size": 14}}, barmode="group", height=380,
                      template="plotly_white", xaxis_title="exit layer (0 = embeddings)",
                      yaxis_title="share of examples", yaxis_tickformat=".0%", xaxis_dtick=1)
    return fig


def report_html(df: pd.DataFrame, title: str = "raee report") -> str:
    """The whole page as a string (plotly's script inlined once)."""
    from plotly.offline import get_plotlyjs

    df = df if "cost" in df.columns else add_pareto(sort_runs(add_analysis(df)))
    df = df.assign(backbone_short=[str(b).rstrip("/").split("/")[-1] for b in df["backbone"]])
    drawn = df[[_finite(x) and _finite(y) for x, y in zip(df["speedup"], df["task_metric_value"])]]
    config = {"displaylogo": False, "responsive": True}
    speed_divs, exit_divs = [], []
    for i, (key, group) in enumerate(drawn.groupby(GROUP_KEYS, sort=True, dropna=False)):
        fig = speed_figure(group, _group_title(key))
        speed_divs.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"speed-{i}", config=config))
    for i, (key, group) in enumerate(df.groupby(GROUP_KEYS, sort=True, dropna=False)):
        fig = exit_figure(group, _group_title(key))
        if fig.data:
            exit_divs.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"exits-{i}",
                                         config=config))
    not_drawn = len(df) - len(drawn)
    note = (f"<p class=\"note\">{not_drawn} run(s) have no speed-up or no task metric and are only in the table."
            "</p>" if not_drawn else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style>
<script>{get_plotlyjs()}</script>
</head>
<body data-runs="{len(df)}" data-points="{len(drawn)}">
<h1>{html.escape(title)}</h1>
<p class="note">{len(df)} run(s). Speed-up: the run's own wall-clock speed-up (full model timed in the same
process), else the sweep's (throughput against its exit=full run), else the layer speed-up (open circles).
Ringed points are on the Pareto front (no other run both faster and better; the oracle reads the labels and
is never on it). Hover a point for its run; click a method in the legend to hide or show it.</p>
<h2>Speed against accuracy</h2>
{note}
{''.join(speed_divs) or '<p>No run has both a speed-up and a task metric.</p>'}
<h2>Results</h2>
<p class="note">Click a header to sort.</p>
{results_table_html(df)}
<h2>Exit layers</h2>
{''.join(exit_divs) or '<p>No run recorded exit-layer counts.</p>'}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def write_report_html(df: pd.DataFrame, path: str | Path, title: str = "raee report") -> Path:
    """Writes report.html (atomically) and returns its path."""
    atomic_write_text(path, report_html(df, title))
    return Path(path)
