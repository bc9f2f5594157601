"""Decode a split with a generation strategy: prompts in, generated texts, exit layers, timings, FLOPs and
ROUGE out. Shared by the experiment (test split) and the calibration of thresholds (validation split)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from raee.errors import UserError
from raee.generation.flops import FlopsCount
from raee.generation.metrics import example_scores, mean_scores
from raee.generation.prompts import LMHead, newline_token_ids

EVAL_LOADERS = {"test": "test_dataloader", "validation": "val_dataloader"}


@dataclass
class SplitRun:
    """One strategy's pass over a split: a row per example and the run's statistics."""

    rows: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_split(backbone: Any, head: LMHead, strategy: Any, datamodule: Any, split: str = "test", *,
                 warmup_batches: int = 1, max_examples: int | None = None, progress: bool = True,
                 desc: str | None = None) -> SplitRun:
    """Greedy decoding of every example of ``split`` (the first ``max_examples`` when given) with ``strategy``.

    The first ``warmup_batches`` batches are decoded once untimed (allocations, lazy initialisation), then every
    batch is timed, tokenisation excluded (CUDA is synchronised before the clock is read). Rows: index, reference,
    generated text, the generated ids' exit layers, and the example's ROUGE / exact match.
    """
    if split not in EVAL_LOADERS:
        raise UserError(f"split={split!r} cannot be evaluated: use test (results) or validation (choosing knobs)")
    tokenizer = backbone.tokenizer
    newlines = newline_token_ids(tokenizer) if getattr(datamodule, "stop_at_newline", False) else None
    max_new = int(getattr(datamodule, "max_new_tokens", 32))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    end_ids = head.end_ids
    loader = getattr(datamodule, EVAL_LOADERS[split])()
    batches = []
    seen = 0
    for batch in loader:  # prompts encoded up front: tokenisation is not what the timings measure
        if max_examples is not None and seen >= max_examples:
            break
        take = len(batch["text"]) if max_examples is None else min(len(batch["text"]), max_examples - seen)
        prompts = [head.encode_prompt(s) for s in batch["text"][:take]]
        batches.append((batch["index"][:take].tolist(), list(batch["target"][:take]), prompts))
        seen += take

    def run(prompts: list[list[int]]) -> Any:
        return strategy.generate(backbone, prompts, max_new, end_ids, newlines, pad_id)

    for _, _, prompts in batches[:max(int(warmup_batches), 0)]:
        run(prompts)
    device = backbone.device
    rows: list[dict[str, Any]] = []
    flops = FlopsCount()
    wall = prefill = 0.0
    extra: dict[str, float] = {}
    for index, references, prompts in tqdm(batches, desc=desc or f"{split}: {strategy.name}", disable=not progress,
                                           leave=False):
        _sync(device)
        start = time.perf_counter()
        out = run(prompts)
        _sync(device)
        wall += time.perf_counter() - start
        prefill += out.stats.get("prefill_s", 0.0)
        for key, value in out.stats.items():
            if key != "prefill_s" and isinstance(value, (int, float)):
                extra[key] = extra.get(key, 0.0) + value
        flops.merge(out.flops)
        for i, reference, prompt, tokens, layers, prompt_layers in zip(index, references, prompts, out.tokens,
                                                                        out.exit_layers, out.prompt_exit_layers):
            rows.append({"index": i, "reference": reference,
                         "generated": head.decode(tokens, one_line=newlines is not None),
                         "tokens": tokens, "exit_layers": layers, "prompt_tokens": len(prompt),
                         "prompt_exit_layers": prompt_layers})
    for row, scores in zip(rows, example_scores([r["generated"] for r in rows], [r["reference"] for r in rows])):
        row.update(scores)
    return SplitRun(rows=rows, stats=run_statistics(rows, flops, wall, prefill, backbone.num_layers, extra))


def run_statistics(rows: list[dict[str, Any]], flops: FlopsCount, wall: float, prefill: float, num_layers: int,
                   extra: dict[str, float] | None = None) -> dict[str, Any]:
    """Quality, exits, speed and FLOPs of a pass (see :func:`decode_split`)."""
    generated = sum(len(r["tokens"]) for r in rows)
    layers = [layer for r in rows for layer in r["exit_layers"]]
    prompt_layers = [layer for r in rows for layer in r["prompt_exit_layers"]]
    counts = torch.bincount(torch.tensor(layers, dtype=torch.long), minlength=num_layers + 1).tolist() if layers \
        else [0] * (num_layers + 1)
    mean = sum(layers) / len(layers) if layers else None
    decode = wall - prefill
    decode_tokens = flops.tokens["decode"]
    stats = {
        **mean_scores(rows), "num_examples": len(rows), "generated_tokens": generated,
        "mean_generated_tokens": generated / len(rows) if rows else None,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "mean_exit_layer": mean, "layer_speedup": num_layers / mean if mean else None,
        "prompt_mean_exit_layer": sum(prompt_layers) / len(prompt_layers) if prompt_layers else None,
        "exit_layer_counts": counts,
        "wall_time_s": wall, "prefill_time_s": prefill, "decode_time_s": decode,
        "tokens_per_s": generated / wall if wall else None,
        # decoding steps only: the tokens whose step ran (every generated token but each row's last)
        "decode_tokens_per_s": decode_tokens / decode if decode > 0 else None,
        **flops.summary(),
    }
    if extra:
        stats["strategy_stats"] = dict(extra)
    return stats
