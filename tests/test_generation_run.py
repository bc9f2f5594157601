"""A generation run end to end through raee.run (tiny decoders), its outputs, the refusals of bad input, and the
calibration of the confidence threshold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from raee.generation import ConfidenceGeneration, LMHead
from raee.generation import finetuning
from raee.run import CONF_DIR, run_job

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny decoding: one thread (conftest)

QUICK = ["logger=none", "data.max_new_tokens=4", "warmup_batches=0"]


def pairs_csv(tmp_path: Path, n: int = 30) -> Path:
    words = ["markets", "rain", "goal", "film", "vote", "phone"]
    frame = pd.DataFrame({"article": [f"the {words[i % 6]} story number {i} was told again today" for i in range(n)],
                          "headline": [f"{words[i % 6]} news {i}" for i in range(n)]})
    path = tmp_path / "pairs.csv"
    frame.to_csv(path, index=False)
    return path


def csv_overrides(tmp_path: Path, path: Path | None = None) -> list[str]:
    path = path or pairs_csv(tmp_path)
    return ["data=csv", "data.task_type=generation", f"data.file={path}", "data.train_file=null",
            "data.text_column=article", "data.target_column=headline", "data.name=toy", "head=lm",
            "backbone=tiny_gpt2", "data.eval_batch_size=3", f"paths.cache_dir={tmp_path / 'cache'}", *QUICK]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_csv_generation_run_writes_summary_and_predictions(tmp_path, capsys):
    out = tmp_path / "run"
    summary = run_job(compose_cfg(csv_overrides(tmp_path) + ["exit=fixed", "exit.layer=2"]), str(out),
                      multirun=False)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["task_type"] == "generation" and saved["method"] == "fixed"
    assert saved["task_metric"] == "rougeL" and 0 <= saved["rougeL"] <= 1
    assert saved["mean_exit_layer"] == 2.0 and saved["flops_speedup"] > 1
    assert saved["full_tokens_per_s"] > 0 and saved["wall_speedup"] > 0
    assert saved["prefill_flops_per_token"] > 0 and saved["decode_flops_per_token"] > 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "reference", "generated", "exit_layers", "num_tokens", "rougeL", "exact_match"]
    assert len(rows) == saved["num_examples"]
    assert all(set(r["exit_layers"].split()) == {"2"} and len(r["exit_layers"].split()) == int(r["num_tokens"])
               for r in rows)
    printed = capsys.readouterr().out
    assert "ROUGE-L" in printed and "tokens/s" in printed


def test_bbcnews_headlines_run_prints_rouge_and_tokens_per_second(tmp_path, capsys):
    cfg = compose_cfg(["data=bbcnews_headlines", "backbone=tiny_gemma3", "exit=full", "data.max_eval_examples=2",
                       "data.max_source_tokens=16", f"paths.cache_dir={tmp_path / 'cache'}", *QUICK])
    summary = run_job(cfg, str(tmp_path / "run"), multirun=False)
    assert summary["num_examples"] == 2 and summary["wall_speedup"] == pytest.approx(1.0)
    assert summary["prompt"]["max_source_tokens"] == 16 and summary["max_new_tokens"] == 4
    printed = capsys.readouterr().out
    assert "ROUGE-L:" in printed and "tokens/s:" in printed


def test_hashee_runs_on_a_generation_task_with_its_own_config(tmp_path):
    """exit=hashee selects head=linear for classification; on a generation task it reads the LM head."""
    cfg = compose_cfg(csv_overrides(tmp_path) + ["exit=hashee", "exit.max_epochs=0", "exit.last_layer=2"])
    summary = run_job(cfg, str(tmp_path / "run"), multirun=False)
    assert summary["method"] == "hashee" and summary["knobs"]["tokens"] == "all"
    assert summary["prompt_mean_exit_layer"] < 3 and summary["prefill_flops_speedup"] > 1


def test_fine_tunes_need_the_trainer(tmp_path):
    cfg = compose_cfg(csv_overrides(tmp_path) + ["exit=hashee", "exit.max_epochs=1"])
    if finetuning.find_trainer() is None:
        with pytest.raises(ValueError, match="exit.max_epochs=0"):
            run_job(cfg, str(tmp_path / "run"), multirun=False)
    calls = []

    def fake_trainer(backbone, head, datamodule, *, loss, token_exits, settings, cache_dir, progress):
        calls.append((loss, settings["hash"], settings["tokens"], token_exits is not None))
        return {"by": "fake", "epochs": settings["max_epochs"], "steps": 3, "lr": settings["lr"], "seed": 0}

    finetuning.use_trainer(fake_trainer)
    try:
        summary = run_job(cfg, str(tmp_path / "run2"), multirun=False)
    finally:
        finetuning.use_trainer(None)
    assert calls == [("token_exits", "random", "all", True)] and summary["budget"]["by"] == "fake"


@pytest.mark.parametrize("overrides, match", [
    (["exit=entropy"], "exit=entropy cannot generate text.*full, fixed, hashee, confidence"),
    (["exit=patience"], "exit=patience cannot generate text"),
    (["exit=raee"], "exit=raee cannot generate text"),
    (["exit=knn"], "exit=knn cannot generate text"),
    (["exit=full", "head=prototype"], "head=prototype classifies and cannot generate text.*head=lm"),
    (["exit=full", "head=prompt"], "head=prompt classifies and cannot generate text"),
    (["exit=full", "backbone=minilm"], "no language-model head"),
    (["exit=full", "data.max_new_tokens=0"], "max_new_tokens=0 must be a positive"),
    (["exit=full", "data.max_new_tokens=-2"], "max_new_tokens=-2 must be a positive"),
    (["exit=full", "data.target_column=title"], "target_column='title' is not a column"),
])
def test_bad_input_is_refused_and_writes_nothing(tmp_path, overrides, match):
    cfg = compose_cfg(csv_overrides(tmp_path) + overrides)
    out = tmp_path / "run"
    with pytest.raises(Exception, match=match):  # UserError, or Hydra's wrapper around one from a constructor
        run_job(cfg, str(out), multirun=False)
    assert not (out / "summary.json").exists() and not (out / "predictions.csv").exists()


def test_empty_targets_and_sources_are_refused_before_decoding(tmp_path):
    frame = pd.read_csv(pairs_csv(tmp_path))
    frame.loc[4, "headline"] = ""
    path = tmp_path / "holes.csv"
    frame.to_csv(path, index=False)
    cfg = compose_cfg(csv_overrides(tmp_path, path) + ["exit=full"])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="target column 'headline'.*missing or empty"):
        run_job(cfg, str(out), multirun=False)
    assert not out.exists() or not any(out.iterdir())


def test_confidence_is_refused_on_classification(tmp_path):
    cfg = compose_cfg(["backbone=tiny_bert", "data=bbcnews_small", "exit=confidence", "logger=none"])
    with pytest.raises(ValueError, match="exit=confidence is a generation method"):
        run_job(cfg, str(tmp_path / "run"), multirun=False)


def test_confidence_threshold_is_calibrated_on_validation(tmp_path):
    cfg = compose_cfg(csv_overrides(tmp_path) + ["exit=confidence", "exit.max_epochs=0", "exit.target=accuracy",
                                                 "exit.max_drop=0.0", "exit.grid=[1.0,0.5,0.0]",
                                                 "exit.calibration_examples=3"])
    backbone, datamodule = instantiate(cfg.backbone), instantiate(cfg.data)
    head = instantiate(cfg.head)
    head.bind(backbone, datamodule)
    strategy = instantiate(cfg.exit)
    result = strategy.calibrate(backbone, head, datamodule, cache_dir=tmp_path / "cache", progress=False)
    assert [p["value"] for p in result["curve"]] == [1.0, 0.5, 0.0] and result["num_examples"] == 3
    # threshold 1.0 never exits, so it always keeps the full model's ROUGE-L: a setting that meets the target exists
    assert result["met"] and strategy.threshold == result["value"]
    assert result["curve"][0]["mean_exit_layer"] == backbone.num_layers
    assert result["curve"][-1]["mean_exit_layer"] == 1.0
    again = ConfidenceGeneration(target="accuracy", max_drop=0.0, grid=[1.0, 0.5, 0.0], calibration_examples=3)
    assert again.calibrate(backbone, head, datamodule, cache_dir=tmp_path / "cache", progress=False)["cached"]


def test_lm_head_builds_its_prompt_from_the_data_config(tiny_backbones):
    head = LMHead(dataset_prompts={"generation": {"template": "Text: {text}\nTitle:"}})
    head.bind(tiny_backbones["gpt2"])
    assert head.prompt_text("abc") == "Text: abc\nTitle:"


def test_confidence_calibration_falls_back_to_no_exit_when_no_threshold_is_good_enough(tmp_path, monkeypatch):
    """Every grid threshold loses more than max_drop on validation: the calibrated choice is the full model
    (no exit, no LM-head checks), not the least bad threshold."""
    import types

    import raee.generation.evaluate as evaluate

    def fake_decode_split(backbone, head, strategy, datamodule, split, **kwargs):
        assert split == "validation"  # calibration never reads test
        exits = isinstance(strategy, ConfidenceGeneration)
        return types.SimpleNamespace(stats={"rougeL": 0.05 if exits else 0.30, "num_examples": 3,
                                            "mean_exit_layer": 1.0 if exits else 4.0,
                                            "flops_speedup": 4.0 if exits else 1.0})

    monkeypatch.setattr(evaluate, "decode_split", fake_decode_split)
    cfg = compose_cfg(csv_overrides(tmp_path) + ["exit=confidence", "exit.max_epochs=0"])
    backbone, datamodule = instantiate(cfg.backbone), instantiate(cfg.data)
    head = instantiate(cfg.head)
    head.bind(backbone, datamodule)
    strategy = ConfidenceGeneration(target="accuracy", max_drop=0.01, grid=[0.9, 0.5], calibration_examples=3)
    strategy.prepare(backbone, head)
    with pytest.warns(UserWarning, match="the calibrated choice is no exit"):
        result = strategy.calibrate(backbone, head, datamodule, cache_dir=tmp_path / "cache", progress=False)
    assert result["value"] is None and [p["value"] for p in result["curve"]] == [0.9, 0.5]
    assert strategy.knobs()["threshold"] is None
    assert not any(strategy.checks(layer) for layer in range(1, backbone.num_layers + 1))
    with pytest.warns(UserWarning, match="no exit"):  # the cached choice reads back the same
        strategy.calibrate(backbone, head, datamodule, cache_dir=tmp_path / "cache", progress=False)
    assert strategy.knobs()["threshold"] is None
