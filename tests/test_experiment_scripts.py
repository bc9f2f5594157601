"""Small experiments/ scripts: calibration_curve.py (a cached calibration as a CSV) and compare_predictions.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import load_experiment


def record(values_scores, full_score, chosen):
    curve = [{"value": v, "accuracy": a, "mean_exit_layer": 1.0 + i, "mean_layers_computed": 1.0 + i,
              "flops_speedup": 2.0, "num_examples": 10} for i, (v, a) in enumerate(values_scores)]
    return {"description": {"target": {"target": "accuracy", "max_drop": 0.01},
                            "backbone": {"num_layers": 30}},
            "result": {"knob": "threshold", "value": chosen, "metric": "rougeL", "split": "validation",
                       "num_examples": 10, "curve": curve,
                       "validation": {"full_accuracy": full_score}}}


def test_a_record_whose_thresholds_all_lose_chooses_no_exit(tmp_path):
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record([(0.9, 0.0), (0.5, 0.0)], 0.25, chosen=0.9)))  # cached by the old rule
    out = tmp_path / "curve.csv"
    assert load_experiment("calibration_curve").main([str(path), "--csv", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame["setting"]) == ["threshold 0.9", "threshold 0.5", "no exit (the full model)"]
    assert list(frame["chosen"]) == ["", "", "yes"]


def test_a_good_enough_threshold_is_chosen_and_bad_input_is_refused(tmp_path):
    module = load_experiment("calibration_curve")
    rows = module.curve_rows(record([(0.9, 0.25), (0.5, 0.245)], 0.25, chosen=0.5))
    assert [r["chosen"] for r in rows] == ["yes", "", ""]  # both within one point: the fastest (fewest layers)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"result": {"value": 1}}))
    with pytest.raises(ValueError, match="no calibration curve"):
        module.main([str(bad)])


def test_compare_predictions_counts_the_same_outputs_by_index(tmp_path):
    module = load_experiment("compare_predictions")
    pd.DataFrame({"index": [0, 1, 2], "generated": ["a b", "c", ""]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"index": [2, 1, 0, 3], "generated": ["", "x", "a b", "d"]}).to_csv(tmp_path / "b.csv", index=False)
    out = tmp_path / "same.csv"
    assert module.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--csv", str(out), "--label", "t"]) == 0
    row = pd.read_csv(out, keep_default_na=False).iloc[0]
    assert (row["examples"], row["same"], row["only_in_b"], str(row["first_differing"])) == (3, 2, 1, "1")
    with pytest.raises(FileNotFoundError, match="predictions.csv"):
        module.main([str(tmp_path / "missing.csv"), str(tmp_path / "b.csv")])
