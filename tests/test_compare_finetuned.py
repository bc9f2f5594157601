"""+experiment=compare_finetuned: every method in one sweep on one fine-tuned backbone (fitted once, then
loaded by the other jobs) and one training budget, which the report's table states per row."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.test_sweep import run_raee

pytestmark = pytest.mark.slow

TINY = ["backbone=tiny_bert", "data=bbcnews_small", "data.max_train_examples=30", "data.max_eval_examples=12",
        "data.batch_size=10", "finetune.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none"]


def test_compare_finetuned_shares_backbone_and_budget(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_raee(["-m", "+experiment=compare_finetuned", f"hydra.sweep.dir={sweep}", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert {s["method"] for s in summaries} == {"full", "entropy", "patience", "raee", "hashee", "oracle"}
    # the joint fine-tune ran once: one cached head, loaded by the other jobs
    assert len([p for p in (tmp_path / "cache" / "heads").iterdir() if not p.name.startswith(".")]) == 1
    references = {s["method"]: s["full_reference"] for s in summaries}
    assert references.pop("hashee") == "full (token path)" and references.pop("full") is None
    assert set(references.values()) == {"full"}  # the other methods run the model's own layers, as FullModel does
    budgets = {s["method"]: s["budget"] for s in summaries}
    shared = {k: v for k, v in budgets["full"].items() if k != "by"}
    assert budgets["full"]["by"] == "head" and budgets["hashee"]["by"] == "hashee"
    assert shared["epochs"] == 1 and shared["steps"] == 3  # 30 training examples in batches of 10
    for method, budget in budgets.items():  # same epochs, steps, learning rates, warm-up, decay and seed
        assert {k: v for k, v in budget.items() if k != "by"} == shared, method

    report = subprocess.run([sys.executable, "-m", "raee.report", str(sweep)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    table = pd.read_csv(sweep / "report" / "results.csv")
    assert len(table) == 6 and table["dataset"].nunique() == 1 and table["backbone"].nunique() == 1
    assert table["budget"].str.contains("1 ep, 3 steps").all()
    assert "fine-tuning budget" in (sweep / "report" / "results.md").read_text()
