"""raee.report and raee.paper_results on a hand-written multirun directory (no model runs)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raee import report
from raee.paper_results import PAPER_TABLES, RAEE_TABLE1, compare_gains, compare_with_paper, paper_dataset_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
L = 6


def summary(method: str, knobs: dict, accuracy: float, mean_exit: float, wall: float, *, full_wall: float | None = 10.0,
            dataset: str = "bbcnews", backbone: str = "sentence-transformers/all-MiniLM-L6-v2", n: int = 100,
            head: str = "prototype") -> dict:
    """A summary.json as raee.experiment.build_summary writes it."""
    counts = [0] * (L + 1)
    lo = int(math.floor(mean_exit))
    frac = mean_exit - lo
    counts[lo] = round(n * (1 - frac))
    if lo < L:
        counts[lo + 1] = n - counts[lo]
    return {
        "run_name": method, "method": method, "knobs": knobs, "dataset": dataset, "split": "test",
        "backbone": backbone, "head": head, "num_layers": L, "num_examples": n, "seed": 42,
        "task_metric": "accuracy", "task_metric_value": accuracy, "accuracy": accuracy, "macro_f1": accuracy - 0.01,
        "mcc": accuracy - 0.05, "mean_exit_layer": mean_exit, "layer_speedup": L / mean_exit if mean_exit else None,
        "layers_saved": 1 - mean_exit / L, "flops_speedup": None, "wall_time_s": wall, "throughput": n / wall,
        "full_wall_time_s": full_wall, "wall_speedup": full_wall / wall if full_wall else None,
        "full_accuracy": 0.95, "retrieval_time_s": 0.0, "retrieval_share": 0.0, "timings": {},
        "exit_layer_counts": counts, "status": "ok", "version": "0.1.0",
    }


RUNS = {
    "0_exit=full": summary("full", {}, 0.95, 6.0, 10.0),
    "1_exit=entropy,exit.threshold=0.1": summary("entropy", {"threshold": 0.1, "min_layer": 1}, 0.94, 5.0, 8.0),
    "2_exit=entropy,exit.threshold=0.5": summary("entropy", {"threshold": 0.5, "min_layer": 1}, 0.90, 3.0, 5.0),
    "3_exit=entropy,exit.threshold=1.0": summary("entropy", {"threshold": 1.0, "min_layer": 1}, 0.80, 1.5, 2.5),
    "4_exit=raee,exit.k=4": summary("raee", {"k": 4, "key_encoder": {"type": "backbone", "layer": 1}}, 0.93, 3.0, 4.0),
    "5_exit=raee,exit.k=12": summary("raee", {"k": 12, "key_encoder": {"type": "backbone", "layer": 1}}, 0.95, 3.5,
                                     4.0),
    # no in-process timing: the sweep's full run gives the speed-up
    "6_exit=oracle": summary("oracle", {}, 0.99, 1.0, 2.0, full_wall=None),
}
FAILED = {"7_exit=hashee": {"status": "failed", "error": "ValueError: HashEE needs head=linear",
                            "overrides": ["+experiment=compare_all", "exit=hashee"], "traceback": "..."},
          # the exit comes from the experiment's defaults, not an override: Hydra's hydra.yaml names it
          "8_exit.patience=9": {"status": "failed", "error": "ValueError: exit.patience=9 is above the number of layers",
                                "overrides": ["+experiment=patience_curve", "exit.patience=9"], "traceback": "..."}}
HYDRA_YAML = """hydra:
  runtime:
    choices:
      experiment: patience_curve
      exit: patience
      data: bbcnews
      head: prototype
      backbone: minilm
"""


def make_sweep(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for name, s in RUNS.items():
        (root / name).mkdir()
        (root / name / "summary.json").write_text(json.dumps(s))
        (root / name / ".hydra").mkdir()
        (root / name / ".hydra" / "overrides.yaml").write_text("- " + "\n- ".join(name.split("_", 1)[1].split(",")))
    for name, e in FAILED.items():
        (root / name).mkdir()
        (root / name / "error.json").write_text(json.dumps(e))
    (root / "8_exit.patience=9" / ".hydra").mkdir()
    (root / "8_exit.patience=9" / ".hydra" / "hydra.yaml").write_text(HYDRA_YAML)
    return root


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path / "multirun" / "2026-01-01" / "12-00-00")


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, str]:
    """The CLI run once over the sweep (charts take a moment): (output directory, what it printed)."""
    root = make_sweep(tmp_path_factory.mktemp("cli") / "sweep")
    out = root / "rep"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert report.main([str(root), "--out", str(out), "--paper", "raee_table1"]) == 0
    return out, buf.getvalue()


def test_collect_one_row_per_run(sweep):
    df = report.collect(sweep.parent.parent)  # a parent of the sweep works too
    assert len(df) == len(RUNS)
    for col in ("method", "knobs", "dataset", "backbone", "head", "task_metric", "task_metric_value", "accuracy",
                "macro_f1", "mcc", "mean_exit_layer", "layer_speedup", "layers_saved", "flops_speedup", "wall_time_s",
                "full_wall_time_s", "wall_speedup", "sweep_wall_speedup", "retrieval_share", "num_examples", "run_dir",
                "knob_threshold", "knob_k", "knob_key_encoder.layer"):
        assert col in df.columns, col
    assert sorted(df["method"]) == sorted(s["method"] for s in RUNS.values())
    ent = df[df["method"] == "entropy"].set_index("knob_threshold")
    assert ent.loc[0.5, "knobs"] == "threshold=0.5, min_layer=1"
    assert ent.loc[0.5, "accuracy"] == pytest.approx(0.90)
    raee = df[df["method"] == "raee"].set_index("knob_k")
    assert raee.loc[12, "knobs"] == "k=12, key_encoder.type=backbone, key_encoder.layer=1"
    assert set(df["sweep"]) == {"2026-01-01/12-00-00"}
    assert ent.loc[0.5, "overrides"] == "exit=entropy,exit.threshold=0.5"


def test_sweep_wall_speedup_uses_the_sweeps_full_run(sweep):
    df = report.collect(sweep).set_index("run_dir")
    # full: 100 examples in 10 s; entropy threshold 0.5: in 5 s -> 2x; oracle: 2 s -> 5x
    assert df.loc["0_exit=full", "sweep_wall_speedup"] == pytest.approx(1.0)
    assert df.loc["2_exit=entropy,exit.threshold=0.5", "sweep_wall_speedup"] == pytest.approx(2.0)
    assert df.loc["6_exit=oracle", "sweep_wall_speedup"] == pytest.approx(5.0)
    assert math.isnan(df.loc["6_exit=oracle", "wall_speedup"])
    speed, source = report.speed_axis(df)
    assert source["6_exit=oracle"] == "sweep_wall" and speed["6_exit=oracle"] == pytest.approx(5.0)
    assert source["1_exit=entropy,exit.threshold=0.1"] == "wall"


def test_sweep_wall_speedup_needs_a_full_run_in_the_same_sweep(tmp_path):
    for sweep_name, runs in {"a": {"0": summary("full", {}, 0.9, 6.0, 10.0)},
                             "b": {"0": summary("entropy", {"threshold": 0.3}, 0.8, 3.0, 5.0)}}.items():
        (tmp_path / sweep_name).mkdir()
        (tmp_path / sweep_name / "multirun.yaml").write_text("")
        for name, s in runs.items():
            (tmp_path / sweep_name / name).mkdir()
            (tmp_path / sweep_name / name / "summary.json").write_text(json.dumps(s))
    df = report.collect(tmp_path).set_index("method")
    assert math.isnan(df.loc["entropy", "sweep_wall_speedup"])  # sweep b has no full run
    assert df.loc["full", "sweep_wall_speedup"] == pytest.approx(1.0)


def test_failed_run_is_listed_not_dropped(sweep, reported):
    failed = report.collect_failed(sweep).set_index("run_dir")
    assert sorted(failed.index) == ["7_exit=hashee", "8_exit.patience=9"]
    assert failed.loc["7_exit=hashee", "method"] == "hashee"  # from the overrides
    assert "HashEE needs head=linear" in failed.loc["7_exit=hashee", "error"]
    patience = failed.loc["8_exit.patience=9"]  # from Hydra's record of the composed groups
    assert (patience["method"], patience["data"], patience["backbone"]) == ("patience", "bbcnews", "minilm")
    out, printed = reported
    assert "Failed runs (2)" in printed and "HashEE needs head=linear" in printed
    md = (out / "results.md").read_text()
    assert "Failed runs (2)" in md and "7_exit=hashee" in md and "exit.patience=9 is above" in md
    assert len(pd.read_csv(out / "failed.csv")) == 2


def test_pareto_front_hand_made():
    x = [1.0, 2.0, 3.0, 2.0, 1.5, np.nan, 3.0]
    y = [0.9, 0.8, 0.5, 0.7, 0.9, 1.0, 0.5]
    # (1, .9) is beaten by (1.5, .9); (2, .7) by (2, .8); NaN never counts; the two (3, .5) tie
    assert report.pareto_front(x, y).tolist() == [False, True, True, False, True, False, True]
    assert report.pareto_front([], []).tolist() == []
    with pytest.raises(ValueError, match="same length"):
        report.pareto_front([1.0, 2.0], [1.0])


def test_pareto_column_excludes_the_oracle(sweep):
    df = report.add_analysis(report.collect(sweep)).set_index("run_dir")
    # speed-ups (x): full 1, entropy 1.25/2/4, raee 2.5/2.5, oracle 5 (excluded)
    on_front = set(df.index[df["pareto"]])
    assert on_front == {"5_exit=raee,exit.k=12", "3_exit=entropy,exit.threshold=1.0"}
    assert not df.loc["6_exit=oracle", "pareto"]


def test_report_files_markdown_and_pngs(reported):
    out, printed = reported
    for name in ("results.csv", "results.md", "speed_vs_accuracy.png", "exit_layers.png"):
        assert (out / name).exists(), name
    for png in ("speed_vs_accuracy.png", "exit_layers.png"):
        data = (out / png).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, png
    md = (out / "results.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| "))
    assert header.startswith("| dataset | backbone | head | method | knobs | metric | value | accuracy |")
    assert header in printed  # the table goes to stdout too
    start = md.index(header)
    end = next(i for i in range(start, len(md)) if not md[i].startswith("|"))
    body = [line for line in md[start:end] if line.startswith("| bbcnews")]  # the results table only
    assert len(body) == len(RUNS)
    methods = [line.split(" | ")[3] for line in body]
    assert methods == ["full", "entropy", "entropy", "entropy", "raee", "raee", "oracle"]
    entropy_knobs = [line.split(" | ")[4] for line in body if line.split(" | ")[3] == "entropy"]
    assert entropy_knobs == ["threshold=0.1", "threshold=0.5", "threshold=1"]  # sorted by speed-up
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == len(RUNS)
    full = csv[csv["method"] == "full"].iloc[0]
    assert json.loads(full["exit_layer_counts"]) == RUNS["0_exit=full"]["exit_layer_counts"]


def test_compare_with_paper_side_by_side():
    rows = [summary("full", {}, 0.80, 6.0, 10.0, dataset="sst2", backbone="FacebookAI/roberta-large"),
            summary("raee", {"k": 12}, 0.85, 3.0, 5.0, dataset="sst2", backbone="FacebookAI/roberta-large"),
            summary("entropy", {"threshold": 0.3}, 0.60, 2.0, 4.0, dataset="sst2",
                    backbone="sentence-transformers/all-MiniLM-L6-v2"),
            summary("raee", {"k": 12}, 0.93, 3.0, 5.0, dataset="bbcnews"),
            summary("oracle", {}, 0.99, 1.0, 2.0, dataset="sst2", backbone="FacebookAI/roberta-large")]
    df = pd.DataFrame(rows)
    df["run_dir"] = [f"{i}" for i in range(len(df))]
    cmp = compare_with_paper(df, "raee_table1")
    raee = cmp[(cmp["method"] == "raee") & (cmp["dataset"] == "sst2")].iloc[0]
    assert raee["paper_method"] == "RAEE" and raee["paper_backbone"] == "RoBERTa-large"
    assert raee["paper_value"] == pytest.approx(84.63)
    assert raee["measured_value"] == pytest.approx(85.0)
    assert raee["difference"] == pytest.approx(85.0 - 84.63)
    assert raee["paper_gain_vs_full"] == pytest.approx(84.63 - 83.60)
    assert raee["our_gain_vs_full"] == pytest.approx(5.0)
    assert raee["status"] == "compared" and raee["backbone_note"] == "same backbone (RoBERTa-large)"
    deebert = cmp[cmp["method"] == "entropy"].iloc[0]
    assert deebert["paper_method"] == "DeeBERT" and deebert["paper_value"] == pytest.approx(52.29)
    assert deebert["backbone_note"] == ("paper: RoBERTa-large; ours: all-MiniLM-L6-v2 "
                                        "(RoBERTa-large not available offline)")
    assert "stands in for DeeBERT" in deebert["head_note"]
    bbc = cmp[cmp["dataset"] == "bbcnews"].iloc[0]
    assert math.isnan(bbc["paper_value"]) and bbc["measured_value"] == pytest.approx(93.0)
    assert bbc["status"].startswith("no paper number")
    assert "oracle" not in set(cmp["method"])  # not in the paper
    sst5 = cmp[(cmp["paper_method"] == "RAEE") & (cmp["paper_dataset"] == "SST-5")
               & (cmp["paper_backbone"] == "RoBERTa-large")].iloc[0]
    assert sst5["status"] == "not run: dataset not available offline"
    assert sst5["paper_value"] == pytest.approx(33.57) and math.isnan(sst5["measured_value"])
    ada = cmp[cmp["paper_method"] == "AdaInfer"]
    assert len(ada) == 8 and ada["status"].str.contains("not implemented").all()
    llama = cmp[(cmp["paper_method"] == "RAEE") & (cmp["paper_backbone"] == "Llama-3-8B")
                & (cmp["paper_dataset"] == "SST-2")].iloc[0]
    assert llama["status"].startswith("not run") and llama["paper_value"] == pytest.approx(73.05)
    gains = compare_gains(df, "raee_table1").set_index(["method", "dataset"])
    assert gains.loc[("raee", "sst2"), "our_gain_vs_full"] == pytest.approx(5.0)
    assert gains.loc[("raee", "sst2"), "paper_mean_gain_vs_full"] == pytest.approx(63.41 - 54.05, abs=0.01)


def test_paper_numbers_match_their_reported_averages():
    # a typo in the transcription would break the paper's own row averages
    for row in RAEE_TABLE1.rows:
        if row.reported_avg is not None:
            assert len(row.values) == 8
            assert sum(row.values.values()) / 8 == pytest.approx(row.reported_avg, abs=0.006), row
    assert set(PAPER_TABLES) == {"raee_table1"}
    assert paper_dataset_for("sst2", RAEE_TABLE1) == "SST-2"
    assert paper_dataset_for("glue_cola", RAEE_TABLE1) == "CoLA"
    assert paper_dataset_for("bbcnews_small", RAEE_TABLE1) is None


def test_cli_paper_comparison(reported):
    out, printed = reported
    assert "Paper comparison" in printed
    md = (out / "paper_comparison.md").read_text()
    assert "not run: dataset not available offline" in md and "stands in for DeeBERT" in md
    cmp = pd.read_csv(out / "paper_comparison.csv")
    assert {"paper_value", "measured_value", "difference", "backbone_note"} <= set(cmp.columns)
    ours = cmp[cmp["dataset"] == "bbcnews"]
    assert set(ours["method"]) == {"full", "entropy", "raee"}  # the methods the paper has a row for
    assert (ours["status"].str.startswith("no paper number")).all()


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        report.collect(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no summary.json below .*python -m raee.run -m"):
        report.collect(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # a user's error: one paragraph on stderr, status 2
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no summary.json" in capsys.readouterr().err
    only_failed = tmp_path / "0_exit=raee"
    only_failed.mkdir()
    (only_failed / "error.json").write_text(json.dumps(FAILED["7_exit=hashee"]))
    with pytest.raises(FileNotFoundError, match="1 failed run"):
        report.collect(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "HashEE needs head=linear" in capsys.readouterr().out  # the failures are still shown


def test_unreadable_summary_is_reported(sweep):
    (sweep / "8_broken").mkdir()
    (sweep / "8_broken" / "summary.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        df = report.collect(sweep)
    assert len(df) == len(RUNS)


def test_log_to_wandb_skips_when_disabled(sweep, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert report.log_to_wandb(report.collect(sweep), [], group="g") is False
    assert "disabled" in capsys.readouterr().out


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--paper" in text and "raee_table1" in text and "--wandb" in text


# ------------------------------------------------------------------ speed-accuracy curves


def test_dominated_marking_hand_made():
    cost = [6.0, 2.0, 3.0, 2.0, 1.0, np.nan, 1.0]
    value = [0.95, 0.90, 0.90, 0.93, 0.80, 0.99, 0.80]
    # (2, .90) loses to (2, .93); (3, .90) to (2, .93) too; (6, .95) is the only one that accurate; the two
    # (1, .80) tie: neither dominates the other; NaN is never marked and dominates nothing
    assert report.dominated(cost, value).tolist() == [False, True, True, False, False, False, False]
    assert report.dominated([], []).tolist() == []
    with pytest.raises(ValueError, match="same length"):
        report.dominated([1.0], [1.0, 2.0])


def test_token_level_exits_cost_their_flops_in_layers():
    # HashEE runs every example through all L layers on fewer tokens: cost L / FLOPs speed-up, not L
    hashee = summary("hashee", {"hash": "frequency"}, 0.93, float(L), 5.0)
    hashee.update(mean_layers_computed=float(L), flops_speedup=2.0)
    entropy = summary("entropy", {"threshold": 0.4}, 0.92, 4.0, 5.0)
    entropy.update(mean_layers_computed=4.0, flops_speedup=2.0)  # an example-level exit keeps its layers
    old = summary("full", {}, 0.95, float(L), 10.0)  # no mean_layers_computed: the mean exit layer
    df = pd.DataFrame([hashee, entropy, old])
    assert report.cost_column(df).tolist() == pytest.approx([L / 2.0, 4.0, float(L)])
    marked = report.add_pareto(df)
    assert not marked.loc[0, "dominated_layers"], "HashEE at L/2 layer-equivalents is not dominated by the full model"
    assert marked.loc[1, "dominated_layers"], "entropy at 4 layers is less accurate than HashEE at L/2"


def test_oracle_gap_by_hand():
    oracle, full = (0.5, 1.0), (6.0, 0.9)  # box: 5.5 layers x 0.1 accuracy
    # runs at (1, .95) and (3, 1.0): below 1 layer nothing beats the full model (0.1 x 0.5 missed), from 1 to
    # 3 layers 0.95 (0.05 x 2 missed), from 3 on the oracle's accuracy
    assert report.oracle_gap([1.0, 3.0], [0.95, 1.0], oracle, full) == pytest.approx(0.15 / 0.55)
    assert report.oracle_gap([0.5], [1.0], oracle, full) == pytest.approx(0.0)
    assert report.oracle_gap([2.0], [0.85], oracle, full) == pytest.approx(1.0)  # never above the full model
    assert math.isnan(report.oracle_gap([1.0], [0.9], (0.5, 0.9), full))  # an empty box


def curve_summary(method, knobs, accuracy, layers, *, computed=None, calibrated=None, tuned="threshold"):
    s = summary(method, knobs, accuracy, layers, 1.0 + layers)
    s.update(mean_layers_computed=computed if computed is not None else layers, tuned_knob=tuned,
             full_accuracy=0.95, oracle_accuracy=0.99, oracle_mean_exit_layer=0.5)
    if calibrated is not None:
        s["knobs"] = {**knobs, "target": "accuracy", "max_drop": 0.0}
        s["calibration"] = {"knob": tuned, "value": calibrated, "met": True, "split": "validation",
                            "num_examples": 50, "validation": {"accuracy": 0.96, "full_accuracy": 0.95,
                                                               "mean_exit_layer": layers,
                                                               "mean_layers_computed": layers}}
    return s


CURVE_RUNS = {
    "0": curve_summary("full", {}, 0.95, 6.0, tuned=None),
    "1": curve_summary("entropy", {"threshold": 0.2, "min_layer": 1}, 0.95, 3.0),
    "2": curve_summary("entropy", {"threshold": 0.6, "min_layer": 1}, 0.92, 1.5),
    "3": curve_summary("entropy", {"threshold": 0.4, "min_layer": 1}, 0.94, 2.0, calibrated=0.4),
    "4": curve_summary("raee_dynamic", {"aggregator": {"rule": "VotePosterior", "threshold": 0.9}}, 0.96, 1.0,
                       tuned="aggregator.threshold"),
    "5": curve_summary("raee_dynamic", {"aggregator": {"rule": "VotePosterior", "threshold": 0.8}}, 0.95, 0.5,
                       tuned="aggregator.threshold", calibrated=0.8),
    "6": curve_summary("raee_dynamic", {"aggregator": {"rule": "NeighbourVote", "threshold": 0.6}}, 0.93, 0.8,
                       tuned="aggregator.threshold"),
    # keys at layer 2: exits at 0.3 on average, but every example ran the two key layers
    "7": curve_summary("raee", {"aggregator": {"rule": "RobustAggregator", "threshold": 0.5}}, 0.94, 0.3,
                       computed=2.1, tuned="aggregator.threshold"),
    "8": curve_summary("oracle", {}, 0.99, 0.5, tuned=None),
}


def test_curves_dominated_runs_and_the_oracle_gap_of_a_sweep(tmp_path):
    root = tmp_path / "sweep"
    for name, s in CURVE_RUNS.items():
        (root / name).mkdir(parents=True)
        (root / name / "summary.json").write_text(json.dumps(s))
    df = report.add_pareto(report.add_analysis(report.collect(root))).set_index("run_dir")
    # one curve per method and rule; thresholds and the calibration target stay on their curve
    assert df.loc["4", "curve"] == df.loc["5", "curve"] == "raee_dynamic (aggregator.rule=VotePosterior)"
    assert df.loc["6", "curve"] == "raee_dynamic (aggregator.rule=NeighbourVote)"
    assert df.loc["1", "curve"] == df.loc["3", "curve"] == "entropy"
    # the key's layers are the raee run's cost, not its exit layer
    assert df.loc["7", "cost"] == pytest.approx(2.1)
    dominated = set(df.index[df["dominated_layers"]])
    # (0.5, .95) beats full, entropy 0.2 and raee's (2.1, .94); (1, .96) beats entropy 0.4/0.6 and the vote
    assert dominated == {"0", "1", "2", "3", "6", "7"}
    assert not df.loc["8", "dominated_layers"]  # the oracle is never marked
    table = report.curve_table(df.reset_index()).set_index("curve")
    posterior = table.loc["raee_dynamic (aggregator.rule=VotePosterior)"]
    assert posterior["fewest_layers_at_full"] == pytest.approx(0.5)
    assert posterior["best_within_1"] == pytest.approx(0.96)
    # oracle (0.5, .99), full (6, .95): reaches .95 at 0.5 and .96 from 1 -> misses .04 x 0.5 + .03 x 5
    assert posterior["oracle_gap"] == pytest.approx((0.04 * 0.5 + 0.03 * 5) / (5.5 * 0.04))
    assert table.loc["entropy", "oracle_gap"] == pytest.approx(1.0)
    assert "threshold=0.4" in table.loc["entropy", "calibrated_runs"]
    md = report.pareto_markdown(df.reset_index())
    assert "oracle 0.9900 at 0.50 layers" in md and "| raee_dynamic (aggregator.rule=VotePosterior) |" in md


def test_pareto_charts_are_written(reported):
    out, printed = reported
    assert "## Speed-accuracy curves" in printed and "Oracle gap" in (out / "results.md").read_text()
    for png in ("pareto_layers.png", "pareto_speedup.png"):
        data = (out / png).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, png
