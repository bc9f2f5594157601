"""The RAEE paper's (v2, "robust") rule, the default.

weight_j = min valid distance / distance_j (the nearest neighbour weighs 1). From each
neighbour's exit table (layers that predict it correctly, with their probabilities) take the
entries with probability >= threshold, or, if none, its ``top_p`` most probable entries.
score(layer) = sum of prob * weight over those entries; exit at the argmax (earliest on ties),
or at the last layer when no neighbour has any correct layer.
"""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours

EPS = 1e-6  # keeps exact duplicates (distance 0) at weight 1 and the rest finite


class RobustAggregator(Aggregator):
    def __init__(self, threshold: float = 0.9, top_p: int = 3) -> None:
        if top_p < 1:
            raise ValueError(f"aggregator.top_p={top_p} must be at least 1")
        self.threshold = float(threshold)
        self.top_p = int(top_p)

    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        d = nb.distances + EPS
        dmin = torch.where(nb.valid, d, torch.full_like(d, float("inf"))).min(dim=1, keepdim=True).values
        weights = torch.where(nb.valid, dmin / d, torch.zeros_like(d))  # (Q, k)
        entry = torch.where(nb.correct, nb.probs, torch.full_like(nb.probs, -1.0))  # -1 marks "not in the table"
        confident = nb.correct & (nb.probs >= self.threshold)
        # neighbours with no confident entry fall back to their top_p correct entries by probability
        top = min(self.top_p, entry.shape[-1])
        kth = entry.topk(top, dim=-1).values[..., -1:]  # (Q, k, 1)
        fallback = nb.correct & (entry >= kth) & ~confident.any(-1, keepdim=True)
        chosen = confident | fallback
        scores = (torch.where(chosen, nb.probs, torch.zeros_like(nb.probs)) * weights.unsqueeze(-1)).sum(1)
        return finish(scores, empty=~chosen.any(-1).any(-1))
