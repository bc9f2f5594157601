"""Regression end to end: a synthetic file of texts with real-valued targets goes through the linear
head (one output per layer, MSE), the exits that can handle it (full, fixed, patience with PABEE's
|diff| < threshold rule, the oracle with a tolerance, HashEE) and reports Pearson/Spearman; exits and
heads that only know classes refuse it with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from raee.exit_loop import run_early_exit
from raee.exits import OracleExit, PatienceExit
from raee.metrics import task_metrics
from raee.run import run_job
from tests.conftest import TEXTS
from tests.test_config import compose_cfg
from tests.test_exit_loop import ScriptedHead, ctx_for


def write_synthetic_regression(path, n: int = 48, seed: int = 0) -> pd.DataFrame:
    """Texts whose target is the number of 'good' words in them (0..4) plus a little noise."""
    rng = np.random.default_rng(seed)
    filler = "the report on the market said that prices moved during the week".split()
    rows = []
    for i in range(n):
        k = i % 5
        words = list(rng.choice(filler, size=8)) + ["good"] * k
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": float(k + rng.normal(0, 0.1))})
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def regression_overrides(tmp_path) -> list[str]:
    csv = tmp_path / "scores.csv"
    write_synthetic_regression(csv)
    return ["backbone=tiny_bert", "data=csv", f"data.train_file={csv}", "data.text_column=text",
            "data.label_column=score", "data.name=synthetic", "data.task_type=regression", "data.task_metric=pearson",
            "data.batch_size=8", "logger=none", "trainer.enable_progress_bar=false",
            "regression_tolerance=0.75", f"paths.cache_dir={tmp_path / 'cache'}"]


def test_regression_runs_end_to_end_and_reports_pearson(tmp_path):
    base = regression_overrides(tmp_path) + ["head=linear", "head.max_epochs=2"]
    for exit_args in (["exit=full"], ["exit=patience", "exit.patience=1", "exit.regression_threshold=0.5"],
                      ["exit=raee", "exit.k=4"], ["exit=hashee", "exit.max_epochs=1", "exit.hash=random_occurrence"]):
        out = tmp_path / exit_args[0]
        summary = run_job(compose_cfg(base + exit_args), str(out), multirun=False)
        assert summary["task_metric"] == "pearson" and summary["accuracy"] is None
        assert isinstance(summary["task_metric_value"], float) and -1.0 <= summary["task_metric_value"] <= 1.0
        assert summary["task_metric_value"] == summary["pearson"] and summary["spearman"] is not None
        assert summary["mse"] >= 0 and summary["full_task_metric_value"] is not None
        assert summary["oracle_task_metric_value"] is not None
        preds = pd.read_csv(out / "predictions.csv")
        assert len(preds) == summary["num_examples"] and preds["prediction"].dtype == float
        assert preds["confidence"].isna().all()  # no class probability for a real-valued output
    assert summary["method"] == "hashee" and summary["flops_speedup"] > 1.0
    assert summary["full_reference"] == "full (token path)"  # timed against its own layer code without exits
    # the oracle ran with the configured tolerance: its exits are no later than the full model's
    assert summary["oracle_mean_exit_layer"] <= 4


def test_class_only_exits_and_heads_refuse_regression(tmp_path):
    base = regression_overrides(tmp_path)
    with pytest.raises(ValueError, match="exit=entropy .*cannot handle a regression task"):
        run_job(compose_cfg(base + ["exit=entropy"]), str(tmp_path / "entropy"), multirun=False)
    with pytest.raises(ValueError, match="PrototypeHead predicts classes and cannot do regression"):
        run_job(compose_cfg(base + ["head=prototype", "exit=full"]), str(tmp_path / "proto"), multirun=False)
    with pytest.raises(ValueError, match="mutual-information hash needs class labels"):
        run_job(compose_cfg(base + ["exit=hashee", "exit.hash=mi"]), str(tmp_path / "mi"), multirun=False)


class RegressionScriptedHead(ScriptedHead):
    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__(table, 1)
        self.regression = True  # one real output per example


def scripted_values(backbone, per_example_values: list[list[float]]):
    enc = backbone.tokenize(TEXTS[: len(per_example_values)])
    table = {int(enc["input_ids"][i, 1]): torch.tensor(v).unsqueeze(1) for i, v in enumerate(per_example_values)}
    return RegressionScriptedHead(table), enc


@pytest.mark.parametrize("values,threshold,expected", [
    ([9.0, 1.0, 1.05, 3.0, 3.0], 0.1, 2),   # layers 1 and 2 differ by 0.05 < 0.1
    ([9.0, 1.0, 1.5, 2.0, 2.6], 0.1, 4),    # never within the threshold
    ([9.0, 1.0, 1.5, 2.0, 2.6], 0.55, 2),   # a larger threshold: 1 -> 1.5 agrees
])
def test_patience_regression_rule_compares_absolute_differences(tiny_bert, values, threshold, expected):
    head, enc = scripted_values(tiny_bert, [values])
    strategy = PatienceExit(patience=1, regression_threshold=threshold)
    strategy.prepare(tiny_bert, head)
    res = run_early_exit(tiny_bert, head, strategy, enc, ctx_for(tiny_bert, 1))
    assert res.exit_layers.tolist() == [expected]
    assert res.predictions.tolist() == pytest.approx([values[expected]])


def test_oracle_exits_at_earliest_layer_within_tolerance(tiny_bert):
    head, enc = scripted_values(tiny_bert, [[0.0, 2.0, 2.9, 3.1, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    labels = torch.tensor([3.0, 0.0])
    oracle = OracleExit(tolerance=0.2)
    oracle.prepare(tiny_bert, head)
    res = run_early_exit(tiny_bert, head, oracle, enc, ctx_for(tiny_bert, 2, labels))
    assert res.exit_layers.tolist() == [2, 4]  # 2.9 is the first within 0.2 of 3; nothing near 0: last layer
    oracle = OracleExit(tolerance=1.0)
    oracle.prepare(tiny_bert, head)
    assert run_early_exit(tiny_bert, head, oracle, enc, ctx_for(tiny_bert, 2, labels)).exit_layers.tolist() == [1, 4]
    with pytest.raises(ValueError, match="tolerance"):
        OracleExit(tolerance=-1)


def test_regression_metrics_match_numpy_and_scipy_definitions():
    preds = torch.tensor([0.1, 1.2, 1.9, 3.2, 3.8, 5.5])
    target = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    m = task_metrics(preds, target, 1, regression=True)
    assert m["pearson"] == pytest.approx(float(np.corrcoef(preds, target)[0, 1]), abs=1e-6)
    assert m["spearman"] == pytest.approx(1.0)  # same order
    assert m["mse"] == pytest.approx(float(((preds - target) ** 2).mean()), abs=1e-6)
    assert task_metrics(torch.ones(4), target[:4], 1, regression=True)["pearson"] is None  # constant: undefined
    json.dumps(m)  # plain floats, JSON-ready


def test_regression_database_stores_its_tolerance_and_refuses_another(tmp_path):
    from raee.build_db import build

    db_dir = tmp_path / "db"
    base = regression_overrides(tmp_path) + ["head=linear", "head.max_epochs=1", f"db.dir={db_dir}"]
    build(compose_cfg(base))
    meta = json.loads((db_dir / "meta.json").read_text())
    assert meta["tolerance"] == 0.75 and meta["head"]["task"] == "regression"
    from raee.database import ExitDatabase

    db = ExitDatabase.load(db_dir)
    # the tables are memory-mapped; read them whole as tensors
    preds, labels, correct, probs = (t.tensor() for t in (db.info.preds, db.info.labels, db.info.correct,
                                                          db.info.probs))
    assert preds.is_floating_point() and labels.is_floating_point()
    error = (preds - labels.unsqueeze(1)).abs()
    assert torch.equal(correct, error <= 0.75)  # "correct" is within the stored tolerance
    assert ((probs >= 0) & (probs <= 1)).all()
    summary = run_job(compose_cfg(base + ["exit=raee"]), str(tmp_path / "same"), multirun=False)
    assert summary["method"] == "raee" and summary["pearson"] is not None
    with pytest.raises(ValueError, match=r"within tolerance 0.75, this run asks for 0.3"):
        run_job(compose_cfg(base + ["exit=raee", "regression_tolerance=0.3"]), str(tmp_path / "other"),
                multirun=False)
