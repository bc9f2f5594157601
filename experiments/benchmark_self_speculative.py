"""Self-speculative decoding against the full model, at batch 1, in one process: tokens/s, acceptance, identical output.

    OMP_NUM_THREADS=1 python experiments/benchmark_self_speculative.py --split validation --examples 40 \\
        --draft-layers 4 6 8 12 --draft-tokens 2 4 --draft-vocab 0 2048 --cache-dir /work/cache

Builds the backbone, head and data of ``+experiment=compare_generation`` (plus any ``--override``), applies the
shared fine-tune (``head.finetune``, default joint: reloaded from the cache when it exists), then decodes the same
examples with ``exit=full`` and with every (E, d, K) setting (``--draft-vocab 0`` = the whole vocabulary), each after
one warm-up example. The full model is decoded first and last: the spread of its two timings shows how much the
machine's load moved during the run. Choose E, d and K on ``--split validation``; measure the chosen setting on
test. Prints one line per setting and writes them to ``--out`` (CSV) when given.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--draft-layers", type=int, nargs="+", default=[8])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4])
    parser.add_argument("--draft-vocab", type=int, nargs="+", default=[0], help="0 = the whole vocabulary")
    parser.add_argument("--finetune", default="joint", help="head.finetune: joint, last or null")
    parser.add_argument("--cache-dir", default="artifacts/cache")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides, e.g. data.max_source_tokens=64")
    parser.add_argument("--out", default=None, help="CSV file for the rows")
    args = parser.parse_args()

    from raee.generation import FullGeneration, SelfSpeculativeGeneration
    from raee.generation.evaluate import decode_split
    from raee.generation.speculative import acceptance_summary
    from raee.run import CONF_DIR

    overrides = ["+experiment=compare_generation", f"head.finetune={args.finetune}", "exit=full",
                 f"data.max_eval_examples={args.examples}", *args.override]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    backbone, head, datamodule = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    datamodule.setup("test")
    head.bind(backbone, datamodule)
    head.fit(backbone, datamodule, cache_dir=args.cache_dir)
    print(f"load average at start: {os.getloadavg()}  threads: {__import__('torch').get_num_threads()}", flush=True)

    def decode(strategy):
        strategy.prepare(backbone, head)
        strategy.fit(backbone, head, datamodule)
        return decode_split(backbone, head, strategy, datamodule, args.split, warmup_batches=1, progress=False)

    full_first = decode(FullGeneration())
    rows = []
    for E, d, K in itertools.product(args.draft_layers, args.draft_tokens, args.draft_vocab):
        run = decode(SelfSpeculativeGeneration(draft_layer=E, draft_tokens=d, draft_vocab=K or None))
        same = [r["tokens"] for r in run.rows] == [r["tokens"] for r in full_first.rows]
        acc = acceptance_summary(run.stats.get("strategy_stats"))
        row = {"draft_layer": E, "draft_tokens": d, "draft_vocab": K or None, "identical": same,
               "acceptance_rate": acc["acceptance_rate"], "tokens_per_round": acc["tokens_per_round"],
               "tokens_per_s": run.stats["tokens_per_s"], "full_tokens_per_s": full_first.stats["tokens_per_s"],
               "speedup": run.stats["tokens_per_s"] / full_first.stats["tokens_per_s"],
               "flops_speedup": run.stats["flops_speedup"]}
        rows.append(row)
        print(f"E={E:2d} d={d} K={K or 'all':>5}: {row['tokens_per_s']:.2f} tokens/s ({row['speedup']:.2f}x full), "
              f"acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_round']:.2f} tokens per pass, FLOPs "
              f"{row['flops_speedup']:.2f}x, identical output: {same}", flush=True)
    full_last = decode(FullGeneration())
    print(f"full model: {full_first.stats['tokens_per_s']:.2f} tokens/s first, {full_last.stats['tokens_per_s']:.2f} "
          f"last; ROUGE-L {full_first.stats['rougeL']:.4f}; load average at end: {os.getloadavg()}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["full_tokens_per_s_last"])
            writer.writeheader()
            for row in rows:
                writer.writerow(row | {"full_tokens_per_s_last": full_last.stats["tokens_per_s"]})
    sys.exit(0 if all(r["identical"] for r in rows) else 1)


if __name__ == "__main__":
    main()
