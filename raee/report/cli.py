"""``python -m raee.report DIR``: write every table and chart of a sweep and print the results table."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from raee.atomic import atomic_write_text
from raee.cli import user_errors
from raee.report.analysis import add_analysis, sort_runs
from raee.report.collect import collect, collect_failed
from raee.report.figures import plot_exit_layers, plot_pareto, plot_speed_vs_metric
from raee.report.html import write_report_html
from raee.report.paper import write_paper_comparison
from raee.report.pareto import add_pareto
from raee.report.tables import failed_markdown, pareto_markdown, results_markdown, write_csv
from raee.report.wandb_log import log_to_wandb, wandb_group
from raee.search_results import pareto_markdown as search_pareto_markdown


def write_report(df: pd.DataFrame, out: str | Path, failed: pd.DataFrame | None = None,
                 paper: str | None = None) -> dict[str, Path]:
    """Writes results.csv/.md, the PNGs, report.html (interactive, self-contained), failed.csv (if any) and, with ``paper``, the paper
    comparison into ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = add_pareto(sort_runs(add_analysis(df)))
    paths = {"results.csv": write_csv(df, out / "results.csv")}
    md = ["# Results", "", f"{len(df)} run(s). Speed-up: the run's own wall-clock speed-up (full model timed in "
          "the same process); 'sweep wall speed-up': throughput against the sweep's exit=full run. "
          "Pareto: no other run (oracle excluded) is both faster and better.", "", results_markdown(df), "",
          "## Speed-accuracy curves", "", pareto_markdown(df)]
    if failed is not None and len(failed):
        md += ["", f"## Failed runs ({len(failed)})", "", failed_markdown(failed)]
        paths["failed.csv"] = write_csv(failed, out / "failed.csv")
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    paths["results.md"] = out / "results.md"
    paths["speed_vs_accuracy.png"] = plot_speed_vs_metric(df, out / "speed_vs_accuracy.png")
    paths["exit_layers.png"] = plot_exit_layers(df, out / "exit_layers.png")
    paths["pareto_layers.png"] = plot_pareto(df, out / "pareto_layers.png", axis="layers")
    paths["pareto_speedup.png"] = plot_pareto(df, out / "pareto_speedup.png", axis="speedup")
    name = out.resolve().parent.name if out.resolve().name == "report" else out.resolve().name
    paths["report.html"] = write_report_html(df, out / "report.html", title=f"raee report: {name}")
    if paper:
        paths.update(write_paper_comparison(df, out, paper))
    return paths


def build_parser() -> argparse.ArgumentParser:
    from raee.paper_results import PAPER_TABLES

    parser = argparse.ArgumentParser(
        prog="python -m raee.report",
        description="Tables and charts of a sweep: reads every summary.json below DIR (failed runs: error.json), "
                    "writes results.csv, results.md (with the speed-accuracy curves: dominated runs, oracle gap), "
                    "speed_vs_accuracy.png, exit_layers.png, pareto_layers.png, pareto_speedup.png, report.html (interactive, "
                    "self-contained) and prints the "
                    "tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m raee.run -m +experiment=compare_all\n"
               "  python -m raee.run -m +experiment=pareto     # every method's knob, calibrated runs, 2 datasets\n"
               "  python -m raee.report multirun/compare_all/<date>/<time>\n"
               "  python -m raee.report multirun/raee_table1/<date>/<time> --paper raee_table1 --out report/\n"
               "experiments/README.md describes every experiment config and output file.")
    parser.add_argument("root", metavar="DIR", nargs="?",
                        help="a sweep directory (multirun/<...>/<date>/<time>) or any parent")
    parser.add_argument("--out", metavar="OUT", default=None, help="output directory (default: DIR/report)")
    parser.add_argument("--paper", choices=sorted(PAPER_TABLES), default=None,
                        help="also put our numbers beside a paper's table (paper_comparison.md/.csv)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and charts to wandb (WANDB_MODE respected; offline by default)")
    parser.add_argument("--docs", action="store_true",
                        help="instead of reading a sweep: regenerate the tables of README.md and docs/ from the CSVs "
                             "under results/ (raee.report.docs; docs/guides/publishing-results.md)")
    parser.add_argument("--check", action="store_true",
                        help="with --docs: change nothing, print the differences and exit 1 when a page differs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when the report (or with --docs the pages' tables) is written; a user's error (no such
    directory, no runs, a bad table spec) prints ``error: <message>`` and exits with status 2 (:mod:`raee.cli`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.docs:
        from raee.report.docs import main_docs

        with user_errors():
            return main_docs(check=args.check)
    if args.root is None:
        parser.error("give a sweep directory DIR (or --docs)")
    with user_errors():
        return run_report(args)


def run_report(args: argparse.Namespace) -> int:
    root = Path(args.root)
    failed = collect_failed(root)
    if len(failed):
        print(f"## Failed runs ({len(failed)})\n\n{failed_markdown(failed)}\n")
    df = collect(root)
    out = Path(args.out) if args.out else root / "report"
    paths = write_report(df, out, failed=failed, paper=args.paper)
    print(results_markdown(df))
    print("\n## Speed-accuracy curves\n\n" + pareto_markdown(add_pareto(add_analysis(df))))
    search = search_pareto_markdown(root)
    if search:  # an Optuna search: the Pareto set its sweeper wrote, with each trial's run
        paths["optuna_pareto.md"] = out / "optuna_pareto.md"
        atomic_write_text(paths["optuna_pareto.md"], search)
        print("\n" + search)
    if args.paper:
        print("\n" + (out / "paper_comparison.md").read_text())
    if args.wandb:
        figures = {k.removesuffix(".png"): v for k, v in paths.items() if k.endswith(".png")}
        log_to_wandb(add_analysis(df), figures, group=wandb_group(args.root), directory=out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0
