"""Replay exit rules offline (not a test): calibrate each on the validation split, score it on the test split.

One all-layer pass per split (cached under paths.cache_dir/tables) keeps every example's head logits at every
layer and its neighbours in the exit database; every strategy then runs its own decision code on those tables
(:mod:`raee.calibration.simulate`) for every value of its knob in milliseconds. Use it to try a rule before
running it through the real exit loop (``python -m raee.run``), which is what the README reports; the two
agree example for example (tests/test_calibration.py).

Prints, per strategy: the knob chosen on validation (exit.target=accuracy exit.max_drop=0 unless overridden),
validation accuracy and layers computed, then test accuracy, mean exit layer and mean layers computed at that
knob, and whether test accuracy reaches the full model's. Also the neighbours' majority label as a classifier
(the simplest use of the database: no head, no layer beyond the key) and, with ``--curves``, every grid point
on the test split.

    python experiments/simulate_rules.py                              # BBC News, MiniLM + prototype head
    python experiments/simulate_rules.py data=rotten_tomatoes --curves
    python experiments/simulate_rules.py --target mean_layer --max-layer 1.0
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from raee.aggregation import gather_neighbours, label_vote  # noqa: E402
from raee.calibration.calibrate import calibrate_on_tables, full_model_scores, sweep_knob  # noqa: E402
from raee.calibration.simulate import simulate  # noqa: E402
from raee.calibration.tables import load_or_compute_tables  # noqa: E402
from raee.cli import user_errors  # noqa: E402
from raee.errors import UserError  # noqa: E402
from raee.experiment import prepare_head  # noqa: E402
from raee.run import CONF_DIR  # noqa: E402

#: name -> exit overrides (each strategy is calibrated on validation with the command's target)
STRATEGIES = {
    "entropy": ["exit=entropy"],
    "entropy (min_layer 0)": ["exit=entropy", "exit.min_layer=0"],
    "patience": ["exit=patience"],
    "patience (min_layer 0)": ["exit=patience", "exit.min_layer=0"],
    "raee robust (paper rule)": ["exit=raee", "aggregator=robust"],
    "raee neighbour_correctness": ["exit=raee", "aggregator=neighbour_correctness"],
    "raee_dynamic vote_posterior": ["exit=raee_dynamic", "aggregator=vote_posterior"],
    "raee_dynamic neighbour_vote": ["exit=raee_dynamic", "aggregator=neighbour_vote"],
}


def knn_accuracy(tables, info, num_classes: int) -> float:
    """Accuracy of the neighbours' nearness-weighted majority label (no smoothing)."""
    nb = gather_neighbours(tables.distances, tables.ids, info)
    return float((label_vote(nb, num_classes, smoothing=0.0).argmax(-1) == tables.labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every strategy (data=..., exit.k=...)")
    parser.add_argument("--target", choices=["accuracy", "mean_layer"], default="accuracy")
    parser.add_argument("--max-drop", type=float, default=0.0)
    parser.add_argument("--max-layer", type=float, default=None)
    parser.add_argument("--only", nargs="+", choices=sorted(STRATEGIES), help="a subset of the strategies")
    parser.add_argument("--curves", action="store_true", help="also print every grid point on the test split")
    args = parser.parse_args()

    target = [f"exit.target={args.target}", f"exit.max_drop={args.max_drop}"]
    target += [f"exit.max_layer={args.max_layer}"] if args.max_layer is not None else []

    def configure(exit_overrides: list[str]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=["logger=none", *exit_overrides, *target, *args.overrides])

    # one backbone, head, data module, exit database and pair of tables for every strategy
    cfg = configure(["exit=raee"])
    bb, head, dm = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    dm.setup("test")
    prepare_head(bb, head, dm, cache_dir=cfg.paths.cache_dir)
    base = instantiate(cfg.exit)
    base.init_calibration()  # the database only: calibration happens on the tables below
    base.fit(bb, head, dm, cache_dir=cfg.paths.cache_dir)
    base.prepare(bb, head)
    val, test = (load_or_compute_tables(bb, head, dm, split, base, cfg.paths.cache_dir) for split in ("validation", "test"))
    classes = int(test.logits.shape[-1])
    full = full_model_scores(test)["accuracy"]
    correct = test.correct()
    correct[:, -1] = True  # the oracle runs examples no layer gets right to the end
    print(f"{dm.name}: {val.size} validation / {test.size} test examples; full model test accuracy {full:.4f}; oracle "
          f"{float(test.correct().any(1).float().mean()):.4f} at mean exit layer "
          f"{float(correct.to(torch.uint8).argmax(1).float().mean()):.2f}")
    print(f"{'strategy':30s} {'knob':>24s} {'val acc':>8s} {'val layers':>10s} | {'test acc':>8s} {'exit':>5s} "
          f"{'layers':>6s} {'>= full':>7s}")
    print(f"{'neighbours majority label (kNN)':30s} {'k=' + str(base.k):>24s} "
          f"{knn_accuracy(val, base.db.info, classes):>8.4f} {'-':>10s} | {knn_accuracy(test, base.db.info, classes):>8.4f} "
          f"{'-':>5s} {base.plan_layer:>6.2f} {'':>7s}")
    for name in args.only or STRATEGIES:
        strategy = instantiate(configure(STRATEGIES[name]).exit)
        strategy.validate(bb.num_layers)
        if callable(getattr(strategy, "neighbours", None)):
            strategy.use_database(base.db)
            strategy.prepare(bb, head)
            if strategy.retrieval_description() != base.retrieval_description():
                raise UserError(f"{name}: its key encoder, retriever or k differ from exit=raee's; give them as "
                                "shared overrides so that one pair of tables serves every strategy")
        result = calibrate_on_tables(strategy, val)
        strategy.set_knob(result["value"])
        scores = simulate(strategy, test).scores(test.labels)
        print(f"{name:30s} {strategy.knob + '=' + format(result['value'], 'g'):>24s} "
              f"{result['validation']['accuracy']:>8.4f} {result['validation']['mean_layers_computed']:>10.2f} | "
              f"{scores['accuracy']:>8.4f} {scores['mean_exit_layer']:>5.2f} {scores['mean_layers_computed']:>6.2f} "
              f"{'yes' if scores['accuracy'] >= full - 1e-9 else 'no':>7s}{'' if result['met'] else '  (val target not met)'}")
        if args.curves:
            grid = list(strategy.calibration.grid or strategy.default_grid(test.num_layers, classes))
            points = sweep_knob(strategy, test, grid)
            print("    test curve: " + "  ".join(f"{p['value']:g}:{p['accuracy']:.3f}@{p['mean_layers_computed']:.2f}"
                                               for p in points))


if __name__ == "__main__":
    with user_errors():  # a user's error: one paragraph, exit status 2
        main()
