"""Our numbers beside a paper's table (:mod:`raee.paper_results`) as Markdown and CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from raee.atomic import atomic_write_text
from raee.report.tables import markdown_table, write_csv

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
