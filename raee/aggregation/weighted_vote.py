"""Similarity-weighted vote: weights w = softmax(-distance / temperature) over the valid neighbours;
distribution(l) = sum_j w_j * [layer l gets neighbour j right], normalised; argmax, earliest on ties."""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours
from raee.errors import UserError


class SimilarityWeightedVote(Aggregator):
    def __init__(self, temperature: float = 0.1) -> None:
        if not float(temperature) > 0:
            raise UserError(f"aggregator.temperature={temperature} must be > 0 (smaller = trust the nearest more)")
        self.temperature = float(temperature)

    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        logits = torch.where(nb.valid, -nb.distances / self.temperature, torch.full_like(nb.distances, -torch.inf))
        # rows without a valid neighbour would softmax to NaN: give them logits 0 and weights 0
        any_valid = nb.valid.any(-1, keepdim=True)  # (Q, 1)
        weights = torch.softmax(torch.where(any_valid, logits, torch.zeros_like(logits)), -1) * any_valid
        return finish((nb.correct.float() * weights.unsqueeze(-1)).sum(1))
