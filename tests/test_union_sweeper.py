"""hydra/sweeper=union: the union of several products, duplicates once; every job of +experiment=pareto composes."""

from __future__ import annotations

import types

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from raee.run import CONF_DIR


def union_sweeper(**kwargs):
    """The sweeper class as Hydra discovers it (its plugin scan executes plugin modules afresh, so a class
    imported directly could derive from another copy of Hydra's BasicSweeper)."""
    from hydra.core.plugins import Plugins

    classes = Plugins.instance().class_name_to_class
    sweeper = classes["hydra_plugins.raee_sweepers.union_sweeper.UnionSweeper"](**kwargs)
    sweeper.hydra_context = types.SimpleNamespace(config_loader=None)
    return sweeper


def jobs(params, sweeps, arguments=()):
    sweeper = union_sweeper(params=params, sweeps=sweeps)
    sweeper._arguments = list(arguments)
    (batch,) = sweeper.split_arguments([], None)
    return [sorted(job) for job in batch]


def test_union_of_products_with_shared_params_and_command_line():
    got = jobs({"data": "a,b"}, [{"exit": "full"}, {"exit": "entropy", "exit.threshold": "0.1,0.2"},
                                 {"exit": "full"}, {"data": "a", "exit": "oracle"}], ["seed=1"])
    want = [["data=a", "exit=full", "seed=1"], ["data=b", "exit=full", "seed=1"],
            ["data=a", "exit.threshold=0.1", "exit=entropy", "seed=1"],
            ["data=a", "exit.threshold=0.2", "exit=entropy", "seed=1"],
            ["data=b", "exit.threshold=0.1", "exit=entropy", "seed=1"],
            ["data=b", "exit.threshold=0.2", "exit=entropy", "seed=1"],
            ["data=a", "exit=oracle", "seed=1"]]  # the repeated full sweep adds nothing; data=a wins over a,b
    assert got == want
    # the command line wins over a sweep's own value
    assert jobs({}, [{"exit": "entropy", "exit.threshold": "0.1,0.2"}], ["exit.threshold=0.5"]) == [
        ["exit.threshold=0.5", "exit=entropy"]]
    # batches of max_batch_size jobs
    sweeper = union_sweeper(max_batch_size=2, sweeps=[{"exit": "full,oracle,entropy"}])
    assert [len(b) for b in sweeper.split_arguments([], 2)] == [2, 1]


def compose_jobs(experiment: str, all_jobs: list[list[str]]):
    """Each job's composed config. Hydra composes once per choice of config groups (the slow part); a job's
    dotted values (exit.threshold=0.3) are then set on a copy, as its overrides would."""
    import yaml

    composed = {}
    for job in all_jobs:
        groups = tuple(sorted(o for o in job if "." not in o.split("=")[0]))
        if groups not in composed:
            composed[groups] = compose(config_name="config", overrides=[f"+experiment={experiment}", *groups])
        cfg = composed[groups].copy()
        for item in job:
            key, value = item.split("=", 1)
            if "." in key:
                OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
        yield job, cfg


@pytest.mark.parametrize("experiment,size,calibrated", [("pareto", (40, 70), 20), ("pareto_keys", (10, 10), 8)])
def test_every_job_of_the_pareto_experiments_composes_and_builds_its_exit(experiment, size, calibrated):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("UnionSweeper")
        all_jobs = jobs(OmegaConf.to_container(sweeper.params), OmegaConf.to_container(sweeper.sweeps))
        assert size[0] <= len(all_jobs) <= size[1], "keep the sweep sized for ~30 minutes on 2 cores"
        methods, count = set(), 0
        for job, job_cfg in compose_jobs(experiment, all_jobs):
            exit_cfg = OmegaConf.to_container(job_cfg.exit, resolve=True)
            if "key_encoder" in exit_cfg:  # no model load here: the key encoder is checked by its type only
                assert exit_cfg["key_encoder"]["_target_"].startswith("raee.keys.")
                exit_cfg["key_encoder"] = {"_target_": "raee.keys.BackboneKeys"}
            strategy = instantiate(exit_cfg)
            strategy.validate(6)
            methods.add(strategy.name)
            count += bool(getattr(getattr(strategy, "calibration", None), "active", False))
            assert job_cfg.compare_oracle is False, job
            # the README's tables were measured on these sizes; the data config's default is every example
            sizes = (2000, 500) if job_cfg.data.name == "rotten_tomatoes" else (None, None)
            assert (job_cfg.data.max_train_examples, job_cfg.data.max_eval_examples) == sizes, job
    assert count == calibrated
    if experiment == "pareto":
        assert methods == {"full", "oracle", "entropy", "patience", "raee", "raee_dynamic", "raee_choice", "knn"}


def test_the_keys_sweep_of_real_lms_has_every_key_setting_and_batch_size():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=raee_lm_keys"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    all_jobs = [dict(o.split("=", 1) for o in job) for job in
                jobs(OmegaConf.to_container(sweeper.params), OmegaConf.to_container(sweeper.sweeps))]
    assert len(all_jobs) == 138 and cfg.reuse_full_reference
    keys = {(j["backbone"], j.get("key_encoder"), j.get("key_encoder.layer")) for j in all_jobs if j["exit"] == "knn"}
    assert {k for k in keys if k[0] == "smollm2"} == {("smollm2", "sentence", None)} | {
        ("smollm2", "backbone", layer) for layer in ("0", "1", "2", "4", "8", "12")}
    assert {k for k in keys if k[0] == "gemma3_270m"} == {("gemma3_270m", "sentence", None)} | {
        ("gemma3_270m", "backbone", layer) for layer in ("0", "1", "2", "4", "8")}
    for job in all_jobs:
        batches = {"raee": {"32"}}.get(job["exit"], {"1", "32"})
        assert job["data.eval_batch_size"] in batches, job
        if job["exit"] in ("raee_choice", "knn"):
            assert job["aggregator"] == "vote_posterior", job  # raee_choice's rule, not the experiment's paper rule
        if job.get("key_encoder") == "backbone":
            assert job["key_encoder.pooling"] == "auto", job
