"""Every aggregation rule on hand-made exit information with an answer worked out by hand."""

from __future__ import annotations

import pytest
import torch

from raee.aggregation import (ConfidenceThreshold, CorrectLayerVote, EarliestCorrectVote, ExitInfo,
                              RobustAggregator, SimilarityWeightedVote)

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
