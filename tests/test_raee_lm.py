"""+experiment=raee_lm (real LMs, prompt head, every exit + knn) and its comparison with the paper's
decoder rows (stand-in backbones and datasets named, knn as its own row)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from raee.paper_results import compare_gains, compare_with_paper, paper_dataset_for, RAEE_TABLE1
from raee.run import CONF_DIR, run_job
from tests.test_config import compose_cfg
from tests.test_data import write_rotten_tomatoes
from tests.test_report import summary

LM_BACKBONES = ("smollm2", "gemma3_270m")
MISSING_BACKBONES = [b for b in LM_BACKBONES if not (Path(CONF_DIR) / "backbone" / f"{b}.yaml").exists()]


@pytest.mark.parametrize("experiment", ["raee_lm", "raee_lm_keys"])
def test_experiment_sweeps_every_method_with_knn_over_both_lms_and_datasets(experiment):
    from omegaconf import OmegaConf

    sweeper = OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").hydra.sweeper
    params = {k: str(v).split(",") for k, v in sweeper.params.items()}
    # the union sweeper's products (hydra/sweeper=union): every exit and key encoder any of them sweeps
    exits = [e for sweep in sweeper.sweeps for e in str(sweep["exit"]).split(",")]
    encoders = {str(sweep.get("key_encoder")) for sweep in sweeper.sweeps if sweep.get("key_encoder")}
    cfg = compose_cfg([f"+experiment={experiment}", "backbone=tiny_gpt2"])  # the LM configs may not be merged yet
    assert params["backbone"] == list(LM_BACKBONES) and params["data"] == ["rotten_tomatoes", "imdb"]
    if experiment == "raee_lm":
        assert exits == ["full", "raee", "entropy", "patience", "oracle", "knn", "raee_choice"]
        assert cfg.key_encoder._target_ == "raee.keys.SentenceEncoderKeys"
    else:
        assert set(exits) == {"full", "raee_choice", "knn", "raee"} and encoders == {"backbone", "sentence"}
    assert cfg.head._target_ == "raee.heads.PromptHead" and cfg.head.template is None  # the data's default prompt
    assert cfg.head.calibration == "content_free"
    assert cfg.aggregator.threshold == 0.9 and cfg.data.name == "rotten_tomatoes"
    assert (cfg.data.max_train_examples, cfg.data.max_eval_examples) == (1000, 400)
    imdb = compose_cfg([f"+experiment={experiment}", "backbone=tiny_gpt2", "data=imdb", "lm_sizes.imdb.test=50"])
    assert (imdb.data.max_train_examples, imdb.data.max_eval_examples) == (400, 50)


@pytest.mark.skipif(bool(MISSING_BACKBONES), reason=f"conf/backbone/{MISSING_BACKBONES} land from branch lm-backbones")
def test_experiment_composes_with_the_real_lm_backbones():
    for backbone in LM_BACKBONES:
        cfg = compose_cfg(["+experiment=raee_lm", f"backbone={backbone}"])
        assert cfg.backbone.max_length == 128


def test_tiny_raee_lm_job_runs_end_to_end(tmp_path):
    data = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", n=60)
    common = ["+experiment=raee_lm", "backbone=tiny_gpt2", f"data.file={data}", "logger=none",
              "lm_sizes.rotten_tomatoes.db=30", "lm_sizes.rotten_tomatoes.test=12", "trainer.enable_progress_bar=false",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    # knn builds RAEE's database (the prompt head at every layer, sentence keys) and times the full model
    result = run_job(compose_cfg(common + ["exit=knn"]), str(tmp_path / "knn"), multirun=False)
    assert result["method"] == "knn" and result["head"] == "prompt" and result["num_examples"] == 12
    assert result["dataset"] == "rotten_tomatoes" and result["full_accuracy"] is not None
    assert result["knobs"]["key_encoder"]["type"] == "sentence_encoder" and result["mean_exit_layer"] == 0.0


def _lm_rows() -> pd.DataFrame:
    smol, gemma = "HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"  # 6 layers in these fakes
    rows = [summary("full", {}, 0.66, 6.0, 10.0, dataset="rotten_tomatoes", backbone=smol, head="prompt"),
            summary("raee", {"k": 12}, 0.70, 3.4, 6.0, dataset="rotten_tomatoes", backbone=smol, head="prompt"),
            summary("knn", {"k": 12}, 0.72, 0.0, 1.0, dataset="rotten_tomatoes", backbone=smol, head="prompt"),
            summary("entropy", {"threshold": 0.3}, 0.60, 1.0, 3.0, dataset="rotten_tomatoes", backbone=smol,
                    head="prompt"),
            summary("full", {}, 0.55, 6.0, 10.0, dataset="imdb", backbone=gemma, head="prompt"),
            summary("raee", {"k": 12}, 0.61, 3.0, 6.0, dataset="imdb", backbone=gemma, head="prompt")]
    df = pd.DataFrame(rows)
    df["run_dir"] = [str(i) for i in range(len(df))]
    return df


def test_paper_comparison_names_the_stand_ins_and_shows_knn():
    assert paper_dataset_for("rotten_tomatoes", RAEE_TABLE1) == "MR" and paper_dataset_for("imdb", RAEE_TABLE1) is None
    cmp = compare_with_paper(_lm_rows(), "raee_table1")
    ours = cmp[cmp["dataset"] != ""].set_index(["method", "dataset"])
    raee = ours.loc[("raee", "rotten_tomatoes")]
    assert raee["paper_method"] == "RAEE" and raee["paper_backbone"] == "Llama-3-8B"
    assert raee["paper_dataset"] == "MR" and raee["paper_value"] == pytest.approx(66.45)
    assert raee["measured_value"] == pytest.approx(70.0) and raee["our_gain_vs_full"] == pytest.approx(4.0)
    assert raee["status"].startswith("compared (dataset stand-in: Rotten Tomatoes")
    assert "SmolLM2-135M-Instruct" in raee["backbone_note"] and "stands in for Llama-3-8B" in raee["backbone_note"]
    full = ours.loc[("full", "rotten_tomatoes")]  # the paper's Llama full-model ablation has no MR column
    assert full["paper_backbone"] == "Llama-3-8B" and math.isnan(full["paper_value"])
    assert full["status"] == "no paper number: the paper reports full model (zero-shot) on Llama-3-8B without MR"
    knn = ours.loc[("knn", "rotten_tomatoes")]
    assert knn["paper_method"].startswith("kNN label vote") and math.isnan(knn["paper_value"])
    assert knn["status"].startswith("no paper number: kNN label vote") and knn["our_gain_vs_full"] == pytest.approx(6)
    entropy = ours.loc[("entropy", "rotten_tomatoes")]
    assert entropy["paper_backbone"] == "RoBERTa-large"
    assert "no DeeBERT row on Llama-3-8B" in entropy["backbone_note"]
    gemma = ours.loc[("raee", "imdb")]
    assert gemma["paper_backbone"] == "Llama-3-8B" and "Gemma-7B" in gemma["backbone_note"]
    assert "IMDB has no column in the paper's table" in gemma["status"] and math.isnan(gemma["paper_value"])
    not_run = cmp[cmp["status"].str.startswith("not run")]
    assert not ((not_run["paper_method"] == "RAEE") & (not_run["paper_backbone"] == "Llama-3-8B")
                & (not_run["paper_dataset"] == "MR")).any()  # MR is matched through its stand-in
    gains = compare_gains(_lm_rows(), "raee_table1").set_index(["method", "dataset"])
    assert gains.loc[("knn", "rotten_tomatoes"), "our_gain_vs_full"] == pytest.approx(6.0)
    assert math.isnan(gains.loc[("knn", "rotten_tomatoes"), "paper_mean_gain_vs_full"])
    assert gains.loc[("raee", "rotten_tomatoes"), "paper_backbone"] == "Llama-3-8B"


def test_paper_comparison_markdown_shows_knn_and_the_substitutions():
    from raee.report import paper_comparison_markdown

    df = _lm_rows()
    md = paper_comparison_markdown(compare_with_paper(df, "raee_table1"), compare_gains(df, "raee_table1"),
                                   "raee_table1")
    assert "kNN label vote (retrieval-only baseline; not in the paper)" in md
    assert "dataset stand-in: Rotten Tomatoes" in md and "IMDB has no column" in md and "Gemma-7B" in md
