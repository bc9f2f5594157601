"""Calibration on the validation split: the choice rule on hand-made curves and tables, replay equals the exit
loop, the cache, and the guarantee that the test split (its labels above all) is never read."""

from __future__ import annotations

import math

import pytest
import torch

from raee.aggregation import NeighbourVote, RobustAggregator, VotePosterior
from raee.calibration import CalibrationTarget, choose_point
from raee.calibration.calibrate import calibrate_on_tables
from raee.calibration.simulate import simulate
from raee.calibration.tables import SplitTables, compute_tables
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext, EntropyExit, PatienceExit, RaeeChoiceExit, RaeeDynamicExit, RaeeExit
from raee.experiment import prepare_head
from raee.features import encode_batch
from raee.heads import PrototypeHead
from raee.keys import BackboneKeys
from raee.retrieval.torch_exact import TorchExactRetriever
from raee.backbones import load_backbone
from tests.conftest import TINY_CONFIGS, ListDataModule, toy_datamodule


def point(value, accuracy, layers):
    return {"value": value, "accuracy": accuracy, "mean_exit_layer": layers, "mean_layers_computed": layers}


CURVE = [point(0.1, 0.90, 5.0), point(0.2, 0.95, 4.0), point(0.3, 0.95, 3.0), point(0.4, 0.93, 2.0),
         point(0.5, 0.96, 2.5), point(0.6, 0.80, 1.0)]


def test_accuracy_target_picks_the_fastest_setting_at_least_as_accurate_as_the_full_model():
    strict = dict(gain_per_layer=None)  # strictly the fastest qualifying setting
    chosen, met = choose_point(CURVE, CalibrationTarget("accuracy", max_drop=0.0, **strict), full_accuracy=0.95)
    assert met and chosen["value"] == 0.5  # 2.5 layers; 0.3 (3 layers) also qualifies but is slower
    chosen, _ = choose_point(CURVE, CalibrationTarget("accuracy", max_drop=0.02, **strict), full_accuracy=0.95)
    assert chosen["value"] == 0.4  # 0.93 >= 0.95 - 0.02 at 2 layers
    # ties in cost go to the more accurate setting
    tie = [point(1, 0.95, 2.0), point(2, 0.97, 2.0)]
    assert choose_point(tie, CalibrationTarget("accuracy", **strict), 0.9)[0]["value"] == 2
    # nothing qualifies: the most accurate setting, flagged as not met
    chosen, met = choose_point(CURVE, CalibrationTarget("accuracy", **strict), full_accuracy=0.99)
    assert not met and chosen["value"] == 0.5


def test_accuracy_target_takes_one_more_step_when_it_gains_enough_per_layer():
    # 0.4 (0.93 at 2 layers) is the fastest at >= 0.93; 0.5 gains 3 points for half a layer more: worth it at the
    # default rate of one point per layer, not at 10 points per layer
    chosen, _ = choose_point(CURVE, CalibrationTarget("accuracy", max_drop=0.02), full_accuracy=0.95)
    assert chosen["value"] == 0.5
    chosen, _ = choose_point(CURVE, CalibrationTarget("accuracy", max_drop=0.02, gain_per_layer=0.1), 0.95)
    assert chosen["value"] == 0.4
    # a free vote at or above the full model does not stop the choice when a setting at the same cost is better;
    # the cost that counts is the one with the keys ("cost"), not the layers alone
    free = [point("hybrid", 0.81, 0.0) | {"cost": 0.02}, point("vote", 0.95, 0.0) | {"cost": 0.03},
            point("full", 0.76, 6.0)]
    assert choose_point(free, CalibrationTarget("accuracy"), full_accuracy=0.76)[0]["value"] == "vote"
    assert choose_point(free, CalibrationTarget("accuracy", gain_per_layer=None), 0.76)[0]["value"] == "hybrid"


def test_a_step_must_gain_beyond_the_noise_of_the_validation_split():
    import numpy as np

    from raee.calibration.target import paired_z

    # 100 validation examples: the vote gets 70 right; the costlier hybrid 73, but they disagree on 33 examples
    # (18 only the hybrid gets right, 15 only the vote): (18 - 15) / sqrt(33) = 0.52, not a real gain
    vote = np.zeros(100, dtype=bool)
    vote[:70] = True
    hybrid = vote.copy()
    hybrid[55:70] = False  # 15 the vote alone gets right
    hybrid[70:88] = True  # 18 the hybrid alone gets right
    assert paired_z(hybrid, vote) == pytest.approx(3 / 33 ** 0.5)
    curve = [point("vote", 0.70, 0.0) | {"cost": 2.3, "_correct": vote},
             point("hybrid", 0.73, 1.0) | {"cost": 3.3, "_correct": hybrid}]
    assert choose_point(curve, CalibrationTarget("accuracy"), 0.66)[0]["value"] == "vote"
    assert choose_point(curve, CalibrationTarget("accuracy", gain_confidence=None), 0.66)[0]["value"] == "hybrid"
    # the same 3 points with no example the vote alone gets right is a real gain: 3 / sqrt(3) = 1.73 >= 1.645
    sure = vote.copy()
    sure[70:73] = True
    curve[1] = point("hybrid", 0.73, 1.0) | {"cost": 3.3, "_correct": sure}
    assert choose_point(curve, CalibrationTarget("accuracy"), 0.66)[0]["value"] == "hybrid"


def test_budget_target_picks_the_most_accurate_setting_within_a_cost_with_the_keys():
    curve = [point("a", 0.90, 1.0) | {"cost": 3.5}, point("b", 0.85, 1.0) | {"cost": 1.2}, point("c", 0.80, 2.0)]
    chosen, met = choose_point(curve, CalibrationTarget("budget", max_cost=3.0), full_accuracy=0.9)
    assert met and chosen["value"] == "b"  # "a" computes 1 layer but its keys cost 2.5 more
    chosen, met = choose_point(curve, CalibrationTarget("budget", max_cost=1.0), full_accuracy=0.9)
    assert not met and chosen["value"] == "b"  # nothing fits: the cheapest
    with pytest.raises(ValueError, match="needs exit.max_cost"):
        CalibrationTarget("budget")


def test_mean_layer_target_picks_the_most_accurate_setting_within_the_budget():
    chosen, met = choose_point(CURVE, CalibrationTarget("mean_layer", max_layer=2.0), full_accuracy=0.95)
    assert met and chosen["value"] == 0.4
    chosen, met = choose_point(CURVE, CalibrationTarget("mean_layer", max_layer=3.0), full_accuracy=0.95)
    assert met and chosen["value"] == 0.5
    chosen, met = choose_point(CURVE, CalibrationTarget("mean_layer", max_layer=0.5), full_accuracy=0.95)
    assert not met and chosen["value"] == 0.6  # the fastest


def test_bad_targets_are_clear_errors():
    with pytest.raises(ValueError, match="exit.target='speed' is unknown"):
        CalibrationTarget("speed")
    with pytest.raises(ValueError, match="needs exit.max_layer"):
        CalibrationTarget("mean_layer")
    with pytest.raises(ValueError, match="max_drop"):
        CalibrationTarget("accuracy", max_drop=-0.1)


def synthetic_validation() -> SplitTables:
    """Four examples, L = 2, two classes; the logits make each layer's entropy and correctness known.

    example: per layer (prediction, confident?) with label 0
      0: right and confident from layer 0               -> exits at 0 for any threshold above ~0.13
      1: right but unsure at 0 (entropy ~0.60), confident and right at 1
      2: wrong and confident at 0 (a trap), right at 2 only
      3: unsure everywhere, right only at the last layer
    """
    sure, unsure = 4.0, 0.6  # logit gaps: entropy(4.0) ~ 0.13 nats, entropy(0.6) ~ 0.60 nats
    gaps = torch.tensor([[sure, sure, sure], [unsure, sure, sure], [-sure, -unsure, sure], [-unsure, -unsure, unsure]])
    logits = torch.stack([gaps / 2, -gaps / 2], dim=-1)  # (4, 3, 2): class 0 wins where the gap is positive
    return SplitTables(logits=logits, labels=torch.zeros(4, dtype=torch.long))


def entropy_of_gap(gap: float) -> float:
    p = 1 / (1 + math.exp(-gap))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_calibration_on_a_synthetic_validation_table_picks_the_documented_threshold():
    tables = synthetic_validation()
    low, high = entropy_of_gap(4.0), entropy_of_gap(0.6)
    grid = [0.0, (low + high) / 2, high + 0.01]
    # threshold 0: nobody exits early (4/4 right, 2 layers); between: ex 2 leaves wrong at layer 0 (3/4 right);
    # above the unsure entropy: ex 1 leaves at 0 too and ex 3 at 0 (wrong) -> 2/4 right
    strategy = EntropyExit(min_layer=0, target="accuracy", max_drop=0.0, grid=grid)
    result = calibrate_on_tables(strategy, tables)
    curve = {p["value"]: (p["accuracy"], p["mean_layers_computed"]) for p in result["curve"]}
    assert curve[0.0] == (1.0, 2.0)
    assert curve[grid[1]] == (0.75, (0 + 1 + 0 + 2) / 4)
    assert curve[grid[2]] == (0.5, 0.0)
    assert result["met"] and result["value"] == 0.0 and result["validation"]["full_accuracy"] == 1.0
    # strictly the fastest: allowing a 25-point drop buys the middle threshold; a 50-point drop the fastest
    for drop, want in ((0.25, grid[1]), (0.5, grid[2])):
        strategy = EntropyExit(min_layer=0, target="accuracy", max_drop=drop, grid=grid, gain_per_layer=None)
        assert calibrate_on_tables(strategy, tables)["value"] == pytest.approx(want)
    # at one point per layer, 25 points for 1.25 more layers is worth it: back to threshold 0
    strategy = EntropyExit(min_layer=0, target="accuracy", max_drop=0.25, grid=grid)
    assert calibrate_on_tables(strategy, tables)["value"] == 0.0
    # a layer budget of 1 picks the most accurate setting within it
    strategy = EntropyExit(min_layer=0, target="mean_layer", max_layer=1.0, grid=grid)
    assert calibrate_on_tables(strategy, tables)["value"] == pytest.approx(grid[1])
    # the knob is restored after the sweep: calibrate() sets it, not the sweep
    assert strategy.threshold == 0.3


def test_patience_and_the_default_grids():
    tables = synthetic_validation()
    # patience 1 (layers 0 and 1 agree): everyone leaves at layer 1, ex 2 and 3 wrongly -> 2/4 right;
    # patience 2 runs everyone to the last layer -> 4/4
    strategy = PatienceExit(min_layer=0, target="accuracy")
    result = calibrate_on_tables(strategy, tables)
    assert [(p["value"], p["accuracy"], p["mean_layers_computed"]) for p in result["curve"]] == [(1.0, 0.5, 1.0),
                                                                                                (2.0, 1.0, 2.0)]
    assert result["value"] == 2.0
    assert calibrate_on_tables(PatienceExit(min_layer=0, target="accuracy", max_drop=0.5, gain_per_layer=None),
                               tables)["value"] == 1.0
    assert len(EntropyExit().default_grid(6, 5)) == 41 and EntropyExit().default_grid(6, 5)[-1] == pytest.approx(
        math.log(5))


# ---------------------------------------------------------------------------- on a tiny model


class SplitDataModule(ListDataModule):
    """Separate train / validation / test examples; reading the test split in any way raises."""

    def __init__(self, train: ListDataModule, validation: ListDataModule):
        super().__init__(train.texts, train.labels, train.label_names, batch_size=train.batch_size)
        self.validation = validation

    def split(self, name: str) -> list:
        if name == "test":
            raise AssertionError("calibration read the test split")
        return super().split(name) if name == "train" else self.validation.split(name)

    def val_dataloader(self):
        return self.validation.train_dataloader()

    def test_dataloader(self):
        raise AssertionError("calibration read the test split")

    predict_dataloader = test_dataloader


@pytest.fixture(scope="module")
def lively_bert():
    """A tiny BERT whose layers change the representation (larger random weights than the shared fixture's),
    so that predictions, confidences and exits differ from layer to layer."""
    return load_backbone(tiny=dict(TINY_CONFIGS["bert"], initializer_range=0.2), max_length=64)


@pytest.fixture()
def tiny(lively_bert):
    train = toy_datamodule(18)
    validation = toy_datamodule(12)
    # each validation text mixes two topics: harder than the training texts
    validation.texts = [" ".join(a.split()[: 3 + i % 5] + b.split()[: 6 - i % 4]) for i, (a, b) in
                        enumerate(zip(validation.texts, validation.texts[1:] + validation.texts[:1]))]
    dm = SplitDataModule(train, validation)
    head = PrototypeHead()
    prepare_head(lively_bert, head, dm, cache_dir=None, progress=False)
    return lively_bert, head, dm


def make_strategies() -> dict:
    return {"entropy": EntropyExit(min_layer=0, threshold=0.9),
            "patience": PatienceExit(min_layer=0, patience=1),
            "raee": RaeeExit(BackboneKeys(layer=1), TorchExactRetriever(), RobustAggregator(0.4), k=3),
            "raee_dynamic": RaeeDynamicExit(BackboneKeys(layer=1), TorchExactRetriever(),
                                            NeighbourVote(threshold=0.5), k=3),
            "raee_dynamic_posterior": RaeeDynamicExit(BackboneKeys(layer=1), TorchExactRetriever(),
                                                      VotePosterior(threshold=0.6), k=3),
            "raee_choice": RaeeChoiceExit(BackboneKeys(layer=1), TorchExactRetriever(), VotePosterior(), k=3)}


@pytest.mark.parametrize("name", ["entropy", "patience", "raee", "raee_dynamic", "raee_dynamic_posterior"])
def test_replay_on_tables_equals_the_exit_loop(tiny, tmp_path, name):
    bb, head, dm = tiny
    strategy = make_strategies()[name]
    strategy.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    strategy.prepare(bb, head)
    tables = compute_tables(bb, head, dm, "validation", retrieval=strategy if name.startswith("raee") else None,
                            progress=False)
    if name == "entropy":  # a threshold between the entropies seen, so that exits differ
        strategy.threshold = float(torch.quantile(-(tables.logits.softmax(-1) * tables.logits.log_softmax(-1)).sum(-1),
                                                  0.5))
    replay = simulate(strategy, tables)
    exits, preds = [], []
    for batch in dm.val_dataloader():
        enc = encode_batch(bb, head, batch)
        ctx = BatchContext(num_layers=bb.num_layers, batch_size=len(batch["text"]), texts=list(batch["text"]))
        res = run_early_exit(bb, head, strategy, enc, ctx)
        exits.append(res.exit_layers)
        preds.append(res.predictions)
    assert torch.equal(torch.cat(exits), replay.exit_layers)
    assert torch.equal(torch.cat(preds), replay.predictions)
    assert len(set(replay.exit_layers.tolist())) > 1, "the test needs several distinct exit layers"
    if name == "raee":  # keys at layer 1: every example computed at least one layer
        assert torch.equal(replay.layers_computed, replay.exit_layers.clamp(min=1))


@pytest.mark.parametrize("name", ["entropy", "raee_dynamic", "raee_choice"])
def test_calibration_never_reads_the_test_split(tiny, tmp_path, name):
    bb, head, dm = tiny  # its test split raises on any access
    strategy = make_strategies()[name]
    strategy.init_calibration(target="accuracy", max_drop=0.0)
    strategy.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    result = strategy.calibration_result
    assert result["split"] == "validation" and result["num_examples"] == 12
    assert strategy.get_knob() == result["value"]
    assert result["met"] and result["validation"]["accuracy"] >= result["validation"]["full_accuracy"]
    assert len(result["curve"]) == len(strategy.candidates(bb.num_layers, 3))
    if name == "raee_choice":  # vote, head and hybrid were all candidates; the chosen setting is the one in force
        assert strategy.get_settings(list(result["settings"])) == result["settings"]
        assert {p["settings"]["aggregator.weight"] for p in result["curve"]} == {0.0, 2.0}


def test_calibration_is_cached_by_content(tiny, tmp_path, monkeypatch):
    bb, head, dm = tiny
    first = make_strategies()["raee_dynamic"]
    first.init_calibration(target="mean_layer", max_layer=1.0)
    first.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    assert not first.calibration_result["cached"]
    assert first.calibration_result["validation"]["mean_layers_computed"] <= 1.0 or not first.calibration_result["met"]

    import raee.calibration.tables as tables_module

    monkeypatch.setattr(tables_module, "compute_tables", lambda *a, **k: pytest.fail("tables recomputed"))
    second = make_strategies()["raee_dynamic"]
    second.init_calibration(target="mean_layer", max_layer=1.0)
    second.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    assert second.calibration_result["cached"] and second.get_knob() == first.get_knob()
    # another target is another calibration, from the cached validation tables
    third = make_strategies()["raee_dynamic"]
    third.aggregator = VotePosterior()
    third.init_calibration(target="accuracy")
    third.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    assert not third.calibration_result["cached"]


def test_raee_dynamic_refuses_a_batch_that_lost_examples_before_its_key_layer():
    from types import SimpleNamespace

    strategy = RaeeDynamicExit(BackboneKeys(layer=1), TorchExactRetriever(), VotePosterior())
    ctx = BatchContext(num_layers=4, batch_size=3, texts=["a", "b", "c"])
    strategy.observe(SimpleNamespace(layer=0), torch.tensor([0, 2]), ctx)  # not the key layer: nothing to do
    with pytest.raises(RuntimeError, match="1 examples left before it"):
        strategy.observe(SimpleNamespace(layer=1), torch.tensor([0, 2]), ctx)


def test_rule_kinds_and_layers_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="per-layer rule.*exit=raee_dynamic"):
        RaeeExit(BackboneKeys(), TorchExactRetriever(), VotePosterior()).validate(4)
    with pytest.raises(ValueError, match="needs a per-layer rule.*exit=raee"):
        RaeeDynamicExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator())
    with pytest.raises(ValueError, match="min_layer=0 is below key_encoder.layer=2"):
        RaeeDynamicExit(BackboneKeys(layer=2), TorchExactRetriever(), VotePosterior(), min_layer=0).validate(4)
    assert RaeeDynamicExit(BackboneKeys(layer=2), TorchExactRetriever(), VotePosterior()).min_layer == 2
    with pytest.raises(ValueError, match="no default grid"):
        calibrate_on_tables(RaeeExit(BackboneKeys(), TorchExactRetriever(), _NoGrid(), target="accuracy"),
                            synthetic_validation())


class _NoGrid(RobustAggregator):
    def grid(self, num_layers, num_classes):
        return []
