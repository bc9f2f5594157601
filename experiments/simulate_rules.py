"""Replay exit rules offline (not a test): calibrate each on the validation split, score it on the test split.

One all-layer pass per split (cached under paths.cache_dir/layer_logits, the training split's too) keeps every
example's head logits at every layer; each key setting adds a pass up to its key layer for its neighbours in the
exit database (cached under paths.cache_dir/tables). Every strategy then runs its own decision code on those
tables (:mod:`raee.calibration.simulate`) for every candidate setting in milliseconds. Use it to try a rule
before running it through the real exit loop (``python -m raee.run``); the two agree example for example
(tests/test_calibration.py, tests/test_raee_choice.py).

Prints, per key setting and strategy: the setting chosen on validation (exit.target=accuracy exit.max_drop=0
unless overridden), validation accuracy and cost, then test accuracy, mean exit layer, mean layers computed and
the cost in layer equivalents with the keys included (:mod:`raee.cost`; retrieval time is not replayed), and
whether test accuracy reaches the full model's and kNN's. ``knn`` is the neighbours' majority label of
``exit=knn`` (the same keys and database, no head, no layer beyond the key); ``as configured`` rows are not
calibrated (the paper's rule with its own threshold). With ``--curves``, every grid point on the test split.

    python experiments/simulate_rules.py                              # BBC News, MiniLM + prototype head
    python experiments/simulate_rules.py data=rotten_tomatoes --curves
    python experiments/simulate_rules.py --target budget --max-cost 1.0
    # the keys sweep of +experiment=raee_lm_keys on one LM and dataset, every key setting in one process
    python experiments/simulate_rules.py +experiment=raee_lm data=imdb backbone=gemma3_270m \\
        paths.cache_dir=/work/cache --keys sentence backbone:0 backbone:1 backbone:2 backbone:4 backbone:8 \\
        --only "raee (as configured)" "raee_choice" --json imdb_gemma.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from raee.calibration.calibrate import calibrate_on_tables, full_model_scores, sweep_settings  # noqa: E402
from raee.calibration.simulate import simulate  # noqa: E402
from raee.calibration.tables import load_or_compute_tables  # noqa: E402
from raee.calibration.target import paired_z  # noqa: E402
from raee.cli import user_errors  # noqa: E402
from raee.errors import UserError  # noqa: E402
from raee.exits.knn import neighbour_vote  # noqa: E402
from raee.experiment import prepare_head  # noqa: E402
from raee.run import CONF_DIR  # noqa: E402

#: name -> (exit overrides, calibrated on validation?)
STRATEGIES = {
    "entropy": (["exit=entropy"], True),
    "entropy (min_layer 0)": (["exit=entropy", "exit.min_layer=0"], True),
    "patience": (["exit=patience"], True),
    "patience (min_layer 0)": (["exit=patience", "exit.min_layer=0"], True),
    "raee (as configured)": (["exit=raee"], False),
    "raee robust (paper rule)": (["exit=raee", "aggregator=robust"], True),
    "raee neighbour_correctness": (["exit=raee", "aggregator=neighbour_correctness"], True),
    "raee_dynamic vote_posterior": (["exit=raee_dynamic", "aggregator=vote_posterior"], True),
    "raee_dynamic neighbour_vote": (["exit=raee_dynamic", "aggregator=neighbour_vote"], True),
    "raee_choice": (["exit=raee_choice", "aggregator=vote_posterior"], True),
}


def key_overrides(spec: str) -> list[str]:
    """'sentence' | 'backbone:<layer>[:<pooling>]' (pooling auto unless given) -> Hydra overrides."""
    if spec == "config":
        return []
    if spec == "sentence":
        return ["key_encoder=sentence"]
    kind, _, rest = spec.partition(":")
    layer, _, pooling = rest.partition(":")
    if kind != "backbone" or not layer.isdigit():
        raise SystemExit(f"--keys {spec!r}: use config, sentence or backbone:<layer>[:<pooling>]")
    return ["key_encoder=backbone", f"key_encoder.layer={layer}", f"key_encoder.pooling={pooling or 'auto'}"]


def knn_right(tables, info, num_classes: int, k: int) -> torch.Tensor:
    """(N,) bool: exit=knn's majority vote (ties: the nearest neighbour's label) is right on ``tables``."""
    votes = neighbour_vote(tables.distances[:, :k], tables.ids[:, :k], info.labels, num_classes)
    return votes.argmax(-1) == tables.labels


def replay_keys(spec: str, args: argparse.Namespace, target: list[str]) -> list[dict]:
    def configure(exit_overrides: list[str]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=["logger=none", *exit_overrides, *target,
                                                            *args.overrides, *key_overrides(spec)])

    started = time.time()
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
    full_val = full_model_scores(val)["accuracy"]
    key_le = test.key_layer_equivalents()
    knn_val_right, knn_test_right = (knn_right(t, base.db.info, classes, base.k) for t in (val, test))
    knn_val, knn_test = float(knn_val_right.float().mean()), float(knn_test_right.float().mean())
    full_right = test.correct()[:, -1].clone()  # the paired tests on test below compare each rule with these two
    correct = test.correct()
    correct[:, -1] = True  # the oracle runs examples no layer gets right to the end
    keys = base.key_encoder.describe()
    chosen = (f" (pooling chosen on validation by kNN accuracy: {json.dumps(base.key_choice['validation_accuracy'])})"
              if base.key_choice else "")
    print(f"\n{dm.name} | {bb.name} | keys {keys}{chosen}")
    print(f"{val.size} validation / {test.size} test examples; full model test accuracy {full:.4f} (validation "
          f"{full_val:.4f}); oracle {float(test.correct().any(1).float().mean()):.4f} at mean exit layer "
          f"{float(correct.to(torch.uint8).argmax(1).float().mean()):.2f}; keys cost {key_le:.3f} layer equivalents")
    print(f"{'strategy':30s} {'setting':>44s} {'val acc':>8s} {'val cost':>8s} | {'test acc':>8s} {'exit':>5s} "
          f"{'layers':>6s} {'cost':>6s} {'>=full':>6s} {'>=knn':>5s}")
    rows = [{"keys": spec, "key_encoder": keys, "key_choice": base.key_choice, "dataset": dm.name, "backbone": bb.name,
             "num_layers": bb.num_layers, "strategy": "full", "test_accuracy": full, "val_accuracy": full_val,
             "mean_exit_layer": bb.num_layers, "mean_layers_computed": bb.num_layers, "cost": bb.num_layers,
             "key_layer_equivalents": 0.0, "z_vs_knn": paired_z(full_right, knn_test_right)},
            {"keys": spec, "key_encoder": keys, "dataset": dm.name, "backbone": bb.name, "num_layers": bb.num_layers,
             "strategy": "knn", "test_accuracy": knn_test, "val_accuracy": knn_val, "cost": base.plan_layer + key_le,
             "mean_layers_computed": base.plan_layer, "key_layer_equivalents": key_le,
             "z_vs_full": paired_z(knn_test_right, full_right)}]
    print(f"{'knn (neighbours majority label)':30s} {'k=' + str(base.k):>44s} {knn_val:>8.4f} "
          f"{base.plan_layer + key_le:>8.2f} | {knn_test:>8.4f} {base.plan_layer:>5.2f} {base.plan_layer:>6.2f} "
          f"{base.plan_layer + key_le:>6.2f} {'yes' if knn_test >= full - 1e-9 else 'no':>6s}")
    for name in args.only or STRATEGIES:
        overrides, calibrated = STRATEGIES[name]
        strategy = instantiate(configure(overrides).exit)
        strategy.validate(bb.num_layers)
        if callable(getattr(strategy, "neighbours", None)):
            if getattr(strategy.key_encoder, "pooling", None) == "auto":
                strategy.key_encoder.pooling = base.key_encoder.pooling
            strategy.use_database(base.db)
            strategy.num_classes = classes
            strategy.prepare(bb, head)
            if strategy.retrieval_description() != base.retrieval_description():
                raise UserError(f"{name}: its key encoder, retriever or k differ from exit=raee's; give them as "
                                "shared overrides so that one pair of tables serves every strategy")
        if calibrated:
            result = calibrate_on_tables(strategy, val)
            chosen = result.get("settings") or {strategy.knob: result["value"]}
            strategy.apply_settings(chosen)
            val_acc, val_cost, met = result["validation"]["accuracy"], result["validation"]["cost"], result["met"]
        else:
            chosen, met = {"aggregator.threshold": strategy.aggregator.threshold}, True
            on_val = simulate(strategy, val).scores(val.labels)
            val_acc, val_cost = on_val["accuracy"], on_val["mean_layers_computed"] + strategy.calibration_overhead(val)
        val_correct = (simulate(strategy, val).predictions == val.labels).numpy()  # for the paired test across keys
        on_test = simulate(strategy, test)
        scores, test_right = on_test.scores(test.labels), on_test.predictions == test.labels
        cost = scores["mean_layers_computed"] + float(getattr(strategy, "calibration_overhead", lambda t: 0.0)(test))
        setting = ", ".join(f"{k.split('.')[-1]}={'-' if v is None else format(v, 'g')}" for k, v in chosen.items())
        print(f"{name:30s} {setting:>44s} {val_acc:>8.4f} {val_cost:>8.2f} | {scores['accuracy']:>8.4f} "
              f"{scores['mean_exit_layer']:>5.2f} {scores['mean_layers_computed']:>6.2f} {cost:>6.2f} "
              f"{'yes' if scores['accuracy'] >= full - 1e-9 else 'no':>6s} "
              f"{'yes' if scores['accuracy'] >= knn_test - 1e-9 else 'no':>5s}{'' if met else '  (val target not met)'}")
        rows.append({"keys": spec, "key_encoder": keys, "dataset": dm.name, "backbone": bb.name,
                     "num_layers": bb.num_layers, "strategy": name, "calibrated": calibrated, "settings": chosen,
                     "val_accuracy": val_acc, "val_cost": val_cost, "test_accuracy": scores["accuracy"],
                     "mean_exit_layer": scores["mean_exit_layer"], "mean_layers_computed": scores["mean_layers_computed"],
                     "cost": cost, "key_layer_equivalents": key_le, "met": met, "_correct": val_correct,
                     "z_vs_full": paired_z(test_right, full_right), "z_vs_knn": paired_z(test_right, knn_test_right),
                     "grid_size": len(result["curve"]) if calibrated else 1})
        if args.curves and calibrated:
            points = sweep_settings(strategy, test, strategy.candidates(test.num_layers, classes))
            print("    test curve: " + "  ".join(f"{p['value']}:{p['accuracy']:.3f}@{p['cost']:.2f}" for p in points))
    print(f"({time.time() - started:.0f} s)")
    return rows


def choose_keys(rows: list[dict], target: list[str]) -> None:
    """Per calibrated strategy, the key setting the same target picks on validation (each key setting's chosen
    setting as a candidate: its validation accuracy and cost), with its test numbers."""
    from raee.calibration.target import CalibrationTarget, choose_point

    options = dict(o.lstrip("+").split("=", 1) for o in target)
    goal = CalibrationTarget(target=options["exit.target"], max_drop=float(options["exit.max_drop"]),
                             max_layer=float(options["exit.max_layer"]) if "exit.max_layer" in options else None,
                             max_cost=float(options["exit.max_cost"]) if "exit.max_cost" in options else None,
                             gain_per_layer=None if options["exit.gain_per_layer"] in ("null", "None")
                             else float(options["exit.gain_per_layer"]),
                             gain_confidence=None if options["exit.gain_confidence"] in ("null", "None")
                             else float(options["exit.gain_confidence"]))
    full_val = {r["keys"]: r["val_accuracy"] for r in rows if r["strategy"] == "full"}
    print("\nkey setting chosen on validation by the same target (each key setting's calibrated choice a candidate):")
    for name in dict.fromkeys(r["strategy"] for r in rows if r.get("calibrated")):
        curve = [{"value": r["keys"], "accuracy": r["val_accuracy"], "cost": r["val_cost"],
                  "mean_layers_computed": r["mean_layers_computed"], "_correct": r["_correct"], "row": r}
                 for r in rows if r["strategy"] == name]
        chosen, met = choose_point(curve, goal, max(full_val.values()))  # the full model is the same for every key
        r = chosen["row"]
        print(f"  {name:30s} keys {r['keys']:>12s}: validation {r['val_accuracy']:.4f} at {r['val_cost']:.2f}, test "
              f"{r['test_accuracy']:.4f} at {r['cost']:.2f} layer equivalents{'' if met else ' (target not met)'}")
        r["chosen_across_keys"] = True


def write_csv(rows: list[dict], path: str) -> None:
    """One line per row: dataset, backbone, keys, strategy, settings, validation and test accuracy, layers and cost
    (layer equivalents, keys included) and L / cost, whether test accuracy reaches the full model's, kNN's and both
    (same keys), McNemar's z of the row against each on the test split (> 0: better; |z| < 1.96: no difference
    at 95%); appended to an existing file with the same columns."""
    import pandas as pd

    best: dict = {}  # (dataset, backbone, keys) -> {"full": test accuracy, "knn": test accuracy}
    for r in rows:
        if r["strategy"] in ("full", "knn"):
            best.setdefault((r["dataset"], r["backbone"], r["keys"]), {})[r["strategy"]] = r["test_accuracy"]

    def reaches(r: dict, which: str) -> bool:
        return bool(r["test_accuracy"] >= best[(r["dataset"], r["backbone"], r["keys"])][which] - 1e-9)

    table = pd.DataFrame([{
        "dataset": r["dataset"], "backbone": r["backbone"], "num_layers": r["num_layers"], "target": r.get("target"),
        "keys": r["keys"],
        "key_pooling": (r.get("key_encoder") or {}).get("pooling"), "strategy": r["strategy"],
        "settings": json.dumps(r.get("settings")) if r.get("settings") else "",
        "grid_size": r.get("grid_size"), "val_accuracy": r.get("val_accuracy"), "val_cost": r.get("val_cost"),
        "test_accuracy": r["test_accuracy"], "mean_exit_layer": r.get("mean_exit_layer"),
        "mean_layers_computed": r.get("mean_layers_computed"), "key_layer_equivalents": r["key_layer_equivalents"],
        "cost": r["cost"], "cost_speedup": r["num_layers"] / r["cost"] if r["cost"] > 0 else float("inf"),
        "reaches_full": reaches(r, "full"), "reaches_knn": reaches(r, "knn"),
        "reaches_both": reaches(r, "full") and reaches(r, "knn"), "z_vs_full": r.get("z_vs_full"),
        "z_vs_knn": r.get("z_vs_knn"), "chosen_across_keys": bool(r.get("chosen_across_keys", False))} for r in rows])
    exists = os.path.exists(path)
    table.to_csv(path, mode="a" if exists else "w", header=not exists, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every strategy (data=..., exit.k=...)")
    parser.add_argument("--target", choices=["accuracy", "mean_layer", "budget"], default="accuracy")
    parser.add_argument("--max-drop", type=float, default=0.0)
    parser.add_argument("--max-layer", type=float, default=None)
    parser.add_argument("--max-cost", type=float, default=None)
    parser.add_argument("--gain-per-layer", default="0.01", help="target=accuracy: null for strictly the fastest")
    parser.add_argument("--gain-confidence", default="0.95", help="target=accuracy: null for no paired test")
    parser.add_argument("--only", nargs="+", choices=sorted(STRATEGIES), help="a subset of the strategies")
    parser.add_argument("--keys", nargs="+", default=["config"],
                        help="key settings to replay one after the other: config (the composed key_encoder), sentence, "
                             "backbone:<layer>[:<pooling>] (pooling auto = chosen on validation)")
    parser.add_argument("--curves", action="store_true", help="also print every candidate on the test split")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    parser.add_argument("--csv", default=None, help="also write every row to this CSV file (appended when it exists)")
    args = parser.parse_intermixed_args()

    target = [f"++exit.target={args.target}", f"++exit.max_drop={args.max_drop}",
              f"++exit.gain_per_layer={args.gain_per_layer}", f"++exit.gain_confidence={args.gain_confidence}"]
    target += [f"++exit.max_layer={args.max_layer}"] if args.max_layer is not None else []
    target += [f"++exit.max_cost={args.max_cost}"] if args.max_cost is not None else []
    rows = [row for spec in args.keys for row in replay_keys(spec, args, target)]
    if len(args.keys) > 1:
        choose_keys(rows, target)
    goal = f"{args.target} max_drop={args.max_drop:g}" + {
        "accuracy": f" gain_per_layer={args.gain_per_layer} gain_confidence={args.gain_confidence}",
        "budget": f" max_cost={args.max_cost:g}" if args.max_cost is not None else "",
        "mean_layer": f" max_layer={args.max_layer:g}" if args.max_layer is not None else ""}[args.target]
    for row in rows:
        row["target"] = goal
    if args.csv:
        write_csv(rows, args.csv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "_correct"} for r in rows], f, indent=1, default=str)


if __name__ == "__main__":
    with user_errors():  # a user's error: one paragraph, exit status 2
        main()
