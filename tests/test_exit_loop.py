"""The exit loop: exited examples leave the batch and never reach later layers; each rule exits
exactly where it should on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from raee.backbones.base import LayerState
from raee.exit_loop import run_early_exit
from raee.exits import EntropyExit, FixedLayer, FullModel, OracleExit, PatienceExit, PlannedExit, BatchContext
from raee.heads.base import Head
from tests.conftest import TEXTS


class ScriptedHead(Head):
    """Returns hand-made logits per (example, layer); the example is recognised by its first word's id."""

    def __init__(self, table: dict[int, torch.Tensor], num_classes: int) -> None:
        super().__init__()
        self.table = table  # first-token id -> (L+1, C) logits
        self.label_names = [str(i) for i in range(num_classes)]
        self.seen: list[tuple[int, int]] = []  # (example first-token id, layer) for every head call

    def forward(self, state: LayerState) -> torch.Tensor:
        keys = state.input_ids[:, 1].tolist()
        self.seen += [(k, state.layer) for k in keys]
        return torch.stack([self.table[k][state.layer] for k in keys])


def scripted(backbone, per_example_preds: list[list[int]], num_classes: int = 3, confident: float = 8.0):
    """Head whose layer-l prediction for example i is per_example_preds[i][l] (confident logits)."""
    enc = backbone.tokenize(TEXTS[: len(per_example_preds)])
    table = {}
    for i, preds in enumerate(per_example_preds):
        logits = torch.zeros(len(preds), num_classes)
        logits[torch.arange(len(preds)), torch.tensor(preds)] = confident
        table[int(enc["input_ids"][i, 1])] = logits
    return ScriptedHead(table, num_classes), enc


def ctx_for(backbone, n, labels=None):
    return BatchContext(num_layers=backbone.num_layers, batch_size=n, texts=TEXTS[:n], labels=labels)


class PerExamplePlan(PlannedExit):
    name = "scripted_plan"

    def __init__(self, layers, plan_layer=0):
        self.layers = torch.tensor(layers)
        self.plan_layer = plan_layer

    def plan(self, state, ctx):
        return self.layers.clone()


def test_fixed_exit_never_computes_later_layers(tiny_bert):
    head, enc = scripted(tiny_bert, [[0, 1, 2, 0, 1]] * 4)
    res = run_early_exit(tiny_bert, head, FixedLayer(2), enc, ctx_for(tiny_bert, 4))
    assert res.exit_layers.tolist() == [2] * 4
    assert res.predictions.tolist() == [2] * 4
    assert tiny_bert.layer_examples == [0, 4, 4, 0, 0]


def test_exited_examples_leave_the_batch(tiny_bert):
    plan = [0, 1, 3, 4, 2, 4]
    head, enc = scripted(tiny_bert, [[0, 1, 2, 0, 1]] * 6)
    res = run_early_exit(tiny_bert, head, PerExamplePlan(plan), enc, ctx_for(tiny_bert, 6))
    assert res.exit_layers.tolist() == plan
    # layer l runs on exactly the examples whose exit is >= l
    assert tiny_bert.layer_examples == [0] + [sum(p >= l for p in plan) for l in range(1, 5)]
    # the head is read once per example, at its exit layer only
    assert sorted(layer for _, layer in head.seen) == sorted(plan)


def test_exit_at_layer_zero_runs_no_layer(tiny_bert):
    head, enc = scripted(tiny_bert, [[1, 0, 0, 0, 0]] * 3)
    res = run_early_exit(tiny_bert, head, FixedLayer(0), enc, ctx_for(tiny_bert, 3))
    assert res.predictions.tolist() == [1, 1, 1]
    assert sum(tiny_bert.layer_examples) == 0


def test_plan_after_a_later_layer_reads_earlier_exits_from_kept_states(tiny_bert):
    plan = [0, 1, 2, 4]
    preds = [[0, 1, 2, 0, 1], [2, 0, 1, 1, 1], [1, 1, 0, 2, 2], [0, 0, 0, 0, 2]]
    head, enc = scripted(tiny_bert, preds)
    res = run_early_exit(tiny_bert, head, PerExamplePlan(plan, plan_layer=2), enc, ctx_for(tiny_bert, 4))
    assert res.exit_layers.tolist() == plan
    assert res.predictions.tolist() == [preds[i][plan[i]] for i in range(4)]
    assert tiny_bert.layer_examples == [0, 4, 4, 1, 1]


def test_early_exit_logits_equal_full_pass_logits(tiny_bert):
    """An example's exit-layer prediction does not depend on who else is in the batch."""
    from raee.heads import PrototypeHead

    head = PrototypeHead()
    head.label_names = ["a", "b", "c"]
    head.num_layers = tiny_bert.num_layers
    head.prototypes = torch.nn.functional.normalize(torch.randn(5, 3, 32), dim=-1)
    head.centers = torch.randn(5, 32)
    enc = tiny_bert.tokenize(TEXTS)
    plan = [1, 4, 2, 3, 0, 4]
    res = run_early_exit(tiny_bert, head, PerExamplePlan(plan), enc, ctx_for(tiny_bert, 6))
    states = tiny_bert.all_layers(**enc)
    expected = torch.stack([head(states[p])[i] for i, p in enumerate(plan)])
    torch.testing.assert_close(res.logits, expected, atol=1e-5, rtol=1e-5)


def test_full_model_runs_every_layer(tiny_bert):
    head, enc = scripted(tiny_bert, [[0, 1, 2, 0, 1]] * 2)
    res = run_early_exit(tiny_bert, head, FullModel(), enc, ctx_for(tiny_bert, 2))
    assert res.exit_layers.tolist() == [4, 4]
    assert res.predictions.tolist() == [1, 1]


def test_oracle_exits_at_earliest_correct_layer(tiny_bert):
    preds = [[0, 1, 2, 2, 2], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    labels = torch.tensor([2, 1, 2])  # correct from layer 2; from layer 0; never
    head, enc = scripted(tiny_bert, preds)
    res = run_early_exit(tiny_bert, head, OracleExit(), enc, ctx_for(tiny_bert, 3, labels))
    assert res.exit_layers.tolist() == [2, 0, 4]
    assert res.predictions.tolist() == [2, 1, 0]


def test_entropy_exits_at_first_layer_below_threshold(tiny_bert):
    enc = tiny_bert.tokenize(TEXTS[:3])
    # hand-made logits per layer; entropy of [a, 0, 0] falls as a grows
    sharpness = [[0.0, 0.5, 3.0, 6.0, 9.0], [0.0, 9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.1]]
    table = {}
    for i, row in enumerate(sharpness):
        logits = torch.zeros(5, 3)
        logits[:, 0] = torch.tensor(row)
        table[int(enc["input_ids"][i, 1])] = logits
    head = ScriptedHead(table, 3)
    from raee.exits import prediction_entropy

    threshold = 0.2
    expected = []
    for row in sharpness:
        ent = [float(prediction_entropy(torch.tensor([[a, 0.0, 0.0]]))) for a in row]
        below = [l for l in range(1, 5) if ent[l] < threshold]  # off-ramps from layer 1 (DeeBERT)
        expected.append(below[0] if below else 4)
    res = run_early_exit(tiny_bert, head, EntropyExit(threshold), enc, ctx_for(tiny_bert, 3))
    assert res.exit_layers.tolist() == expected == [3, 1, 4]


def test_entropy_threshold_zero_never_exits_early(tiny_bert):
    head, enc = scripted(tiny_bert, [[0, 0, 0, 0, 0]] * 2, confident=50.0)
    res = run_early_exit(tiny_bert, head, EntropyExit(0.0), enc, ctx_for(tiny_bert, 2))
    assert res.exit_layers.tolist() == [4, 4]


@pytest.mark.parametrize("patience,preds,expected", [
    # counter after layers 1..4: pred seq from layer 1 on
    (1, [9, 0, 0, 1, 1], 2),      # layers 1,2 agree -> counter 1 at layer 2
    (2, [9, 0, 0, 1, 1], 4),      # resets at layer 3, counter 1 at layer 4 -> last layer
    (2, [9, 2, 2, 2, 0], 3),      # 1,2,3 agree -> counter 2 at layer 3
    (3, [9, 1, 1, 1, 1], 4),      # reaches 3 at layer 4 (also last)
    (1, [9, 0, 1, 0, 1], 4),      # never agrees
])
def test_patience_follows_pabee_counter(tiny_bert, patience, preds, expected):
    preds = [p % 3 for p in preds]
    head, enc = scripted(tiny_bert, [preds])
    res = run_early_exit(tiny_bert, head, PatienceExit(patience), enc, ctx_for(tiny_bert, 1))
    assert res.exit_layers.tolist() == [expected]
    assert tiny_bert.layer_examples[expected + 1:] == [0] * (4 - expected)


def test_patience_ignores_layer_zero_unless_asked(tiny_bert):
    head, enc = scripted(tiny_bert, [[1, 1, 2, 2, 2]])
    assert run_early_exit(tiny_bert, head, PatienceExit(1), enc, ctx_for(tiny_bert, 1)).exit_layers.tolist() == [3]
    assert run_early_exit(tiny_bert, head, PatienceExit(1, min_layer=0), enc,
                          ctx_for(tiny_bert, 1)).exit_layers.tolist() == [1]


@pytest.mark.parametrize("make,match", [
    (lambda: EntropyExit(-0.1), "below 0"),
    (lambda: PatienceExit(0), "at least 1"),
])
def test_bad_knobs_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_patience_above_layer_count_is_refused(tiny_bert):
    with pytest.raises(ValueError, match="above the number of layers"):
        PatienceExit(5).validate(tiny_bert.num_layers)


@pytest.mark.parametrize("layer", [-1, 5])
def test_fixed_layer_outside_range_is_refused(tiny_bert, layer):
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        FixedLayer(layer).validate(tiny_bert.num_layers)
