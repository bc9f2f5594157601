"""Every config group composes with the Hydra compose API, and a tiny run goes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from raee.errors import UserError
from raee.run import CONF_DIR, job_dirname, missing_plugin, objective_values, run_job

#: the app's config groups (conf/hydra/ holds Hydra's own groups; __pycache__ is no group)
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name[0] not in "_." and p.name != "hydra")
#: groups that are not in the defaults list: selected with +group=option
APPENDED = ("experiment", "hparams_search")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_expected_groups_exist():
    for group in ("backbone", "head", "data", "exit", "retriever", "aggregator", "logger", "trainer"):
        assert group in GROUPS, f"conf/{group}/ is missing"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[optuna]'")
    if group in APPENDED:
        cfg = compose_cfg([f"+{group}={option}"])
    else:
        cfg = compose_cfg([f"{group}={option}"])
    # resolves (except values a user must fill in: ???)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["seed"] == 42
    if group not in (*APPENDED, "logger"):
        node = cfg[group]
        assert node is None or "_target_" in node or group == "trainer", f"{group}/{option} has no _target_"


TINY = ["backbone=tiny_bert", "data=bbcnews_small", "logger=none", "trainer.enable_progress_bar=false",
        "data.max_train_examples=60", "data.max_eval_examples=40"]


def test_tiny_run_writes_summary_and_predictions(tmp_path):
    cfg = compose_cfg(TINY + ["exit=fixed", "exit.layer=2", f"paths.cache_dir={tmp_path / 'cache'}"])
    out = tmp_path / "run"
    summary = run_job(cfg, str(out), multirun=False)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    assert saved["method"] == "fixed" and saved["knobs"] == {"layer": 2}
    assert saved["mean_exit_layer"] == 2.0 and saved["exit_layer_counts"][2] == saved["num_examples"]
    assert saved["full_wall_time_s"] > 0 and saved["wall_speedup"] > 0
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "index,label,prediction,exit_layer,confidence"
    assert len(lines) == saved["num_examples"] + 1


def test_finished_job_is_skipped_and_failed_job_is_recorded(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"method": "done-before"}))
    cfg = compose_cfg(TINY + ["exit=full"])
    assert run_job(cfg, str(out), multirun=True)["method"] == "done-before"
    bad = compose_cfg(TINY + ["exit=fixed", "exit.layer=99"])
    assert run_job(bad, str(tmp_path / "bad"), multirun=True, overrides=["exit.layer=99"]) is None
    error = json.loads((tmp_path / "bad" / "error.json").read_text())
    assert error["status"] == "failed" and "outside 0..4" in error["error"]
    with pytest.raises(ValueError, match="outside 0..4"):
        run_job(bad, str(tmp_path / "bad2"), multirun=False)


def test_build_db_writes_the_database_exit_raee_then_uses(tmp_path):
    from raee.build_db import build

    db_dir = tmp_path / "db"
    cfg = compose_cfg(TINY + [f"db.dir={db_dir}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert build(cfg) == str(db_dir)
    meta = json.loads((db_dir / "meta.json").read_text())
    assert meta["count"] == 60 and meta["num_layers"] == 4
    summary = run_job(compose_cfg(TINY + ["exit=raee", f"db.dir={db_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]),
                      str(tmp_path / "run"), multirun=False)
    assert summary["method"] == "raee" and summary["retrieval_time_s"] > 0


def test_configs_are_the_package_data():
    """raee/conf (what the installed package reads) is the repository's conf/ (the source of truth)."""
    assert Path(CONF_DIR).resolve() == (Path(__file__).resolve().parent.parent / "conf").resolve()
    assert (Path(CONF_DIR) / "config.yaml").is_file() and (Path(CONF_DIR) / "__init__.py").is_file()


def test_job_directory_names_are_one_level_readable_and_unique():
    assert job_dirname(["exit=entropy", "exit.threshold=0.3"]) == "exit.threshold=0.3,exit=entropy"
    with_path = job_dirname(["data.file=/data/sets/x.csv", "exit=full"])
    assert with_path.startswith("data.file=x.csv,exit=full~") and "/" not in with_path
    # the same last part in another folder is another job directory
    assert with_path != job_dirname(["data.file=/other/x.csv", "exit=full"])
    assert job_dirname(["data.file=C:\\data\\x.csv"]).startswith("data.file=x.csv~")
    # Optuna's floats are rounded for reading, hashed for uniqueness
    optuna = job_dirname(["exit.threshold=0.6055187889673064"])
    assert optuna.startswith("exit.threshold=0.6055~") and optuna != job_dirname(["exit.threshold=0.6055187889"])
    long = job_dirname([f"x{i}=value{i}" for i in range(40)])
    assert len(long) <= 210 and "~" in long
    assert job_dirname(["+experiment=compare_all", "redo=true", "exit=full"], ["experiment", "redo"]) == "exit=full"
    assert job_dirname(["data.name='my data'"]).startswith("data.name=my_data~")


def test_sweep_and_run_directories_use_the_resolver():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=csv", "data.file=/abs/path/train.csv"],
                      return_hydra_config=True)
    cfg.hydra.job.num = 3
    subdir = cfg.hydra.sweep.subdir
    assert subdir.startswith("3_data.file=train.csv,data=csv~") and "/" not in subdir
    # a single run's directory carries the same name: two runs started in the same second stay apart
    assert Path(cfg.hydra.run.dir).name.split("_", 1)[1] == subdir.split("_", 1)[1]


def test_objectives_for_a_search_sweeper():
    summary = {"accuracy": 0.9, "mean_exit_layer": 2.5, "wall_speedup": None}
    assert objective_values(summary, ["accuracy", "mean_exit_layer"]) == (0.9, 2.5)
    assert objective_values(None, ["accuracy"]) is None  # a failed job: the sweeper records a failed trial
    assert objective_values(summary, None) is None
    values = objective_values(summary, ["wall_speedup"])
    assert values is not None and values[0] != values[0]  # NaN: not measured
    with pytest.raises(UserError, match="'acc'.*accuracy"):
        objective_values(summary, ["acc"])


def test_a_missing_launcher_plugin_names_the_extra(monkeypatch):
    from raee import run

    # as where no Hydra plugin is installed: not even the hydra_plugins namespace exists
    for option, (module, extra) in list(run.PLUGINS.items()):
        monkeypatch.setitem(run.PLUGINS, option, (module.replace("hydra_plugins", "no_such_namespace"), extra))
    assert "pip install 'raee[launchers]'" in missing_plugin(["-m", "hydra/launcher=joblib", "exit=full"])
    assert "pip install 'raee[optuna]'" in missing_plugin(["+hparams_search=raee_optuna"])
    assert missing_plugin(["exit=full", "hydra/launcher=basic"]) is None


def test_consecutive_jobs_in_one_process_get_their_own_wandb_runs(tmp_path, monkeypatch):
    """A joblib worker runs several jobs of a sweep in one process: each must log to its own run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in TINY if o != "logger=none"] + ["logger=wandb", "exit=full", "compare_oracle=false",
                                                            f"paths.cache_dir={tmp_path / 'cache'}"]
    for job in ("0_first", "1_second"):
        assert run_job(compose_cfg(overrides), str(tmp_path / job), multirun=True) is not None
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1, f"{job} has no wandb run of its own"


def test_hashee_defaults_are_the_setting_the_readme_measured_within_one_point():
    """`exit=hashee` with no knobs is `hash=random last_layer=4 finetune.max_epochs=10` on MiniLM's 6 layers (the
    README's HashEE acceptance rows), on every Rotten Tomatoes example, with the same budget as PABEE's fine-tune."""
    from hydra.utils import instantiate

    default = compose_cfg(["exit=hashee", "data=rotten_tomatoes"])
    measured = compose_cfg(["exit=hashee", "data=rotten_tomatoes", "exit.hash=random", "exit.last_layer=4",
                            "finetune.max_epochs=10", "data.max_train_examples=null", "data.max_eval_examples=null"])
    assert default.data.max_train_examples is None and default.data.max_eval_examples is None
    assert default.exit.max_epochs == default.head.max_epochs == 10, "HashEE and the linear head share one budget"
    strategies = [instantiate(OmegaConf.to_container(cfg.exit, resolve=True)) for cfg in (default, measured)]
    for strategy in strategies:
        strategy.validate(6)
    assert strategies[0].last_layer == 4
    # the same settings, so the same fine-tune cache key: the default run reloads the measured checkpoint
    assert strategies[0].training_settings() == strategies[1].training_settings()
