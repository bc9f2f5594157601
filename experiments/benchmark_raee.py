"""Benchmark (not a test): where RAEE's time goes, per batch, at batch sizes 1 and 32.

Prints, for the default setup (or Hydra overrides given as arguments), the time per batch of
key encoding, search, aggregation and the backbone, and RAEE's wall-clock speed-up against the
full model measured in the same process on the same examples after a warm-up.

    python experiments/benchmark_raee.py                      # default: minilm + prototype + bbcnews
    python experiments/benchmark_raee.py retriever=faiss_hnsw key_encoder=sentence --examples 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from raee.exit_loop import run_early_exit  # noqa: E402
from raee.exits import BatchContext, FullModel  # noqa: E402
from raee.experiment import prepare_head  # noqa: E402
from raee.features import encode_batch  # noqa: E402
from raee.run import CONF_DIR  # noqa: E402


def time_once(backbone, head, strategy, batches) -> dict[str, float]:
    """Summed per-phase seconds of one pass of ``strategy`` over ``batches``."""
    phase = {"total": 0.0}
    for inputs, make_ctx in batches:
        ctx = make_ctx()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_early_exit(backbone, head, strategy, inputs, ctx)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phase["total"] += time.perf_counter() - start
        for key, value in ctx.timings.items():
            phase[key] = phase.get(key, 0.0) + value
        phase["mean_exit_layer"] = phase.get("mean_exit_layer", 0.0) + float(result.exit_layers.float().sum())
    return phase


def time_interleaved(backbone, head, strategies: dict, batches, repeats: int) -> dict[str, dict[str, float]]:
    """Median per-phase seconds of each strategy; strategies alternate within every repeat so that
    drift of a shared machine's speed hits them alike."""
    for strategy in strategies.values():  # warm-up
        run_early_exit(backbone, head, strategy, batches[0][0], batches[0][1]())
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in strategies}
    for _ in range(repeats):
        for name, strategy in strategies.items():
            for key, value in time_once(backbone, head, strategy, batches).items():
                samples[name].setdefault(key, []).append(value)
    return {name: {k: statistics.median(v) for k, v in phases.items()} for name, phases in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. retriever=faiss_hnsw")
    parser.add_argument("--examples", type=int, default=64, help="test examples timed per batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["exit=raee", "logger=none", *args.overrides])
    torch.manual_seed(cfg.seed)
    backbone, head, dm = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    raee_exit = instantiate(cfg.exit)
    dm.setup("test")
    prepare_head(backbone, head, dm, cache_dir=cfg.paths.cache_dir)
    raee_exit.fit(backbone, head, dm, cache_dir=cfg.paths.cache_dir)
    raee_exit.prepare(backbone, head)
    test = dm.split("test")
    n = min(args.examples, len(test))
    texts = [test[i]["text"] for i in range(n)]
    print(f"backbone={backbone.name} ({backbone.num_layers} layers)  head={head.describe()['type']}  "
          f"key_encoder={raee_exit.key_encoder.describe()['type']}  retriever={type(raee_exit.retriever).__name__}"
          f"  database={raee_exit.db.size} examples  timed examples={n}  threads={torch.get_num_threads()}")
    header = f"{'batch':>5} {'keys ms/b':>10} {'search ms/b':>11} {'aggr ms/b':>10} {'backbone ms/b':>13} " \
             f"{'full ms/b':>10} {'retrieval %':>11} {'mean exit':>9} {'speed-up':>8}"
    print(header)
    for bs in args.batch_sizes:
        batches = []
        for start in range(0, n, bs):
            chunk = texts[start:start + bs]
            inputs = encode_batch(backbone, head, {"text": chunk, "text_pair": None})
            batches.append((inputs, lambda c=chunk: BatchContext(num_layers=backbone.num_layers, batch_size=len(c),
                                                                 texts=c)))
        timed = time_interleaved(backbone, head, {"raee": raee_exit, "full": FullModel()}, batches, args.repeats)
        r, f = timed["raee"], timed["full"]
        nb = len(batches)
        retrieval = r.get("retrieval_keys", 0) + r.get("retrieval_search", 0) + r.get("retrieval_aggregate", 0)
        print(f"{bs:>5} {1e3 * r.get('retrieval_keys', 0) / nb:>10.3f} {1e3 * r.get('retrieval_search', 0) / nb:>11.3f} "
              f"{1e3 * r.get('retrieval_aggregate', 0) / nb:>10.3f} {1e3 * (r['total'] - retrieval) / nb:>13.2f} "
              f"{1e3 * f['total'] / nb:>10.2f} {100 * retrieval / r['total']:>10.1f}% "
              f"{r['mean_exit_layer'] / n:>9.2f} {f['total'] / r['total']:>7.2f}x")


if __name__ == "__main__":
    main()
