"""The RAEE paper's v2 ("robust") rule, the default aggregator.

weight_j = min valid distance / distance_j (the nearest neighbour weighs 1). From each
neighbour's exit table (the layers that predict it correctly, with their probabilities) take the
entries with probability >= threshold, or, if it has none, its ``top_p`` most probable entries.
score(layer) = sum of prob * weight over those entries; exit at the argmax (earliest on ties),
or at the last layer L when no neighbour has any entry.
"""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours, nearest_weights
from raee.errors import UserError


class RobustAggregator(Aggregator):
    def __init__(self, threshold: float = 0.9, top_p: int = 3) -> None:
        if int(top_p) < 1:
            raise UserError(f"aggregator.top_p={top_p} must be at least 1 (entries kept per unsure neighbour)")
        self.threshold = float(threshold)
        self.top_p = int(top_p)

    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        weights = nearest_weights(nb)  # (Q, k), nearest = 1
        confident = nb.correct & (nb.probs >= self.threshold)  # (Q, k, L+1)
        # top_p entries of the table by probability: a stable descending sort keeps the earlier
        # layer first among equal probabilities, so exactly top_p entries are taken
        entry = torch.where(nb.correct, nb.probs, torch.full_like(nb.probs, -1.0))  # -1 = not in the table
        order = torch.sort(entry, dim=-1, descending=True, stable=True).indices[..., : self.top_p]
        top = torch.zeros_like(nb.correct).scatter_(-1, order, True) & nb.correct
        chosen = torch.where(confident.any(-1, keepdim=True), confident, top)  # (Q, k, L+1)
        scores = (torch.where(chosen, nb.probs, torch.zeros_like(nb.probs)) * weights.unsqueeze(-1)).sum(1)
        return finish(scores, empty=~chosen.flatten(1).any(-1))
