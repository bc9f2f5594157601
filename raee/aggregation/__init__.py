"""Aggregation rules for RAEE: the retrieved neighbours' exit information -> an exit layer per query.

- :class:`RobustAggregator`        the paper's v2 rule (default)
- :class:`CorrectLayerVote`        the paper's v1 rule
- :class:`EarliestCorrectVote`     vote for each neighbour's earliest correct layer
- :class:`SimilarityWeightedVote`  softmax(-distance / T) weighted vote over correct layers
- :class:`ConfidenceThreshold`     any rule, falling back to the last layer when unsure
- :class:`NeighbourCorrectness`    earliest layer whose smoothed neighbour correctness reaches a threshold

Per-layer rules of the retrieval + confidence hybrid (exit=raee_dynamic, :class:`LayerRule`):

- :class:`NeighbourVote`           the neighbours' label vote for the layer's own prediction
- :class:`VotePosterior`           head distribution x neighbours' label vote, belief in the head's prediction

Add one: subclass :class:`Aggregator` (or :class:`LayerRule`), add conf/aggregator/<name>.yaml with its
``_target_``.
"""

from raee.aggregation.base import (Aggregator, ExitInfo, LayerRule, Neighbours, finish, gather_neighbours, label_vote,
                                   nearest_weights)
from raee.aggregation.confidence import ConfidenceThreshold
from raee.aggregation.correct_vote import CorrectLayerVote
from raee.aggregation.earliest_vote import EarliestCorrectVote
from raee.aggregation.neighbour_correctness import NeighbourCorrectness
from raee.aggregation.neighbour_vote import NeighbourVote
from raee.aggregation.robust import RobustAggregator
from raee.aggregation.vote_posterior import VotePosterior
from raee.aggregation.weighted_vote import SimilarityWeightedVote

__all__ = ["Aggregator", "ExitInfo", "LayerRule", "Neighbours", "finish", "gather_neighbours", "label_vote",
           "nearest_weights", "ConfidenceThreshold", "CorrectLayerVote", "EarliestCorrectVote", "NeighbourCorrectness",
           "NeighbourVote", "RobustAggregator", "SimilarityWeightedVote", "VotePosterior"]
