"""Aggregation rules for RAEE: the retrieved neighbours' exit information -> an exit layer per query.

- :class:`RobustAggregator`        the paper's v2 rule (default)
- :class:`CorrectLayerVote`        the paper's v1 rule
- :class:`EarliestCorrectVote`     vote for each neighbour's earliest correct layer
- :class:`SimilarityWeightedVote`  softmax(-distance / T) weighted vote over correct layers
- :class:`ConfidenceThreshold`     any rule, falling back to the last layer when unsure

Add one: subclass :class:`Aggregator`, add conf/aggregator/<name>.yaml with its ``_target_``.
"""

from raee.aggregation.base import Aggregator, ExitInfo, Neighbours, finish, gather_neighbours
from raee.aggregation.confidence import ConfidenceThreshold
from raee.aggregation.correct_vote import CorrectLayerVote
from raee.aggregation.earliest_vote import EarliestCorrectVote
from raee.aggregation.robust import RobustAggregator
from raee.aggregation.weighted_vote import SimilarityWeightedVote

__all__ = ["Aggregator", "ExitInfo", "Neighbours", "finish", "gather_neighbours", "ConfidenceThreshold",
           "CorrectLayerVote", "EarliestCorrectVote", "RobustAggregator", "SimilarityWeightedVote"]
