"""One generation run without Hydra: bind the LM head, fit the strategy, decode the test split with it and with
the full model in the same process, and write summary.json and predictions.csv.

:func:`raee.experiment.run_experiment` hands a generation task (``data.task_type=generation``) here, so
``python -m raee.run data=bbcnews_headlines backbone=smollm2 exit=full`` and notebooks take the same path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L

import raee
from raee.atomic import atomic_write_text
from raee.errors import UserError
from raee.generation.evaluate import SplitRun, decode_split
from raee.generation.prompts import LMHead
from raee.generation.strategies import FullGeneration, GenerationExit, for_generation, generation_methods

#: columns of a generation run's predictions.csv
PREDICTION_COLUMNS = ("index", "reference", "generated", "exit_layers", "num_tokens", "rougeL", "exact_match")

#: the classification heads, by class name, as configs name them (for messages)
HEAD_NAMES = {"PrototypeHead": "prototype", "PromptHead": "prompt", "LinearHead": "linear"}


def generation_head(head: Any, strategy: Any) -> LMHead:
    """The LM head a generation task reads; a clear error for a classification head. ``exit=hashee`` selects
    head=linear for classification tasks (its config cannot know the task), so a linear head with HashEE stands
    for the LM head with the data config's prompt."""
    if isinstance(head, LMHead):
        return head
    if type(head).__name__ == "LinearHead" and type(strategy).__name__ == "HashEEExit":
        return LMHead()
    name = HEAD_NAMES.get(type(head).__name__, type(head).__name__)
    raise UserError(f"head={name} classifies and cannot generate text: a generation task reads the backbone's own "
                    f"LM head, use head=lm (exit={', '.join(generation_methods())})")


def refuse_on_classification(strategy: Any) -> None:
    """A generation-only strategy on a classification / regression task: one clear error."""
    if isinstance(strategy, GenerationExit):
        raise UserError(f"exit={strategy.name} is a generation method (token-level exits while decoding text): the "
                        "data is a classification task. Use a generation dataset (data=bbcnews_headlines, or "
                        "data.task_type=generation with data.target_column), or a classification exit such as "
                        "exit=entropy")


def prepare_generation(backbone: Any, head: Any, strategy: Any, datamodule: Any, *,
                       cache_dir: str | Path | None = "artifacts/cache", progress: bool = True
                       ) -> tuple[LMHead, GenerationExit]:
    """The LM head and generation strategy of a run, bound to ``backbone`` with the weights the run evaluates: the
    shared fine-tune (``head.finetune``) or the strategy's own (HashEE), each made once per content and reloaded
    from ``cache_dir`` afterwards, and the strategy fitted (calibrated). ``datamodule`` must be set up."""
    lm_head = generation_head(head, strategy)
    generator = for_generation(strategy)
    lm_head.bind(backbone, datamodule)
    generator.validate(backbone.num_layers)
    if not getattr(generator, "own_finetune", False):  # HashEE trains its own copy from the starting weights
        lm_head.fit(backbone, datamodule, cache_dir=cache_dir, progress=progress)
    generator.fit(backbone, lm_head, datamodule, cache_dir=cache_dir, progress=progress)
    return lm_head, generator


def evaluate_generation(backbone: Any, head: LMHead, strategy: GenerationExit, datamodule: Any, *,
                        split: str = "test", warmup_batches: int = 1, progress: bool = True) -> SplitRun:
    strategy.prepare(backbone, head)
    return decode_split(backbone, head, strategy, datamodule, split, warmup_batches=warmup_batches,
                        progress=progress)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def build_generation_summary(run: SplitRun, strategy: GenerationExit, backbone: Any, head: LMHead, datamodule: Any,
                             full: SplitRun | None, *, run_name: str, seed: int, split: str) -> dict[str, Any]:
    """The flat summary of a generation run (the fields a classification summary shares keep their names, so the
    report reads both)."""
    stats = run.stats
    metric = getattr(datamodule, "task_metric", "rougeL") or "rougeL"
    f = full.stats if full is not None else {}
    summary = {
        "run_name": run_name, "method": strategy.name, "knobs": strategy.knobs(), "task_type": "generation",
        "dataset": getattr(datamodule, "name", None), "split": split, "backbone": backbone.name,
        "head": "lm", "prompt": head.describe(), "num_layers": backbone.num_layers,
        "num_examples": stats["num_examples"], "seed": seed, "task_metric": metric,
        "task_metric_value": stats.get(metric), "full_task_metric_value": f.get(metric),
        **{k: stats.get(k) for k in ("rouge1", "rouge2", "rougeL", "exact_match")},
        **{f"full_{k}": f.get(k) for k in ("rouge1", "rouge2", "rougeL", "exact_match")},
        "accuracy": None, "mean_exit_layer": stats["mean_exit_layer"], "layer_speedup": stats["layer_speedup"],
        "prompt_mean_exit_layer": stats["prompt_mean_exit_layer"], "exit_layer_counts": stats["exit_layer_counts"],
        "flops_speedup": stats["flops_speedup"], "prefill_flops_speedup": stats["prefill_flops_speedup"],
        "decode_flops_speedup": stats["decode_flops_speedup"],
        "prefill_flops_per_token": stats["prefill_flops_per_token"],
        "decode_flops_per_token": stats["decode_flops_per_token"],
        "full_prefill_flops_per_token": stats["prefill_full_flops_per_token"],
        "full_decode_flops_per_token": stats["decode_full_flops_per_token"],
        "head_reads": stats["head_reads"],
        "generated_tokens": stats["generated_tokens"], "mean_generated_tokens": stats["mean_generated_tokens"],
        "full_mean_generated_tokens": f.get("mean_generated_tokens"), "prompt_tokens": stats["prompt_tokens"],
        "wall_time_s": stats["wall_time_s"], "prefill_time_s": stats["prefill_time_s"],
        "decode_time_s": stats["decode_time_s"], "full_wall_time_s": f.get("wall_time_s"),
        "tokens_per_s": stats["tokens_per_s"], "full_tokens_per_s": f.get("tokens_per_s"),
        "decode_tokens_per_s": stats["decode_tokens_per_s"], "full_decode_tokens_per_s": f.get("decode_tokens_per_s"),
        "throughput": stats["tokens_per_s"], "throughput_unit": "generated tokens/s",
        "wall_speedup": (stats["tokens_per_s"] / f["tokens_per_s"]) if f.get("tokens_per_s") and stats["tokens_per_s"]
        else None,
        "decode_wall_speedup": (stats["decode_tokens_per_s"] / f["decode_tokens_per_s"])
        if f.get("decode_tokens_per_s") and stats["decode_tokens_per_s"] else None,
        # the time to finish the same examples, whatever each wrote (tokens/s favours longer outputs, which spread
        # the prefill over more tokens)
        "latency_speedup": (f["wall_time_s"] / stats["wall_time_s"]) if f.get("wall_time_s") and stats["wall_time_s"]
        else None,
        "full_reference": "full" if full is not None else None,
        **same_as_full(run, full),
        "max_new_tokens": getattr(datamodule, "max_new_tokens", None),
        "max_source_tokens": head.max_source_tokens, "budget": strategy.budget() or head.budget(),
        "calibration": calibration_record(strategy), "strategy_stats": stats.get("strategy_stats"),
        **strategy.report(stats.get("strategy_stats")),
        "status": "ok", "version": raee.__version__, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return {k: _clean(v) for k, v in summary.items()}


def same_as_full(run: SplitRun, full: SplitRun | None) -> dict[str, Any]:
    """How many examples the method wrote exactly as the full model did (same text, compared per example index):
    all of them for a lossless method such as self_speculative. Empty without a separate full-model pass."""
    if full is None or full is run:
        return {}
    reference = {r["index"]: r["generated"] for r in full.rows}
    same = sum(reference.get(r["index"]) == r["generated"] for r in run.rows)
    return {"same_as_full": same, "same_as_full_share": same / len(run.rows) if run.rows else None}


def calibration_record(strategy: Any) -> dict[str, Any] | None:
    result = getattr(strategy, "calibration_result", None)
    if not result:
        return None
    return {k: v for k, v in result.items() if k != "curve"} | {"grid_size": len(result.get("curve", []))}


def write_generation_outputs(output_dir: str | Path, summary: dict[str, Any], run: SplitRun) -> None:
    """predictions.csv (one row per example: id, reference, generated text, every generated token's exit layer) and
    summary.json, each written atomically."""
    output_dir = Path(output_dir)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(PREDICTION_COLUMNS)
    for r in sorted(run.rows, key=lambda r: r["index"]):
        writer.writerow((r["index"], r["reference"], r["generated"], " ".join(str(x) for x in r["exit_layers"]),
                         len(r["tokens"]), f"{r['rougeL']:.6f}", int(r["exact_match"])))
    atomic_write_text(output_dir / "predictions.csv", buf.getvalue())
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))


def format_generation_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the console (ROUGE as points, 0-100)."""
    def pts(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    def num(v: Any, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"method={summary['method']} {summary['knobs']}  backbone={summary['backbone']}  data={summary['dataset']} "
        f"({summary['num_examples']} examples, generation)",
        f"  ROUGE-L: {pts(summary['rougeL'])}  ROUGE-1: {pts(summary['rouge1'])}  ROUGE-2: {pts(summary['rouge2'])}  "
        f"exact match: {pts(summary['exact_match'])}   (full model ROUGE-L: {pts(summary.get('full_rougeL'))})",
        f"  tokens/s: {num(summary['tokens_per_s'], '.1f')}   full model: {num(summary.get('full_tokens_per_s'), '.1f')}"
        f"   wall-clock speed-up: {num(summary.get('wall_speedup'))}x   (decoding steps alone: "
        f"{num(summary.get('decode_wall_speedup'))}x; time per example: {num(summary.get('latency_speedup'))}x)   "
        f"{num(summary['mean_generated_tokens'], '.1f')} tokens per example (full model "
        f"{num(summary.get('full_mean_generated_tokens'), '.1f')})",
        f"  mean exit layer (generated tokens): {num(summary['mean_exit_layer'])} / {summary['num_layers']}"
        f"   prompt tokens: {num(summary.get('prompt_mean_exit_layer'))}"
        f"   FLOPs speed-up: {num(summary.get('flops_speedup'))}x (prefill {num(summary.get('prefill_flops_speedup'))}x,"
        f" decode {num(summary.get('decode_flops_speedup'))}x)",
        f"  FLOPs per token: prefill {num(summary.get('prefill_flops_per_token'), '.3g')}, decode "
        f"{num(summary.get('decode_flops_per_token'), '.3g')}   wall-clock: {num(summary['wall_time_s'], '.3f')} s"
        f" (full model {num(summary.get('full_wall_time_s'), '.3f')} s)",
    ]
    if summary.get("acceptance_rate") is not None:
        lines.append(f"  drafts accepted: {num(100 * summary['acceptance_rate'], '.1f')}%   tokens per verification "
                     f"pass: {num(summary.get('tokens_per_round'))}")
    if summary.get("same_as_full") is not None:
        lines.append(f"  the same text as the full model: {summary['same_as_full']} of {summary['num_examples']} "
                     "examples")
    if summary.get("budget"):
        b = summary["budget"]
        lines.append(f"  fine-tuned by {b.get('by')}: {b.get('epochs')} epochs, {b.get('steps')} steps, lr "
                     f"{b.get('lr')}, seed {b.get('seed')}")
    cal = summary.get("calibration")
    if cal:
        val = cal["validation"]
        goal = (f"ROUGE-L >= full - {cal['max_drop']:g}" if cal.get("target") == "accuracy"
                else f"mean exit layer <= {cal.get('max_layer')}")
        lines.append(f"  calibrated on validation ({cal['num_examples']} examples, {goal}"
                     f"{'' if cal['met'] else ', NOT met: most suitable setting used'}): {cal['knob']}={cal['value']:g}"
                     f"   validation ROUGE-L {pts(val['accuracy'])} (full {pts(val['full_accuracy'])}), mean exit "
                     f"layer {num(val['mean_exit_layer'])}")
    return "\n".join(lines)


def run_generation_experiment(backbone: Any, head: Any, strategy: Any, datamodule: Any, *, output_dir: str | Path,
                              run_name: str = "run", seed: int = 42, compare_full: bool = True,
                              cache_dir: str | Path | None = "artifacts/cache", logger: Any = None,
                              warmup_batches: int = 1, progress: bool = True, split: str = "test") -> dict[str, Any]:
    """Everything one generation run does on ``split``; returns the summary (also written to ``output_dir``).
    Every check of the inputs runs before the first decoding step, and the outputs are written atomically at the
    end, so a refused run leaves no file behind."""
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule.setup("test")  # data errors (missing / empty targets and sources) first
    lm_head, generator = prepare_generation(backbone, head, strategy, datamodule, cache_dir=cache_dir,
                                            progress=progress)
    full = None
    if compare_full and not isinstance(generator, FullGeneration):
        full = evaluate_generation(backbone, lm_head, generator.wall_clock_reference(), datamodule, split=split,
                                   warmup_batches=warmup_batches, progress=progress)
    run = evaluate_generation(backbone, lm_head, generator, datamodule, split=split, warmup_batches=warmup_batches,
                              progress=progress)
    if isinstance(generator, FullGeneration):
        full = run
    summary = build_generation_summary(run, generator, backbone, lm_head, datamodule, full, run_name=run_name,
                                       seed=seed, split=split)
    if logger is not None and hasattr(logger, "log_metrics"):
        logger.log_metrics({f"{split}/{k}": float(summary[k]) for k in
                            ("rougeL", "rouge1", "rouge2", "exact_match", "mean_exit_layer", "tokens_per_s",
                             "flops_speedup", "wall_time_s") if summary.get(k) is not None})
    write_generation_outputs(output_dir, summary, run)
    return summary
