"""Size a generation fine-tune: seconds per training example for each loss and source length, and what a
budget of N examples x E epochs costs.

    python experiments/size_generation_finetune.py --sources 64 128 256 --steps 6
    python experiments/size_generation_finetune.py --losses last joint token_exits --sources 128

Runs a few optimiser steps of the real trainer (:func:`raee.generation.trainer.finetune_generation`) on
BBC News headline pairs with SmolLM2 (offline), after one warm-up step, and prints examples/s, the mean prompt
length, and the projected minutes of ``--examples`` x ``--epochs``. Timings depend on the machine's load: the
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from raee.backbones import load_backbone
from raee.data import TextClassificationDataModule
from raee.generation import LMHead
from raee.generation.finetune import training_pairs
from raee.generation.trainer import finetune_generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--sources", type=int, nargs="+", default=[128], help="max_source_tokens values")
    parser.add_argument("--losses", nargs="+", default=["last"], choices=["last", "joint", "token_exits"])
    parser.add_argument("--steps", type=int, default=6, help="timed optimiser steps per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=1000, help="budget to project: training examples")
    parser.add_argument("--epochs", type=int, default=1, help="budget to project: epochs")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    base = load_backbone(args.backbone)
    for source_tokens in args.sources:
        dm = TextClassificationDataModule("bbcnews_headlines", task_type="generation", max_source_tokens=source_tokens,
                                          batch_size=args.batch_size)
        head = LMHead()
        head.bind(base, dm)
        pairs = training_pairs(head, dm)
        mean_len = sum(len(p) + len(t) for p, t in pairs) / len(pairs)
        sample = pairs[: args.batch_size * (args.steps + 1)]
        for loss in args.losses:
            bb = copy.deepcopy(base)
            exits = None
            if loss == "token_exits":  # a random hash over layers 1..0.67 L, as HashEE's default
                L = bb.num_layers
                g = torch.Generator().manual_seed(0)
                table = torch.randint(1, round(0.67 * L) + 1, (len(bb.tokenizer),), generator=g)
                exits = lambda ids, mask, reads, t=table: t[ids]  # noqa: E731
            finetune_generation(bb, sample[: args.batch_size], loss=loss, token_exits=exits,
                                batch_size=args.batch_size, max_epochs=1, progress=False)  # warm-up
            started = time.perf_counter()
            stats = finetune_generation(bb, sample[args.batch_size:], loss=loss, token_exits=exits,
                                        batch_size=args.batch_size, max_epochs=1, progress=False)
            seconds = time.perf_counter() - started
            per_example = seconds / stats.examples
            minutes = per_example * args.examples * args.epochs / 60
            print(f"source {source_tokens:4d} tokens (sequence {mean_len:.0f} on average, {len(pairs)} train pairs), "
                  f"loss {loss:11s}: {stats.examples / seconds:.2f} examples/s, {per_example:.2f} s/example -> "
                  f"{args.examples} examples x {args.epochs} epochs = {minutes:.0f} min", flush=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
