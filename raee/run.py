"""Hydra entry point: ``python -m raee.run`` (or ``raee``). ``--help`` lists the config groups.

Composes conf/config.yaml, instantiates plain objects and hands them to
:func:`raee.experiment.run_experiment`. Only this file (and the other entry points) reads
Hydra's runtime state; the library takes the output directory as an argument.

The configs are the package's ``raee/conf`` (in the repository a link to the top-level ``conf/``,
copied into the wheel), so the installed ``raee`` command finds them from any directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from raee.cli import fail, user_error, user_errors, user_message
from raee.errors import UserError


def _conf_dir() -> str:
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "config.yaml").is_file():
        return str(packaged)
    # a checkout whose file system kept raee/conf as a plain file instead of a link to ../conf
    return str(Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = _conf_dir()
log = logging.getLogger("raee")

# ---------------------------------------------------------------------------------- job directories

#: longest job directory name before it is cut (file systems allow 255 bytes), longest value kept whole
MAX_DIRNAME, MAX_VALUE = 200, 40
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,@~\[\]-]+")
_LONG_FLOAT = re.compile(r"-?\d+\.\d{5,}(e[-+]?\d+)?")


def _readable_value(value: str) -> str:
    """A path becomes its last part ('/data/x.csv' -> 'x.csv'), a float from a search 4 significant
    digits, a long value its start; characters a directory name should not hold become '_'."""
    value = value.strip().strip("'\"")
    if "/" in value or "\\" in value:
        value = re.split(r"[/\\]+", value.rstrip("/\\"))[-1] or "root"
    elif _LONG_FLOAT.fullmatch(value):
        value = f"{float(value):.4g}"
    elif len(value) > MAX_VALUE:
        value = value[:MAX_VALUE]
    return _UNSAFE.sub("_", value)


def job_dirname(task_overrides: Sequence[str], exclude_keys: Sequence[str] = (), prefix: str = "") -> str:
    """One readable directory name for a sweep job: its overrides, sorted, 'key=value' joined by ','.
    Paths are shortened to their last part, search floats rounded, long names cut; whenever anything
    was shortened, '~' and a hash of the full overrides keep the name unique. Never contains '/', so
    every job directory sits directly under the sweep directory; the full overrides stay in the job's
    .hydra/overrides.yaml. ``prefix`` goes in front of a non-empty name. Registered as the resolver
    ``raee.job_dirname`` (conf/config.yaml)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    exclude, full, short = set(exclude_keys), [], []
    for override in overrides:
        if override.key_or_group in exclude:
            continue
        key, sep, value = override.input_line.partition("=")
        full.append(override.input_line)
        short.append(_UNSAFE.sub("_", key) + (f"={_readable_value(value)}" if sep else ""))
    name = ",".join(sorted(short))
    exact = ",".join(sorted(full))
    if name != exact or len(name) > MAX_DIRNAME:
        digest = hashlib.sha256(exact.encode()).hexdigest()[:8]
        name = f"{name[:MAX_DIRNAME]}~{digest}"
    return f"{prefix}{name}" if name else ""


OmegaConf.register_new_resolver("raee.job_dirname", job_dirname, replace=True)


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

    from raee.logs import level_number

    os.environ.setdefault("WANDB_MODE", str(cfg.logger.get("mode", "offline")))
    if level_number(cfg.get("log_level", "WARNING")) >= logging.WARNING:
        os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banner; where the run went is printed at the end
    extra = {"group": group} if group and not cfg.logger.get("group") else {}
    logger = instantiate(cfg.logger, save_dir=output_dir, name=run_name, **extra)
    # Lightning always passes anonymous=None, which wandb (0.19+) answers with a deprecation warning per run
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def logger_location(logger: Any) -> str | None:
    """One line saying where a wandb run went (offline: its directory and how to upload it)."""
    run = getattr(logger, "experiment", None) if logger is not None else None
    settings = getattr(run, "settings", None)
    if settings is None or getattr(run, "disabled", False) or getattr(settings, "mode", None) == "disabled":
        return None
    if getattr(run, "offline", False):
        return f"wandb: offline run in {settings.sync_dir} (upload it with: wandb sync {settings.sync_dir})"
    return f"wandb: {run.url}" if getattr(run, "url", None) else None


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


def close_logger(logger: Any, status: str) -> None:
    """Finalize the logger and end its wandb run: a worker process that runs the next job of a sweep
    (joblib reuses them) would otherwise log into this job's run."""
    if logger is None:
        return
    if hasattr(logger, "finalize"):
        logger.finalize(status)
    run = getattr(logger, "_experiment", None)  # only a run that was started; .experiment would start one
    if run is not None and hasattr(run, "finish"):
        run.finish(exit_code=0 if status == "success" else 1)


def run(cfg: DictConfig, output_dir: str, group: str | None = None) -> dict[str, Any]:
    """Run the composed config, write results to ``output_dir`` and return the summary."""
    from raee.distributed import is_main_process
    from raee.experiment import format_summary, run_experiment
    from raee.logs import quiet_console

    quiet_console(cfg.get("log_level", "WARNING"))
    objs = build_objects(cfg)
    run_name = cfg.get("run_name") or objs["strategy"].name
    logger = make_logger(cfg, output_dir, run_name, group)
    status = "failed"
    try:
        summary = run_experiment(
            objs["backbone"], objs["head"], objs["strategy"], objs["datamodule"], output_dir=output_dir,
            run_name=run_name, seed=int(cfg.seed), compare_full=bool(cfg.compare_full),
            compare_oracle=bool(cfg.get("compare_oracle", False)), cache_dir=cfg.paths.cache_dir,
            trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True), logger=logger,
            warmup_batches=int(cfg.warmup_batches), split=str(cfg.get("split", "test")),
            regression_tolerance=float(cfg.get("regression_tolerance", 0.5)),
            reuse_full=bool(cfg.get("reuse_full_reference", False)))
        log_summary(logger, summary)
        location = logger_location(logger)
        status = "success"
    finally:
        close_logger(logger, status)
    if is_main_process():
        print(f"{' result ':=^100}\n{format_summary(summary)}\n  files: {output_dir}/summary.json, "
              f"{output_dir}/predictions.csv" + (f"\n  {location}" if location else "") + f"\n{'=' * 100}",
              flush=True)
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
        shown = user_error(err) or err  # a user's error (not Hydra's wrapper around it): its message only
        log.error("run failed: %s", user_message(err) or err)
        atomic_write_text(Path(output_dir) / "error.json", json.dumps(
            {"status": "failed", "error": f"{type(shown).__name__}: {shown}", "overrides": overrides or [],
             "traceback": traceback.format_exc()}, indent=2))
        return None
    (Path(output_dir) / "error.json").unlink(missing_ok=True)
    return summary


def objective_values(summary: dict[str, Any] | None, objectives: Sequence[str] | None) -> tuple[float, ...] | None:
    """The summary fields a search sweeper optimises (``objectives``), in order; None when the job failed."""
    if summary is None or not objectives:
        return None
    missing = [name for name in objectives if name not in summary]
    if missing:
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise UserError(f"objectives {missing} are not fields of summary.json: use some of {numeric}")
    return tuple(float("nan") if summary[name] is None else float(summary[name]) for name in objectives)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> tuple[float, ...] | None:
    """One job; returns the ``objectives`` (e.g. accuracy, mean exit layer) for a search sweeper (Optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with user_errors(cfg.get("log_level")):  # a user's error: one paragraph, exit status 2
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        group = Path(hc.sweep.dir).as_posix().replace("/", "_").strip("_") if multirun else None
        with job_ranks(cfg, hc):  # trainer.devices=N: this job's other ranks run beside it
            summary = run_job(cfg, hc.runtime.output_dir, multirun=multirun, overrides=list(hc.overrides.task),
                              group=group)
        return objective_values(summary, cfg.get("objectives"))


def job_ranks(cfg: DictConfig, hc: Any) -> Any:
    """trainer.devices=N (N > 1, one node): this job's ranks 1..N-1 as processes of the same job (its overrides,
    its output directory), while this process is rank 0 (see raee.distributed.launch_ranks)."""
    from raee.distributed import device_count, launch_ranks

    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    processes = device_count(trainer) if int(trainer.get("num_nodes", 1) or 1) == 1 else 1
    done = (Path(hc.runtime.output_dir) / "summary.json").exists() and not cfg.get("redo", False)
    quoted = "'" + str(hc.runtime.output_dir).replace("'", "\\'") + "'"  # a sweep's job directory holds = and ,
    command = [sys.executable, "-m", "raee.run", *hc.overrides.task, f"hydra.run.dir={quoted}",
               "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    if hc.job.config_name != "config":
        command.append(f"--config-name={hc.job.config_name}")
    command += [f"--config-dir={source.path}" for source in hc.runtime.config_sources
                if source.provider == "command-line" and source.schema == "file"]
    return launch_ranks(1 if done else processes, command, hc.runtime.output_dir)


#: Hydra plugins behind config options, and the extra that installs each
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "+hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),  # every search config uses Optuna
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (hydra_plugins) is missing too
        return False


def missing_plugin(argv: Sequence[str]) -> str | None:
    """A message naming the extra to install when an argument selects a Hydra plugin that is absent."""
    for arg in argv:
        for option, (module, extra) in PLUGINS.items():
            if arg.startswith(option) and not _importable(module):
                return (f"{arg} needs the Hydra plugin {module.split('.')[-1]}, which is not installed: "
                        f"pip install 'raee[{extra}]' (or pip install -e '.[{extra}]' in a checkout)")
    return None


def cli() -> None:
    """The ``raee`` command: ``main`` behind a check that the launcher/sweeper plugins asked for exist."""
    message = missing_plugin(sys.argv[1:])
    if message:
        fail(message)
    if any(arg.startswith(("+hparams_search=", "hydra/sweeper=optuna")) for arg in sys.argv[1:]):
        import optuna

        # Hydra's sweeper logs the study's name, storage and sampler already; Optuna's own line repeats them
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()


if __name__ == "__main__":
    cli()
