"""Aggregation rules for RAEE. Add one: subclass Aggregator, add conf/aggregator/<name>.yaml."""

from raee.aggregation.base import Aggregator, ExitInfo, Neighbours, gather_neighbours
from raee.aggregation.confidence import ConfidenceThreshold
from raee.aggregation.correct_vote import CorrectLayerVote
from raee.aggregation.earliest_vote import EarliestCorrectVote
from raee.aggregation.robust import RobustAggregator
from raee.aggregation.weighted_vote import SimilarityWeightedVote

__all__ = ["Aggregator", "ExitInfo", "Neighbours", "gather_neighbours", "ConfidenceThreshold", "CorrectLayerVote",
           "EarliestCorrectVote", "RobustAggregator", "SimilarityWeightedVote"]
