"""Neighbours' per-layer correctness, smoothed (exit=raee, planned from the neighbours alone).

estimate(l) = (sum_j w_j [layer l gets neighbour j right] + strength * prior(l)) / (sum_j w_j + strength),
with nearness weights w (the nearest weighs 1) and prior(l) the share of the whole database that layer l
gets right; exit at the earliest layer whose estimate reaches ``threshold``, else at L. It does not see the
example's own head output (that is what exit=raee_dynamic adds).
"""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours, nearest_weights
from raee.errors import UserError


class NeighbourCorrectness(Aggregator):
    def __init__(self, threshold: float = 0.9, strength: float = 2.0) -> None:
        if float(strength) < 0:
            raise UserError(f"aggregator.strength={strength} must be >= 0 (pseudo-neighbours at the database prior)")
        self.threshold = float(threshold)
        self.strength = float(strength)

    def estimates(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> torch.Tensor:
        """(Q, L+1) estimated probability that each layer gets the query right."""
        nb = gather_neighbours(distances, ids, info)
        weights = nearest_weights(nb)  # (Q, k)
        prior = info.correct_share().to(weights.device)  # (L+1,)
        hits = (nb.correct.float() * weights.unsqueeze(-1)).sum(1)  # (Q, L+1)
        return (hits + self.strength * prior) / (weights.sum(1, keepdim=True) + self.strength).clamp(min=1e-12)

    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        est = self.estimates(distances, ids, info)
        reached = est >= self.threshold
        reached[:, -1] = True  # nothing reaches it: the last layer
        layers = reached.to(torch.uint8).argmax(-1)  # the earliest True
        _, distribution = finish(est)
        return layers, distribution
