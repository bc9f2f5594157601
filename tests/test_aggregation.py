"""Every aggregation rule on hand-made exit information with an answer worked out by hand."""

from __future__ import annotations

import pytest
import torch

from raee.aggregation import (ConfidenceThreshold, CorrectLayerVote, EarliestCorrectVote, ExitInfo,
                              NeighbourCorrectness, NeighbourVote, RobustAggregator, SimilarityWeightedVote,
                              VotePosterior, gather_neighbours, label_vote)

# 4 database examples, L = 3 (layers 0..3). correct[i, l] and probs[i, l] chosen by hand.
CORRECT = torch.tensor([
    [0, 1, 1, 1],   # example 0: right from layer 1
    [0, 0, 0, 1],   # example 1: only the last layer
    [1, 1, 1, 1],   # example 2: right everywhere
    [0, 0, 0, 0],   # example 3: never right
], dtype=torch.bool)
PROBS = torch.tensor([
    [0.40, 0.60, 0.95, 0.97],
    [0.50, 0.50, 0.60, 0.80],
    [0.92, 0.70, 0.70, 0.99],
    [0.90, 0.90, 0.90, 0.90],
])
INFO = ExitInfo(preds=torch.zeros(4, 4, dtype=torch.long), probs=PROBS, correct=CORRECT,
                labels=torch.zeros(4, dtype=torch.long))


def choose(rule, dists, ids):
    layers, dist = rule.choose(torch.tensor(dists), torch.tensor(ids), INFO)
    assert torch.allclose(dist.sum(-1), torch.ones(len(ids))), "the distribution must sum to 1"
    return layers.tolist(), dist


def test_robust_rule_by_hand():
    # query 0: neighbours 0 (d=0.1) and 1 (d=0.2): weights 1 and 0.5.
    #   ex0 confident (>=0.9) entries: layers 2 (0.95), 3 (0.97); ex1 none -> top_p=2 correct: layer 3 (0.8)
    #   scores: l2 = 0.95, l3 = 0.97 + 0.5 * 0.8 = 1.37 -> layer 3
    # query 1: neighbour 2 alone: confident entries l0 (0.92), l3 (0.99) -> layer 3
    layers, dist = choose(RobustAggregator(threshold=0.9, top_p=2), [[0.1, 0.2], [0.3, 0.3]], [[0, 1], [2, -1]])
    assert layers == [3, 3]
    torch.testing.assert_close(dist[0], torch.tensor([0.0, 0.0, 0.95, 1.37]) / 2.32, atol=1e-5, rtol=1e-5)


def test_robust_rule_falls_back_to_top_p_and_prefers_earliest_on_ties():
    # neighbour 2 at threshold 0.995: no confident entry -> its top_p=2 correct entries: l3 (0.99), l0 (0.92)
    layers, _ = choose(RobustAggregator(threshold=0.995, top_p=2), [[0.5]], [[2]])
    assert layers == [3]
    # equal probabilities everywhere -> earliest layer among the top entries
    info = ExitInfo(preds=torch.zeros(1, 4, dtype=torch.long), probs=torch.full((1, 4), 0.5),
                    correct=torch.ones(1, 4, dtype=torch.bool), labels=torch.zeros(1, dtype=torch.long))
    layers, _ = RobustAggregator(threshold=0.9, top_p=4).choose(torch.tensor([[0.1]]), torch.tensor([[0]]), info)
    assert layers.tolist() == [0]


def test_robust_rule_nearest_duplicate_dominates():
    # distance 0 (an exact duplicate) gets weight 1, a far neighbour ~0: ex0 decides (layer 3 = 0.97 > 0.95)
    layers, _ = choose(RobustAggregator(threshold=0.9), [[0.0, 5.0]], [[0, 2]])
    assert layers == [3]
    layers, dist = choose(RobustAggregator(threshold=0.9), [[0.0, 5.0]], [[2, 0]])
    assert layers == [3] and dist[0, 0] > 0.4  # ex2's layer 0 (0.92) counts at full weight


@pytest.mark.parametrize("rule", [RobustAggregator(), CorrectLayerVote(), EarliestCorrectVote(),
                                  SimilarityWeightedVote(0.1), ConfidenceThreshold(RobustAggregator(), 0.5)])
def test_no_valid_or_no_correct_neighbour_exits_at_the_last_layer(rule):
    layers, dist = choose(rule, [[0.1, 0.2], [0.1, float("nan")]], [[-1, -1], [3, 1]])
    assert layers[0] == 3
    assert dist[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    if not isinstance(rule, EarliestCorrectVote):
        # query 1: ex3 never right, ex1's distance is not finite (invalid) -> nothing to go on
        assert layers[1] == 3


def test_correct_layer_vote_by_hand():
    # neighbours 0, 1, 2: correct counts per layer = [1, 2, 2, 3] -> layer 3
    layers, dist = choose(CorrectLayerVote(), [[0.1, 0.2, 0.3]], [[0, 1, 2]])
    assert layers == [3]
    torch.testing.assert_close(dist[0], torch.tensor([1.0, 2.0, 2.0, 3.0]) / 8)
    # neighbours 0 and 2: counts [1, 2, 2, 2] -> earliest of the tied maxima: layer 1
    assert choose(CorrectLayerVote(), [[0.1, 0.2]], [[0, 2]])[0] == [1]


def test_earliest_correct_vote_by_hand():
    # earliest correct layers: ex0 -> 1, ex1 -> 3, ex2 -> 0, ex3 -> none (votes L=3)
    assert choose(EarliestCorrectVote(), [[0.1] * 4], [[0, 1, 2, 3]])[0] == [3]  # votes l1:1, l3:2, l0:1
    assert choose(EarliestCorrectVote(), [[0.1] * 3], [[0, 2, 0]])[0] == [1]  # l1:2, l0:1


def test_similarity_weighted_vote_by_hand():
    # neighbours ex2 (d=0) and ex1 (d=0.1), T=0.1: weights e^0, e^-1 normalised
    w2, w1 = 1 / (1 + torch.e ** -1), torch.e ** -1 / (1 + torch.e ** -1)
    layers, dist = choose(SimilarityWeightedVote(0.1), [[0.0, 0.1]], [[2, 1]])
    expected = torch.tensor([w2, w2, w2, w2 + w1])
    torch.testing.assert_close(dist[0], expected / expected.sum())
    assert layers == [3]
    # a very small temperature trusts the nearest alone: ex2 right everywhere -> earliest = layer 0
    assert choose(SimilarityWeightedVote(0.001), [[0.0, 0.1]], [[2, 1]])[0] == [0]
    with pytest.raises(ValueError, match="must be > 0"):
        SimilarityWeightedVote(0.0)


def test_confidence_threshold_falls_back_when_the_distribution_is_flat():
    base = CorrectLayerVote()
    # counts [1, 2, 2, 3] / 8: max 0.375 -> below 0.5 -> last layer (here also the base choice)
    # neighbours 0 and 2: [1, 2, 2, 2] / 7, base picks 1, max 0.286 < 0.5 -> fallback to 3
    assert choose(ConfidenceThreshold(base, 0.5), [[0.1, 0.2]], [[0, 2]])[0] == [3]
    assert choose(ConfidenceThreshold(base, 0.25), [[0.1, 0.2]], [[0, 2]])[0] == [1]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ConfidenceThreshold(base, 1.5)


def test_robust_rule_takes_exactly_top_p_entries_earliest_first_on_equal_probabilities():
    # ex: right at every layer with equal probability 0.5 (< threshold): top_p=2 keeps layers 0 and 1 only
    info = ExitInfo(preds=torch.zeros(1, 4, dtype=torch.long), probs=torch.full((1, 4), 0.5),
                    correct=torch.ones(1, 4, dtype=torch.bool), labels=torch.zeros(1, dtype=torch.long))
    layers, dist = RobustAggregator(threshold=0.9, top_p=2).choose(torch.tensor([[0.3]]), torch.tensor([[0]]), info)
    assert layers.tolist() == [0]
    assert dist[0].tolist() == [0.5, 0.5, 0.0, 0.0]


def test_robust_rule_threshold_and_top_p_by_hand():
    # query: ex0 (d=0.2, weight 1), ex1 (d=0.4, weight 0.5), ex2 (d=0.8, weight 0.25)
    dists, ids = [[0.2, 0.4, 0.8]], [[0, 1, 2]]
    # threshold 0.9: ex0 -> l2 0.95, l3 0.97; ex1 none confident -> top 1 correct: l3 0.8; ex2 -> l0 0.92, l3 0.99
    # scores: l0 0.25*0.92=0.23, l2 0.95, l3 0.97 + 0.4 + 0.2475 = 1.6175
    layers, dist = choose(RobustAggregator(threshold=0.9, top_p=1), dists, ids)
    expected = torch.tensor([0.23, 0.0, 0.95, 1.6175])
    torch.testing.assert_close(dist[0], expected / expected.sum())
    assert layers == [3]
    # threshold 0.6: ex0 -> l2, l3 (l1 = 0.6 counts too: >= threshold); ex1 -> l3 0.8; ex2 -> all four
    # scores: l0 0.23, l1 0.6 + 0.175 = 0.775, l2 0.95 + 0.175 = 1.125, l3 0.97 + 0.4 + 0.2475 = 1.6175
    layers, dist = choose(RobustAggregator(threshold=0.6, top_p=1), dists, ids)
    expected = torch.tensor([0.23, 0.775, 1.125, 1.6175])
    torch.testing.assert_close(dist[0], expected / expected.sum())
    # threshold 1.0 (nothing confident), top_p = 1: each neighbour's single most probable correct layer:
    # ex0 l3 0.97 (w 1), ex1 l3 0.8 (w 0.5), ex2 l3 0.99 (w 0.25) -> only layer 3
    layers, dist = choose(RobustAggregator(threshold=1.0, top_p=1), dists, ids)
    assert layers == [3] and dist[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="top_p=0"):
        RobustAggregator(top_p=0)


def test_robust_rule_can_exit_early_when_near_neighbours_agree():
    # ex2 (d=0.1, w 1): l0 0.92, l3 0.99; ex0 (d=1.0, w 0.1): l2 0.95, l3 0.97
    # scores: l0 0.92, l2 0.095, l3 0.99 + 0.097 = 1.087 -> layer 3
    assert choose(RobustAggregator(), [[0.1, 1.0]], [[2, 0]])[0] == [3]
    # a table that is surest early: ex0 right at layers 0 and 1 only (0.95, 0.97), ex1 never right.
    # ex1 is nearer (d=0.01, weight 1) but has no entries; ex0 weighs 0.01 / 0.05 = 0.2
    info = ExitInfo(preds=torch.zeros(2, 3, dtype=torch.long), probs=torch.tensor([[0.95, 0.97, 0.5], [0.3, 0.4, 0.5]]),
                    correct=torch.tensor([[True, True, False], [False, False, False]]),
                    labels=torch.zeros(2, dtype=torch.long))
    layers, dist = RobustAggregator().choose(torch.tensor([[0.05, 0.01]]), torch.tensor([[0, 1]]), info)
    assert layers.tolist() == [1]  # scores l0 0.19, l1 0.194, l2 0
    torch.testing.assert_close(dist[0], torch.tensor([0.95, 0.97, 0.0]) / 1.92)


def test_invalid_neighbours_contribute_nothing():
    # the invalid hits (id -1, infinite distance) sit closest; the answer is the one of ex1 alone
    ids, dists = [[-1, 2, 1]], [[0.0, float("inf"), 0.3]]
    for rule in (RobustAggregator(), CorrectLayerVote(), EarliestCorrectVote(), SimilarityWeightedVote()):
        layers, dist = choose(rule, dists, ids)
        assert layers == [3] and dist[0].tolist() == [0.0, 0.0, 0.0, 1.0], type(rule).__name__


def test_earliest_vote_ties_go_to_the_earliest_layer():
    # ex0 votes 1, ex2 votes 0: one vote each -> layer 0; distribution [0.5, 0.5, 0, 0]
    layers, dist = choose(EarliestCorrectVote(), [[0.1, 0.2]], [[0, 2]])
    assert layers == [0] and dist[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    # ex3 (never right) votes L, ex0 votes 1 -> tie -> 1
    assert choose(EarliestCorrectVote(), [[0.1, 0.2]], [[3, 0]])[0] == [1]


def test_confidence_keeps_the_base_distribution_and_confident_choices():
    base = RobustAggregator(threshold=0.9)
    rule = ConfidenceThreshold(base, 0.5)
    dists, ids = [[0.3], [0.1]], [[1], [0]]
    # q0: ex1 alone, no confident entry -> top 3 correct = only l3 -> distribution one-hot at 3 (max 1)
    # q1: ex0 alone: l2 0.95, l3 0.97 -> max 0.97/1.92 = 0.505 >= 0.5 -> keep 3
    layers, dist = choose(rule, dists, ids)
    base_layers, base_dist = choose(base, dists, ids)
    assert torch.equal(dist, base_dist) and layers == base_layers == [3, 3]
    # where the fallback changes the answer: CorrectLayerVote on ex0 + ex2 picks layer 1 with 2/7 = 0.286
    assert choose(ConfidenceThreshold(CorrectLayerVote(), 0.0), [[0.1, 0.2]], [[0, 2]])[0] == [1]
    assert choose(ConfidenceThreshold(CorrectLayerVote(), 1.0), [[0.1, 0.2]], [[0, 2]])[0] == [3]
    with pytest.raises(ValueError, match="aggregation rule"):
        ConfidenceThreshold("robust", 0.5)


@pytest.mark.parametrize("rule", [RobustAggregator(), RobustAggregator(0.5, 1), CorrectLayerVote(),
                                  EarliestCorrectVote(), SimilarityWeightedVote(0.05), NeighbourCorrectness(0.5),
                                  ConfidenceThreshold(SimilarityWeightedVote(0.05), 0.3)])
def test_batched_choice_equals_one_query_at_a_time(rule):
    """Vectorised over queries: a batch gives what each query gives alone (random tables, -1 hits)."""
    gen = torch.Generator().manual_seed(0)
    n, layers_, q, k = 30, 6, 25, 5
    probs = torch.rand(n, layers_, generator=gen)
    correct = torch.rand(n, layers_, generator=gen) < 0.4
    info = ExitInfo(preds=torch.zeros(n, layers_, dtype=torch.long), probs=probs, correct=correct,
                    labels=torch.zeros(n, dtype=torch.long))
    ids = torch.randint(0, n, (q, k), generator=gen)
    ids[torch.rand(q, k, generator=gen) < 0.2] = -1
    ids[0] = -1  # one query with no valid neighbour at all
    dists = torch.rand(q, k, generator=gen)
    layers, dist = rule.choose(dists, ids, info)
    assert layers.shape == (q,) and layers.dtype == torch.long and dist.shape == (q, layers_)
    assert dist.dtype == torch.float32 and torch.allclose(dist.sum(-1), torch.ones(q)) and (dist >= 0).all()
    assert layers[0] == layers_ - 1
    for i in range(q):
        one_layer, one_dist = rule.choose(dists[i:i + 1], ids[i:i + 1], info)
        assert one_layer.item() == layers[i].item()
        torch.testing.assert_close(one_dist[0], dist[i])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="outside the exit database .4 examples.*build_db"):
        RobustAggregator().choose(torch.tensor([[0.1]]), torch.tensor([[4]]), INFO)
    with pytest.raises(ValueError, match=r"must both be \(Q, k\)"):
        CorrectLayerVote().choose(torch.tensor([0.1, 0.2]), torch.tensor([[0, 1]]), INFO)
    with pytest.raises(ValueError, match="ExitInfo.probs has shape"):
        ExitInfo(preds=torch.zeros(4, 4, dtype=torch.long), probs=PROBS[:, :3], correct=CORRECT,
                 labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ExitInfo.labels"):
        ExitInfo(preds=torch.zeros(4, 4, dtype=torch.long), probs=PROBS, correct=CORRECT,
                 labels=torch.zeros(3, dtype=torch.long))
    assert INFO.num_layers == 3 and INFO.size == 4


def test_aggregator_configs_instantiate():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "aggregator"
    expected = {"robust": RobustAggregator, "correct_vote": CorrectLayerVote, "earliest_vote": EarliestCorrectVote,
                "weighted_vote": SimilarityWeightedVote, "confidence": ConfidenceThreshold}
    for name, cls in expected.items():
        assert type(instantiate(OmegaConf.load(conf / f"{name}.yaml"))) is cls
    confidence = instantiate(OmegaConf.load(conf / "confidence.yaml"))
    assert isinstance(confidence.base, RobustAggregator)


# ------------------------------------------------------------------ rules that estimate P(right at layer l)
# 3 database examples with labels 0, 0, 1 (two classes); per-layer tables for L = 2
LABELLED = ExitInfo(preds=torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1]]),
                    probs=torch.tensor([[0.6, 0.7, 0.9], [0.8, 0.9, 0.9], [0.6, 0.7, 0.8]]),
                    correct=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool),
                    labels=torch.tensor([0, 0, 1]))
# one query; distances 0.1, 0.2, 0.1 -> nearness weights 1, 0.5, 1 -> label votes 1.5 (class 0), 1 (class 1)
NB = gather_neighbours(torch.tensor([[0.1, 0.2, 0.1]]), torch.tensor([[0, 1, 2]]), LABELLED)


def test_label_vote_by_hand():
    torch.testing.assert_close(label_vote(NB, 2, smoothing=0.0), torch.tensor([[0.6, 0.4]]))
    torch.testing.assert_close(label_vote(NB, 2, smoothing=1.0), torch.tensor([[2.0 / 3.5, 1.5 / 3.5]]))
    # invalid neighbours vote nothing; with none valid the vote is uniform
    none = gather_neighbours(torch.tensor([[0.1, 0.2]]), torch.tensor([[-1, -1]]), LABELLED)
    torch.testing.assert_close(label_vote(none, 2, smoothing=0.0), torch.tensor([[0.5, 0.5]]))


def test_label_vote_matches_a_loop_over_neighbours_and_refuses_foreign_labels():
    gen = torch.Generator().manual_seed(1)
    n, q, k, classes = 20, 9, 4, 3
    info = ExitInfo(preds=torch.zeros(n, 2, dtype=torch.long), probs=torch.rand(n, 2, generator=gen),
                    correct=torch.rand(n, 2, generator=gen) < 0.5, labels=torch.randint(0, classes, (n,), generator=gen))
    ids = torch.randint(0, n, (q, k), generator=gen)
    ids[torch.rand(q, k, generator=gen) < 0.3] = -1
    ids[0] = -1  # no valid neighbour: uniform
    dists = torch.rand(q, k, generator=gen)
    dists[1, 0], dists[2, 1] = float("inf"), 0.0  # a missing hit; an exact duplicate (floored at EPS)
    votes = label_vote(gather_neighbours(dists, ids, info), classes, smoothing=0.5)
    assert votes.shape == (q, classes) and votes.dtype == torch.float32
    for i in range(q):
        hits = [(max(float(d), 1e-6), int(info.labels[j])) for d, j in zip(dists[i], ids[i])
                if j >= 0 and torch.isfinite(d)]
        want = torch.full((classes,), 0.5 / classes)
        for d, label in hits:
            want[label] += min(h for h, _ in hits) / d
        torch.testing.assert_close(votes[i], want / want.sum())
    assert torch.allclose(votes[0], torch.full((classes,), 1.0 / classes))
    with pytest.raises(ValueError, match="head has 2 classes.*build_db"):
        label_vote(gather_neighbours(dists, ids, info), 2)


def test_neighbour_vote_estimates_the_share_voting_for_the_layer_prediction():
    rule = NeighbourVote(threshold=0.5, smoothing=0.0)
    summary = rule.summarize(NB, 2)
    # the head predicts class 0 (logits 2 vs -1) or class 1: the vote for that class
    assert rule.estimate(1, torch.tensor([[2.0, -1.0]]), summary).item() == pytest.approx(0.6)
    assert rule.estimate(1, torch.tensor([[-3.0, 0.5]]), summary).item() == pytest.approx(0.4)
    # the head's confidence does not matter, only its prediction
    assert rule.estimate(0, torch.tensor([[0.01, 0.0]]), summary).item() == pytest.approx(0.6)


def test_vote_posterior_by_hand():
    nb2 = gather_neighbours(torch.tensor([[0.1, 0.2, 0.1], [0.1, 0.2, 0.1]]), torch.tensor([[0, 1, 2], [0, 1, 2]]),
                            LABELLED)
    probs = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    logits = probs.log() + torch.tensor([[3.0], [-1.0]])  # any per-row shift: the same head distribution
    # vote (smoothing 1): [2/3.5, 1.5/3.5]; posterior(c) ∝ p(c) * vote(c)
    v0, v1 = 2.0 / 3.5, 1.5 / 3.5
    want = torch.tensor([0.7 * v0 / (0.7 * v0 + 0.3 * v1), 0.7 * v1 / (0.7 * v1 + 0.3 * v0)])
    rule = VotePosterior(weight=1.0, smoothing=1.0)
    torch.testing.assert_close(rule.estimate(2, logits, rule.summarize(nb2, 2)), want)
    # weight 2: the vote counts twice, p(c) * vote(c)^2
    want2 = torch.tensor([0.7 * v0 ** 2 / (0.7 * v0 ** 2 + 0.3 * v1 ** 2), 0.7 * v1 ** 2 / (0.7 * v1 ** 2 + 0.3 * v0 ** 2)])
    torch.testing.assert_close(VotePosterior(weight=2.0).estimate(2, logits, VotePosterior(weight=2.0).summarize(nb2, 2)),
                               want2)
    # weight 0 ignores the neighbours: the head's own max probability
    flat = VotePosterior(weight=0.0)
    torch.testing.assert_close(flat.estimate(2, logits, flat.summarize(nb2, 2)), torch.tensor([0.7, 0.7]))
    with pytest.raises(ValueError, match="smoothing"):
        VotePosterior(smoothing=0.0)


class Unreadable:
    """A per-layer table that fails when read: a rule that only needs labels must not touch it."""

    shape = CORRECT.shape
    device = torch.device("cpu")

    def __getitem__(self, rows):
        raise AssertionError("a label-only rule read a per-layer table")


@pytest.mark.parametrize("rule", [VotePosterior(), NeighbourVote()])
def test_label_rules_read_no_per_layer_table(rule):
    labels = torch.tensor([0, 1, 0, 1])
    info = ExitInfo(preds=Unreadable(), probs=Unreadable(), correct=Unreadable(), labels=labels)
    nb = gather_neighbours(torch.tensor([[0.1, 0.2]]), torch.tensor([[0, 1]]), info)
    estimate = rule.estimate(1, torch.tensor([[0.9, 0.1]]), rule.summarize(nb, 2))
    assert estimate.shape == (1,)
    with pytest.raises(AssertionError, match="read a per-layer table"):
        nb.correct  # noqa: B018 - read on first use
    # on real tables the lazy fields equal an eager read
    nb = gather_neighbours(torch.tensor([[0.1, float("inf")]]), torch.tensor([[2, 0]]), INFO)
    assert nb.correct.tolist() == [[CORRECT[2].tolist(), [False] * 4]]
    torch.testing.assert_close(nb.probs, torch.stack([PROBS[2], torch.zeros(4)]).unsqueeze(0))
    assert nb.preds[0, 1].tolist() == [-1] * 4


def test_neighbour_correctness_by_hand():
    # weights 1, 0.5, 1; correct per layer: [0,1,0], [1,1,1], [1,1,1] -> shares 0.5/2.5, 1, 1
    rule = NeighbourCorrectness(threshold=0.9, strength=0.0)
    est = rule.estimates(torch.tensor([[0.1, 0.2, 0.1]]), torch.tensor([[0, 1, 2]]), LABELLED)
    torch.testing.assert_close(est, torch.tensor([[0.2, 1.0, 1.0]]))
    layers, dist = rule.choose(torch.tensor([[0.1, 0.2, 0.1]]), torch.tensor([[0, 1, 2]]), LABELLED)
    assert layers.tolist() == [1] and torch.allclose(dist.sum(-1), torch.ones(1))
    # strength 2: two pseudo-neighbours at the database-wide share (1/3, 1, 1)
    smoothed = NeighbourCorrectness(threshold=0.25, strength=2.0)
    est = smoothed.estimates(torch.tensor([[0.1, 0.2, 0.1]]), torch.tensor([[0, 1, 2]]), LABELLED)
    assert est[0, 0].item() == pytest.approx((0.5 + 2 / 3) / 4.5)
    assert smoothed.choose(torch.tensor([[0.1, 0.2, 0.1]]), torch.tensor([[0, 1, 2]]), LABELLED)[0].tolist() == [0]
    # nothing reaches the threshold: the last layer
    assert NeighbourCorrectness(threshold=1.1).choose(torch.tensor([[0.1]]), torch.tensor([[0]]),
                                                      LABELLED)[0].tolist() == [2]


def test_new_rule_configs_instantiate():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "aggregator"
    for name, cls in {"neighbour_vote": NeighbourVote, "vote_posterior": VotePosterior,
                      "neighbour_correctness": NeighbourCorrectness}.items():
        assert type(instantiate(OmegaConf.load(conf / f"{name}.yaml"))) is cls
