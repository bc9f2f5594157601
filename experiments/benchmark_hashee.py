"""Benchmark (not a test): HashEE's wall-clock speed-up beside its FLOPs speed-up, at batch sizes 1 and 32.

Loads (or trains once and caches) the HashEE fine-tune of the given config and times, alternating within
every repeat on the same test examples after a warm-up, three passes over the same fine-tuned weights:
HashEE; "no exits", the same token-level layer code with every token through every layer (the reference
`python -m raee.run` measures HashEE against); and "full", the model's own transformers layers. The
token-level code computes queries and feed-forward for real tokens only, the transformers layer for
padding too, so "no exits / full" is the gain from skipping padding (no exit involved) and "HashEE / no
exits" the gain from the exits alone. Prints ms per batch and the speed-ups.

    python experiments/benchmark_hashee.py                                   # minilm + bbcnews defaults
    python experiments/benchmark_hashee.py data=rotten_tomatoes --examples 256
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from benchmark_raee import time_interleaved  # noqa: E402  (same folder: run as a script)
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from raee.cli import user_errors  # noqa: E402
from raee.exits import BatchContext, FullModel  # noqa: E402
from raee.experiment import prepare_head  # noqa: E402
from raee.features import encode_batch  # noqa: E402
from raee.run import CONF_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=rotten_tomatoes exit.hash=random")
    parser.add_argument("--examples", type=int, default=128, help="test examples timed per batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["exit=hashee", "logger=none", *args.overrides])
    torch.manual_seed(cfg.seed)
    backbone, head, dm = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    hashee = instantiate(cfg.exit)
    dm.setup("test")
    prepare_head(backbone, head, dm, cache_dir=cfg.paths.cache_dir, fit=False)
    hashee.fit(backbone, head, dm, cache_dir=cfg.paths.cache_dir)
    hashee.prepare(backbone, head)
    test = dm.split("test")
    n = min(args.examples, len(test))
    texts = [test[i]["text"] for i in range(n)]
    print(f"backbone={backbone.name} ({backbone.num_layers} layers)  data={dm.name}  hash={hashee.hash}  "
          f"first_layer={hashee.first_layer}  checkpoint={hashee.checkpoint_dir}  timed examples={n}  "
          f"threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'hashee ms/b':>11} {'no exits ms/b':>13} {'full ms/b':>10} {'FLOPs speed-up':>14} "
          f"{'wall: vs no exits':>17} {'padding gain':>12} {'wall: vs full':>13}")
    for bs in args.batch_sizes:
        batches = []
        for start in range(0, n, bs):
            chunk = texts[start:start + bs]
            inputs = encode_batch(backbone, head, {"text": chunk, "text_pair": None})
            batches.append((inputs, lambda c=chunk: BatchContext(num_layers=backbone.num_layers, batch_size=len(c),
                                                                 texts=c)))
        hashee.reset_flops()
        strategies = {"hashee": hashee, "no exits": hashee.wall_clock_reference(), "full": FullModel()}
        timed = time_interleaved(backbone, head, strategies, batches, args.repeats)
        h, t, f = (timed[name]["total"] for name in strategies)
        nb = len(batches)
        print(f"{bs:>5} {1e3 * h / nb:>11.2f} {1e3 * t / nb:>13.2f} {1e3 * f / nb:>10.2f} "
              f"{hashee.flops_speedup():>13.2f}x {t / h:>16.2f}x {f / t:>11.2f}x {f / h:>12.2f}x")


if __name__ == "__main__":
    with user_errors():  # a user's error: one paragraph, exit status 2
        main()
