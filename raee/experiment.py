"""Run one experiment without Hydra: fit the head if needed, evaluate the strategy and the full
model on the same data, and write the summary and per-example predictions.

``raee.run`` builds the objects from Hydra configs and calls :func:`run_experiment`; notebooks
and scripts can call it directly with plain objects.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

import raee
from raee.atomic import atomic_write_text
from raee.backbones.base import LayerwiseBackbone
from raee.cache import load_or_build
from raee.distributed import combine_rank_summaries, device_count, is_main_process, multi_device, rank_loader
from raee.cost import cost_summary
from raee.errors import UserError
from raee.exits.base import ExitStrategy
from raee.exits.simple import FullModel, OracleExit
from raee.heads.base import Head
from raee.logs import labelled_progress_bar
from raee.module import EarlyExitModule

#: columns of predictions.csv
PREDICTION_COLUMNS = ("index", "label", "prediction", "exit_layer", "confidence")


def fingerprint(parts: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able description (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_description(datamodule: Any) -> dict[str, Any]:
    train = datamodule.split("train")
    return {"name": getattr(datamodule, "name", type(datamodule).__name__), "seed": getattr(datamodule, "seed", None),
            "train_size": len(train), "label_names": list(datamodule.label_names)}


def task_type(datamodule: Any) -> str:
    """"regression" for a data module with real-valued targets, else "classification"."""
    return "regression" if getattr(datamodule, "is_regression", False) else "classification"


def head_cache_key(backbone: LayerwiseBackbone, head: Head, datamodule: Any) -> str:
    """A fitted head's cache entry: backbone, head and training data. :meth:`Head.describe` carries every
    setting the fit reads (a LinearHead's learning rates, epochs, seed, ...), as the exit databases'
    keys rely on it too."""
    return fingerprint({"backbone": backbone.describe(), "head": head.describe(), "data": data_description(datamodule)})


def _check_head_files(directory: Path) -> None:
    """Fail fast on a truncated or missing file, before ``head.load`` changes the head or backbone."""
    from safetensors import safe_open

    json.loads((directory / "head.json").read_text())
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:  # reads the header; a truncated file fails here
            f.keys()


def prepare_head(backbone: LayerwiseBackbone, head: Head, datamodule: Any, cache_dir: str | Path | None = None,
                 progress: bool = True, fit: bool = True) -> None:
    """Bind ``head`` to the backbone and fit it on the training split, once.

    The fit is saved to ``head.checkpoint`` when the head has one (a directory the user names: reloaded
    when it exists, refused when it does not load), else to ``cache_dir/heads/<content hash>`` (an
    automatic entry: rebuilt with a warning when damaged). Parallel jobs that need the same head wait
    for the one that fits it (:func:`raee.cache.load_or_build`); with neither, the head is fitted in memory.

    fit=False only binds (a strategy that trains the head itself, HashEE). A regression task binds
    one output named "value"; heads that cannot regress refuse it here.
    """
    task = task_type(datamodule)
    head.use_task(task)
    head.bind(backbone, list(datamodule.label_names) or (["value"] if task == "regression" else []))
    if not head.needs_fit or not fit:
        return
    checkpoint = getattr(head, "checkpoint", None)
    if checkpoint:
        target, auto = Path(checkpoint), False
        if target.is_dir() and not any(target.iterdir()):
            try:
                target.rmdir()  # an empty directory the user made is where to save, not a damaged checkpoint
            except OSError:
                pass  # another job has just filled it
    elif cache_dir:
        target, auto = Path(cache_dir) / "heads" / head_cache_key(backbone, head, datamodule), True
    else:
        head.fit(backbone, datamodule, progress=progress)
        return

    def build(directory: Path) -> None:
        head.fit(backbone, datamodule, progress=progress)
        head.save(directory, backbone)

    def load(directory: Path) -> None:
        try:
            _check_head_files(directory)
            head.load(directory, backbone)
        except Exception as err:
            if auto:
                raise
            raise UserError(f"head.checkpoint={directory} does not load ({type(err).__name__}: {err}): delete it "
                            "to train the head again there, or point head.checkpoint elsewhere") from err

    load_or_build(target, build, load, auto=auto, what="cached head")


#: the evaluation splits and the loaders that serve them
EVAL_LOADERS = {"test": "test_dataloader", "validation": "val_dataloader"}


def check_split(split: str) -> None:
    if split not in EVAL_LOADERS:
        raise UserError(f"split={split!r} cannot be evaluated: use test (results) or validation (choosing knobs)")


def evaluate(backbone: LayerwiseBackbone, head: Head, strategy: ExitStrategy, datamodule: Any,
             trainer_kwargs: dict[str, Any] | None = None, logger: Any = None, warmup_batches: int = 1,
             split: str = "test") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``trainer.test`` of one strategy over the test (or validation) split; returns (results, per-example
    columns)."""
    check_split(split)
    strategy.prepare(backbone, head)
    module = EarlyExitModule(backbone, head, strategy, warmup_batches=warmup_batches)
    kwargs = dict(accelerator="cpu", devices=1, logger=logger or False, enable_checkpointing=False,
                  enable_model_summary=False, enable_progress_bar=True)
    kwargs.update(trainer_kwargs or {})
    if kwargs["enable_progress_bar"] and "callbacks" not in kwargs:
        kwargs["callbacks"] = [labelled_progress_bar(f"{split}: {strategy.name}")]
    loader = getattr(datamodule, EVAL_LOADERS[split])()
    if multi_device(kwargs):  # each rank a contiguous block of the same batches: no example padded or repeated
        loader = rank_loader(loader, device_count(kwargs))
        kwargs.setdefault("use_distributed_sampler", False)
    try:
        trainer = L.Trainer(**kwargs)
    except MisconfigurationException as err:  # e.g. trainer=gpu where Lightning finds no GPU
        raise UserError(f"Lightning cannot run the trainer settings {trainer_kwargs or {}} here ({err}): use "
                        "trainer=cpu, or fix the trainer.* overrides") from err
    trainer.test(module, dataloaders=loader, verbose=False)
    return module.results(), module.predictions()


def build_summary(results: dict[str, Any], strategy: ExitStrategy, backbone: LayerwiseBackbone, head: Head,
                  datamodule: Any, full: dict[str, Any] | None, *, run_name: str, seed: int, split: str = "test",
                  task_metric: str | None = None, oracle: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat summary every strategy reports, so that one table holds them all."""
    task_metric = task_metric or getattr(datamodule, "task_metric", "accuracy") or "accuracy"
    full_time = full["wall_time_s"] if full else None
    summary = {
        "run_name": run_name, "method": strategy.name, "knobs": strategy.knobs(),
        "dataset": getattr(datamodule, "name", None), "split": split, "backbone": backbone.name,
        "head": head.describe().get("type"), "num_layers": backbone.num_layers,
        "num_examples": results["num_examples"], "seed": seed, "task_metric": task_metric,
        "task_metric_value": results.get(task_metric),
        "accuracy": results.get("accuracy"), "macro_f1": results.get("macro_f1"), "mcc": results.get("mcc"),
        "pearson": results.get("pearson"), "spearman": results.get("spearman"), "mse": results.get("mse"),
        "mean_exit_layer": results["mean_exit_layer"], "layer_speedup": results["layer_speedup"],
        "mean_layers_computed": results.get("mean_layers_computed"),
        "computed_layer_speedup": results.get("computed_layer_speedup"),
        "layers_saved": results["layers_saved"], "flops_speedup": results.get("flops_speedup"),
        "wall_time_s": results["wall_time_s"], "throughput": results["throughput"],
        "full_wall_time_s": full_time, "full_reference": full.get("reference") if full else None,
        "wall_speedup": full_time / results["wall_time_s"] if full_time and results["wall_time_s"] else None,
        "full_accuracy": full.get("accuracy") if full else None,
        "full_task_metric_value": full.get(task_metric) if full else None,
        "oracle_accuracy": oracle.get("accuracy") if oracle else None,
        "oracle_task_metric_value": oracle.get(task_metric) if oracle else None,
        "oracle_mean_exit_layer": oracle.get("mean_exit_layer") if oracle else None,
        "budget": training_budget(strategy, head),
        "retrieval_time_s": results["retrieval_time_s"], "retrieval_share": results["retrieval_share"],
        "timings": results.get("timings", {}), "exit_layer_counts": results["exit_layer_counts"],
        "tuned_knob": getattr(strategy, "tuned_knobs", None) or getattr(strategy, "knob", None),
        "calibration": calibration_summary(strategy),
        "status": "ok", "version": raee.__version__, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    summary.update(combine_rank_summaries(results, full))  # several devices: how the ranks were combined
    summary |= cost_summary(results, full_time, backbone.num_layers)  # keys and retrieval in layer equivalents
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}


def training_budget(strategy: ExitStrategy, head: Head) -> dict[str, Any] | None:
    """How the weights a run evaluates were fine-tuned (epochs, steps, learning rates, seed): the
    strategy's own fine-tune (HashEE) or the head's joint fine-tune (PABEE); None for a frozen backbone."""
    for owner in (strategy, head):
        budget = getattr(owner, "budget", None)
        if callable(budget) and budget() is not None:
            return budget()
    return None


def calibration_summary(strategy: ExitStrategy) -> dict[str, Any] | None:
    """What calibration chose on the validation split (None when the strategy was not calibrated)."""
    result = getattr(strategy, "calibration_result", None)
    if not result:
        return None
    return {k: v for k, v in result.items() if k != "curve"} | {"grid_size": len(result.get("curve", []))}


def write_outputs(output_dir: str | Path, summary: dict[str, Any], columns: dict[str, torch.Tensor]) -> None:
    """summary.json and predictions.csv, each written atomically."""
    output_dir = Path(output_dir)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(PREDICTION_COLUMNS)
    rows = zip(*(columns[c].tolist() for c in PREDICTION_COLUMNS))
    writer.writerows((i, y, p, e, f"{c:.6f}") for i, y, p, e, c in rows)
    atomic_write_text(output_dir / "predictions.csv", buf.getvalue())
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))


def reference_label(reference: str | None) -> str:
    """What the wall-clock speed-up was measured against, as the summary prints it."""
    return "full model" if reference in (None, "full") else reference


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the console."""
    if summary.get("task_type") == "generation":
        from raee.generation.experiment import format_generation_summary

        return format_generation_summary(summary)
    def f(v: Any, fmt: str = ".4f") -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"method={summary['method']} {summary['knobs']}  backbone={summary['backbone']}  head={summary['head']}  "
        f"data={summary['dataset']} ({summary['num_examples']} examples)",
        (f"  {summary['task_metric']}: {f(summary['task_metric_value'])}   (full model: "
         f"{f(summary.get('full_task_metric_value'))}, oracle: {f(summary.get('oracle_task_metric_value'))} at mean "
         f"layer {f(summary.get('oracle_mean_exit_layer'), '.2f')})   mse: {f(summary.get('mse'))}")
        if summary.get("accuracy") is None else
        (f"  {summary['task_metric']}: {f(summary['task_metric_value'])}" if summary["task_metric"] != "accuracy" else "")
        + f"  accuracy: {f(summary['accuracy'])}"
        f"   (full model: {f(summary['full_accuracy'])}, oracle: {f(summary.get('oracle_accuracy'))} at mean layer "
        f"{f(summary.get('oracle_mean_exit_layer'), '.2f')})",
        f"  mean exit layer: {f(summary['mean_exit_layer'], '.2f')} / {summary['num_layers']}"
        f"   layers computed: {f(summary.get('mean_layers_computed'), '.2f')}"
        f"   layer speed-up: {f(summary['layer_speedup'], '.2f')}x"
        + (f"   FLOPs speed-up: {f(summary['flops_speedup'], '.2f')}x" if summary.get("flops_speedup") else ""),
        f"  wall-clock: {f(summary['wall_time_s'], '.3f')} s   "
        f"{reference_label(summary.get('full_reference'))}: {f(summary['full_wall_time_s'], '.3f')} s"
        f"   speed-up: {f(summary['wall_speedup'], '.2f')}x   throughput: {f(summary['throughput'], '.1f')} ex/s",
        f"  retrieval: {f(summary['retrieval_time_s'], '.3f')} s ({f((summary['retrieval_share'] or 0) * 100, '.1f')}% "
        f"of wall-clock)   exits per layer: {summary['exit_layer_counts']}",
    ]
    if summary.get("devices"):
        per = "; ".join(f"rank {r['rank']}: {r['num_examples']} ex, {f(r['wall_time_s'], '.3f')} s, "
                        f"{f(r['throughput'], '.1f')} ex/s, speed-up {f(r.get('wall_speedup'), '.2f')}x"
                        for r in summary["ranks"])
        lines.append(f"  {summary['devices']} devices ({per}); wall-clock: sum over ranks, throughput: examples / "
                     "slowest rank")
    if summary.get("cost_layer_equivalents") is not None:  # raee.cost: keys and retrieval in backbone layers
        lines.append(
            f"  cost: {f(summary['cost_layer_equivalents'], '.2f')} layer equivalents (layers "
            f"{f(summary.get('mean_layers_computed'), '.2f')} + keys {f(summary.get('key_layer_equivalents'), '.2f')} + "
            f"retrieval {f(summary.get('retrieval_layer_equivalents'), '.2f')})   speed-up in layer equivalents: "
            f"{f(summary.get('cost_speedup'), '.2f')}x   wall / that: {f(summary.get('wall_per_cost_speedup'), '.2f')}")
    if summary.get("budget"):
        b = summary["budget"]
        lines.append(f"  fine-tuned by {b['by']}: {b['epochs']} epochs, {b['steps']} steps, lr {b['lr']:g} "
                     f"(classifier {b['head_lr']:g}), seed {b['seed']}")
    cal = summary.get("calibration")
    if cal:
        goal = (f"accuracy >= full - {cal['max_drop']:g}" if cal.get("target") == "accuracy"
                else f"mean layers <= {cal.get('max_layer')}")
        val = cal["validation"]
        lines.append(f"  calibrated on {cal['split']} ({cal['num_examples']} examples, {goal}"
                     f"{'' if cal['met'] else ', NOT met: most suitable setting used'}): {cal['knob']}={cal['value']:g}"
                     f"   validation accuracy {val['accuracy']:.4f} (full {val['full_accuracy']:.4f}), "
                     f"mean exit layer {val['mean_exit_layer']:.2f}, layers computed {val['mean_layers_computed']:.2f}")
    return "\n".join(lines)


def full_model_reference(strategy: ExitStrategy) -> FullModel:
    """The full model a strategy's accuracy and wall-clock are compared with: :class:`FullModel`, unless the
    strategy computes its layers another way and names its own (HashEE: the same token-level code, no exits)."""
    reference = getattr(strategy, "wall_clock_reference", None)
    return reference() if callable(reference) else FullModel()


#: full-model references measured in this process (reuse_full=True), by what they depend on
_FULL_REFERENCES: dict[str, dict[str, Any]] = {}


def full_reference_key(backbone: LayerwiseBackbone, head: Head, datamodule: Any, split: str,
                       reference: ExitStrategy, warmup_batches: int) -> str:
    """What a full-model reference run depends on: model, head, data and its split's content, the evaluation batch
    size, the warm-up and the reference's own code path."""
    from raee.calibration.tables import split_fingerprint

    dataset = datamodule.split(split)
    return fingerprint({"backbone": backbone.describe(), "head": head.describe(), "data": data_description(datamodule),
                        "split": split, "content": split_fingerprint(dataset), "n": len(dataset),
                        "batch": getattr(datamodule, "eval_batch_size", None) or getattr(datamodule, "batch_size", None),
                        "warmup": warmup_batches,
                        "reference": reference.name, "knobs": reference.knobs()})


def run_experiment(backbone: LayerwiseBackbone, head: Head, strategy: ExitStrategy, datamodule: Any, *,
                   output_dir: str | Path, run_name: str = "run", seed: int = 42, compare_full: bool = True,
                   compare_oracle: bool = False, cache_dir: str | Path | None = "artifacts/cache",
                   trainer_kwargs: dict[str, Any] | None = None,
                   logger: Any = None, warmup_batches: int = 1, progress: bool = True,
                   split: str = "test", regression_tolerance: float = 0.5, reuse_full: bool = False) -> dict[str, Any]:
    """Everything one run does on the ``split`` (test; validation when choosing knobs); returns the summary
    (also written to ``output_dir``). regression_tolerance: the oracle's "correct" on a regression task
    (|prediction - target| <= it). reuse_full: take the full model's reference from an earlier run of this process
    on the same model, data and batch size (a sweep's jobs in one process time the full model once, not once per
    job; the wall-clock speed-up is then against a reference timed earlier, not beside the run)."""
    check_split(split)
    if getattr(datamodule, "task_type", None) == "generation":  # text generation: raee.generation's own run
        from raee.generation.experiment import run_generation_experiment

        return run_generation_experiment(backbone, head, strategy, datamodule, output_dir=output_dir,
                                         run_name=run_name, seed=seed, compare_full=compare_full,
                                         cache_dir=cache_dir, logger=logger, warmup_batches=warmup_batches,
                                         progress=progress, split=split)
    from raee.generation.experiment import refuse_on_classification

    refuse_on_classification(strategy)
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule.setup("test")
    strategy.validate(backbone.num_layers)  # fail on bad knobs before any expensive work
    strategy.check_task(task_type(datamodule) == "regression")
    prepare_head(backbone, head, datamodule, cache_dir=cache_dir, progress=progress,
                 fit=not getattr(strategy, "trains_head", False))
    strategy.fit(backbone, head, datamodule, cache_dir=cache_dir, progress=progress)
    full = None
    if compare_full and not isinstance(strategy, FullModel):
        reference = full_model_reference(strategy)
        key = full_reference_key(backbone, head, datamodule, split, reference, warmup_batches) if reuse_full else None
        if key in _FULL_REFERENCES:
            full = dict(_FULL_REFERENCES[key], reference=f"{reference.name} (timed earlier in this process)")
        else:
            full, _ = evaluate(backbone, head, reference, datamodule, trainer_kwargs, None, warmup_batches, split)
            full["reference"] = reference.name
            if key is not None:
                _FULL_REFERENCES[key] = full
    oracle = None
    if compare_oracle and not isinstance(strategy, OracleExit):
        oracle, _ = evaluate(backbone, head, OracleExit(regression_tolerance), datamodule, trainer_kwargs, None,
                             warmup_batches, split)
    results, columns = evaluate(backbone, head, strategy, datamodule, trainer_kwargs, logger, warmup_batches, split)
    if isinstance(strategy, FullModel):
        full = results
    if isinstance(strategy, OracleExit):
        oracle = results
    flops = getattr(strategy, "flops_speedup", None)  # token-level methods (HashEE) count FLOPs
    if callable(flops):
        results["flops_speedup"] = flops()
    summary = build_summary(results, strategy, backbone, head, datamodule, full, run_name=run_name, seed=seed,
                            split=split, oracle=oracle)
    if is_main_process():  # every rank holds the gathered results; one writes them
        write_outputs(output_dir, summary, columns)
    return summary
