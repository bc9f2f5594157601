"""Hydra entry point: ``python -m raee.run`` (or ``raee``). ``--help`` lists the config groups.

Composes conf/config.yaml, instantiates plain objects and hands them to
:func:`raee.experiment.run_experiment`. Only this file (and the other entry points) reads
Hydra's runtime state; the library takes the output directory as an argument.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("raee")


def build_objects(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate backbone, head, data module and exit strategy from a composed config."""
    from hydra.utils import instantiate

    return {
        "backbone": instantiate(cfg.backbone),
        "head": instantiate(cfg.head),
        "datamodule": instantiate(cfg.data),
        "strategy": instantiate(cfg.exit),
    }


def make_logger(cfg: DictConfig, output_dir: str, run_name: str, group: str | None = None) -> Any:
    """The Lightning logger from ``cfg.logger`` (None when logger=none); runs of one sweep share ``group``."""
    if not cfg.get("logger"):
        return None
    from hydra.utils import instantiate

    os.environ.setdefault("WANDB_MODE", str(cfg.logger.get("mode", "offline")))
    extra = {"group": group} if group and not cfg.logger.get("group") else {}
    logger = instantiate(cfg.logger, save_dir=output_dir, name=run_name, **extra)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def log_summary(logger: Any, summary: dict[str, Any]) -> None:
    """Send the summary's numbers and the exit-layer histogram to the experiment logger."""
    if logger is None:
        return
    numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
    logger.log_metrics(numbers)
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "log"):
        import wandb

        counts = summary["exit_layer_counts"]
        table = wandb.Table(data=[[i, c] for i, c in enumerate(counts)], columns=["exit_layer", "count"])
        experiment.log({"exit_layer_histogram": wandb.plot.bar(table, "exit_layer", "count",
                                                                 title="examples per exit layer")})
        experiment.summary.update({k: v for k, v in numbers.items()})
    if hasattr(logger, "finalize"):
        logger.finalize("success")


def run(cfg: DictConfig, output_dir: str, group: str | None = None) -> dict[str, Any]:
    """Run the composed config, write results to ``output_dir`` and return the summary."""
    from raee.experiment import format_summary, run_experiment

    objs = build_objects(cfg)
    run_name = cfg.get("run_name") or objs["strategy"].name
    logger = make_logger(cfg, output_dir, run_name, group)
    summary = run_experiment(
        objs["backbone"], objs["head"], objs["strategy"], objs["datamodule"], output_dir=output_dir,
        run_name=run_name, seed=int(cfg.seed), compare_full=bool(cfg.compare_full),
        compare_oracle=bool(cfg.get("compare_oracle", False)), cache_dir=cfg.paths.cache_dir,
        trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True), logger=logger,
        warmup_batches=int(cfg.warmup_batches), eval_split=str(cfg.get("eval_split", "test")),
        regression_tolerance=float(cfg.get("regression_tolerance", 0.5)))
    log_summary(logger, summary)
    print(format_summary(summary))
    print(f"results: {output_dir}/summary.json, {output_dir}/predictions.csv")
    return summary


def run_job(cfg: DictConfig, output_dir: str, multirun: bool, overrides: list[str] | None = None,
            group: str | None = None) -> dict[str, Any] | None:
    """One job of a (multi)run: skip it if its summary exists (unless ``redo``); in a multirun, record a
    failure in error.json and carry on with the other jobs instead of stopping the sweep."""
    import json
    import traceback

    from raee.atomic import atomic_write_text

    summary_path = Path(output_dir) / "summary.json"
    if summary_path.exists() and not cfg.get("redo", False):
        print(f"skipping: {summary_path} exists (pass redo=true to run it again)")
        return json.loads(summary_path.read_text())
    try:
        summary = run(cfg, output_dir, group)
    except Exception as err:  # noqa: BLE001 - a sweep must survive one failed job
        if not multirun:
            raise
        log.error("run failed: %s", err)
        atomic_write_text(Path(output_dir) / "error.json", json.dumps(
            {"status": "failed", "error": f"{type(err).__name__}: {err}", "overrides": overrides or [],
             "traceback": traceback.format_exc()}, indent=2))
        return None
    (Path(output_dir) / "error.json").unlink(missing_ok=True)
    return summary


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).as_posix().replace("/", "_").strip("_") if multirun else None
    run_job(cfg, hc.runtime.output_dir, multirun=multirun, overrides=list(hc.overrides.task), group=group)


if __name__ == "__main__":
    main()
