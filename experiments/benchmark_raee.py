"""Benchmark (not a test): where an exit strategy's time goes, and whether its wall-clock speed-up keeps up with
its layer speed-up, at batch sizes 1 and 32.

For the configured exit (default: RAEE's retrieval + confidence hybrid, exit=raee_dynamic, calibrated on the
validation split with exit.target=accuracy exit.max_drop=0), on the first test examples, it prints per batch
the time of key encoding, search and aggregation, the rest (backbone and head), the full model's time
measured in the same process on the same examples (strategies alternate within every repeat, median of the
repeats, after a warm-up), and:

- layer speed-up = L / mean layers computed (the key's layers count for every example),
- wall speed-up  = full model time / strategy time,
- ratio          = wall speed-up / layer speed-up (1.0 = the saved layers turn fully into saved time),
- floor          = full model time / time of exiting everyone at layer 0 (embeddings + one head call):
                   the most any exit strategy can gain on this data, whatever its layer speed-up,
- cap            = the ratio an exit with no overhead at all would reach: its layers at the full model's cost
                   per layer plus the floor for everyone, 1 / (1 + layer x / floor x). Layer counting calls the
                   embeddings and the head free, so when most examples leave at layer 0 this is below 1,
- tok x          = layer speed-up with every example weighted by its token count (long examples cost more per
                   layer; tok x below layer x: the long ones run deeper),
- cost x         = L / cost in layer equivalents with the keys included (:mod:`raee.cost`): layers computed + a
                   separate key encoder's FLOPs over one backbone layer's + the measured search and aggregation time
                   over one layer's time (the full model's time / (examples x L), measured here),
- wall/cost      = wall speed-up / cost x: 1.0 = everything the exit costs is counted; the issue's bar is 0.9.

    python experiments/benchmark_raee.py                                  # calibrated raee_dynamic
    python experiments/benchmark_raee.py exit=raee                        # the paper's rule (robust)
    python experiments/benchmark_raee.py exit=entropy exit.target=accuracy --examples 256
    python experiments/benchmark_raee.py data=rotten_tomatoes retriever=faiss_hnsw key_encoder=sentence
    python experiments/benchmark_raee.py +experiment=raee_lm exit=raee_choice paths.cache_dir=/work/cache
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from raee.cli import user_errors  # noqa: E402
from raee.exit_loop import run_early_exit  # noqa: E402
from raee.exits import BatchContext, FixedLayer, FullModel  # noqa: E402
from raee.experiment import prepare_head  # noqa: E402
from raee.features import encode_batch  # noqa: E402
from raee.cost import layer_flops  # noqa: E402
from raee.run import CONF_DIR  # noqa: E402

DEFAULT_EXIT = ["exit=raee_dynamic", "exit.target=accuracy", "exit.max_drop=0.0"]


def time_once(backbone, head, strategy, batches) -> dict[str, float]:
    """Summed per-phase seconds of one pass of ``strategy`` over ``batches``, its exits and layers computed."""
    phase = {"total": 0.0, "exit_layers": 0.0, "layers_computed": 0.0, "token_layers": 0.0}
    key_layer = getattr(strategy, "plan_layer", 0)  # layers run before planning count for everyone
    for inputs, make_ctx in batches:
        ctx = make_ctx()
        backbone.reset_counters()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_early_exit(backbone, head, strategy, inputs, ctx)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phase["total"] += time.perf_counter() - start
        for key, value in ctx.timings.items():
            phase[key] = phase.get(key, 0.0) + value
        phase["exit_layers"] += float(result.exit_layers.float().sum())
        phase["layers_computed"] += float(sum(backbone.layer_examples))
        lengths = inputs["attention_mask"].sum(1).cpu()
        phase["token_layers"] += float((lengths * result.exit_layers.clamp(min=key_layer)).sum())
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


def floor_cap(layer_speedup: float, floor_speedup: float) -> float:
    """Wall / layer speed-up of an exit with no overhead: its layers cost their share of the full model and every
    example pays the layer-0 floor (embeddings + head), so wall = 1 / (1 / layer_speedup + 1 / floor_speedup)."""
    return 1.0 / (1.0 + layer_speedup / floor_speedup)


def describe(strategy) -> str:
    result = getattr(strategy, "calibration_result", None)
    text = f"exit={strategy.name} {strategy.knobs()}"
    if result:
        val = result["validation"]
        text += (f"\ncalibrated on validation ({result['num_examples']} examples): {result['knob']}={result['value']:g}"
                 f", validation accuracy {val['accuracy']:.4f} (full {val['full_accuracy']:.4f}), layers computed "
                 f"{val['mean_layers_computed']:.2f}{'' if result['met'] else ' (target NOT met)'}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides (default exit: {' '.join(DEFAULT_EXIT)})")
    parser.add_argument("--examples", type=int, default=128, help="test examples timed per batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--csv", default=None, help="also append the printed rows to this CSV (results/ tables)")
    parser.add_argument("--label", default="", help="the rows' label in --csv (which setting this is)")
    args = parser.parse_intermixed_args()  # options may come after the Hydra overrides

    exit_given = any(o.split("=")[0].lstrip("+") == "exit" for o in args.overrides)
    overrides = ["logger=none", *([] if exit_given else DEFAULT_EXIT), *args.overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    torch.manual_seed(cfg.seed)
    backbone, head, dm = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    strategy = instantiate(cfg.exit)
    dm.setup("test")
    prepare_head(backbone, head, dm, cache_dir=cfg.paths.cache_dir)
    strategy.fit(backbone, head, dm, cache_dir=cfg.paths.cache_dir)  # database and calibration (validation only)
    strategy.prepare(backbone, head)
    floor = FixedLayer(0)
    floor.prepare(backbone, head)
    test = dm.split("test")
    n = min(args.examples, len(test))
    texts = [test[i]["text"] for i in range(n)]
    L = backbone.num_layers
    print(f"backbone={backbone.name} ({L} layers)  head={head.describe()['type']}  data={dm.name}  "
          f"timed examples={n}  repeats={args.repeats}  threads={torch.get_num_threads()}")
    print(describe(strategy))
    # what the keys cost beyond the layers, in FLOPs of one backbone layer (the same at every batch size)
    enc_all = encode_batch(backbone, head, {"text": texts, "text_pair": None})
    key_le = (float(getattr(strategy, "key_flops", lambda t: 0.0)(texts))
              / float(layer_flops(backbone.config, enc_all["attention_mask"].sum(1)).sum()))
    print(f"{'batch':>5} {'keys ms/b':>9} {'search ms/b':>11} {'aggr ms/b':>9} {'rest ms/b':>9} {'full ms/b':>9} "
          f"{'retr. %':>7} {'exit':>5} {'layers':>6} {'layer x':>7} {'wall x':>6} {'ratio':>5} {'floor x':>7} {'cap':>5} "
          f"{'tok x':>6} {'keys LE':>7} {'retr LE':>7} {'cost x':>6} {'wall/cost':>9}")
    rows = []
    for bs in args.batch_sizes:
        batches, tokens = [], 0
        for start in range(0, n, bs):
            chunk = texts[start:start + bs]
            inputs = encode_batch(backbone, head, {"text": chunk, "text_pair": None})
            tokens += int(inputs["attention_mask"].sum())
            batches.append((inputs, lambda c=chunk: BatchContext(num_layers=L, batch_size=len(c), texts=c)))
        timed = time_interleaved(backbone, head, {"strategy": strategy, "full": FullModel(), "floor": floor},
                                 batches, args.repeats)
        r, f = timed["strategy"], timed["full"]
        nb = len(batches)
        keys, search, aggr = (r.get(f"retrieval_{k}", 0.0) for k in ("keys", "search", "aggregate"))
        aggr += r.get("retrieval_vote", 0.0)  # kNN's vote is its aggregation
        computed = r["layers_computed"] / n
        layer_x = L / computed if computed > 0 else float("inf")
        wall_x = f["total"] / r["total"]
        floor_x = f["total"] / timed["floor"]["total"]
        tok_x = L * tokens / r["token_layers"] if r["token_layers"] > 0 else float("inf")
        retrieval_le = (search + aggr) / n / (f["total"] / (n * L))  # in layers of this process's full model
        cost = computed + key_le + retrieval_le
        cost_x = L / cost if cost > 0 else float("inf")
        print(f"{bs:>5} {1e3 * keys / nb:>9.3f} {1e3 * search / nb:>11.3f} {1e3 * aggr / nb:>9.3f} "
              f"{1e3 * (r['total'] - keys - search - aggr) / nb:>9.2f} {1e3 * f['total'] / nb:>9.2f} "
              f"{100 * (keys + search + aggr) / r['total']:>6.1f}% {r['exit_layers'] / n:>5.2f} {computed:>6.2f} "
              f"{layer_x:>6.2f}x {wall_x:>5.2f}x {wall_x / layer_x:>5.2f} {floor_x:>6.2f}x "
              f"{floor_cap(layer_x, floor_x):>5.2f} {tok_x:>5.2f}x {key_le:>7.3f} {retrieval_le:>7.3f} "
              f"{cost_x:>5.2f}x {wall_x / cost_x:>9.2f}")
        rows.append({"label": args.label, "dataset": dm.name, "backbone": backbone.name, "method": strategy.name,
                     "knobs": json.dumps(strategy.knobs(), default=str), "examples": n, "repeats": args.repeats,
                     "batch": bs, "keys_ms": 1e3 * keys / nb, "search_ms": 1e3 * search / nb,
                     "aggregation_ms": 1e3 * aggr / nb, "rest_ms": 1e3 * (r["total"] - keys - search - aggr) / nb,
                     "full_ms": 1e3 * f["total"] / nb, "retrieval_share": (keys + search + aggr) / r["total"],
                     "mean_exit_layer": r["exit_layers"] / n, "layers_computed": computed, "layer_speedup": layer_x,
                     "wall_speedup": wall_x, "wall_per_layer_speedup": wall_x / layer_x, "floor_speedup": floor_x,
                     "cap": floor_cap(layer_x, floor_x), "token_layer_speedup": tok_x, "key_layer_equivalents": key_le,
                     "retrieval_layer_equivalents": retrieval_le, "cost_layer_equivalents": cost,
                     "cost_speedup": cost_x, "wall_per_cost_speedup": wall_x / cost_x})
    if args.csv:
        import pandas as pd

        exists = os.path.exists(args.csv)
        pd.DataFrame(rows).to_csv(args.csv, mode="a" if exists else "w", header=not exists, index=False)


if __name__ == "__main__":
    with user_errors():  # a user's error: one paragraph, exit status 2
        main()
