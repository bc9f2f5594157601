"""Tables and charts of a sweep: ``python -m raee.report multirun/<date>/<time> [--out DIR] [--paper raee_table1]``.

Reads every run's summary.json below a directory (one row per run; failed runs, which left an
error.json instead, go to their own table), and writes to ``--out`` (default ``<dir>/report``):

- results.csv, results.md: one row per run, sorted by dataset (backbone, head), method, speed-up;
- speed_vs_accuracy.png: speed-up (x) against the task metric (y), one line per method, the
  Pareto front (runs no other run beats on both) ringed and joined;
- exit_layers.png: share of examples per exit layer, one panel per method;
- pareto_layers.png / pareto_speedup.png: accuracy against mean layers computed / wall-clock speed-up, one
  curve per method and rule, dominated runs hollow, calibrated runs starred (:mod:`raee.report.pareto`);
- with ``--paper``: paper_comparison.md/csv (our numbers beside the paper's, :mod:`raee.paper_results`);
- report.html: the same sweep as one self-contained interactive page (:mod:`raee.report.html`);
- for an Optuna search: optuna_pareto.md, the trials the sweeper kept (:mod:`raee.search_results`).

Speed-up on the charts: the run's own wall-clock speed-up (full model timed in the same process),
else the sweep's (throughput against the sweep's exit=full run), else the layer speed-up
(L / mean exit layer; hollow markers). The oracle reads labels, so it never joins the Pareto front.
Modules, one concern each: :mod:`~raee.report.collect` (summaries -> one row per run),
:mod:`~raee.report.analysis` (speed axis, Pareto front, labels, ordering), :mod:`~raee.report.pareto`
(curves, dominated runs, oracle gap), :mod:`~raee.report.tables`
(Markdown/CSV), :mod:`~raee.report.figures` (charts), :mod:`~raee.report.wandb_log`,
:mod:`~raee.report.paper` (paper comparison) and :mod:`~raee.report.cli` (the command).
"""

from raee.report.analysis import (BOUNDS, GROUP_KEYS, METHOD_ORDER, add_analysis, method_rank, pareto_front,
                                  sort_runs, speed_axis, varying_knobs)
from raee.report.cli import build_parser, main, write_report
from raee.report.collect import (COLUMNS, ERROR_FILE, FAILED_COLUMNS, NUMERIC_COLUMNS, SUMMARY_FILE, add_sweep_speedup,
                                 collect, collect_failed, find_runs, flatten_knobs, knobs_string)
from raee.report.figures import plot_exit_layers, plot_pareto, plot_speed_vs_metric
from raee.report.html import report_html, write_report_html
from raee.report.paper import paper_comparison_markdown, write_paper_comparison
from raee.report.pareto import add_pareto, cost_column, curve_names, curve_table, dominated, oracle_gap
from raee.report.tables import failed_markdown, markdown_table, pareto_markdown, results_markdown, write_csv
from raee.report.wandb_log import log_to_wandb, wandb_group

__all__ = [
    "BOUNDS", "COLUMNS", "ERROR_FILE", "FAILED_COLUMNS", "GROUP_KEYS", "METHOD_ORDER", "NUMERIC_COLUMNS", "SUMMARY_FILE",
    "add_analysis", "add_pareto", "add_sweep_speedup", "build_parser", "collect", "collect_failed", "cost_column",
    "curve_names", "curve_table", "dominated", "failed_markdown", "find_runs", "flatten_knobs", "knobs_string",
    "log_to_wandb", "main",
    "markdown_table", "method_rank", "oracle_gap", "paper_comparison_markdown", "pareto_front", "pareto_markdown",
    "plot_exit_layers", "plot_pareto", "plot_speed_vs_metric", "results_markdown", "sort_runs", "speed_axis",
    "varying_knobs", "wandb_group", "write_csv", "write_paper_comparison", "write_report", "report_html",
    "write_report_html",
]
