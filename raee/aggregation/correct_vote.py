"""The RAEE paper's v1 rule: distribution(l) = share of the valid neighbours that layer l gets right;
exit at the argmax (earliest on ties), or at L when no neighbour is right anywhere."""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours


class CorrectLayerVote(Aggregator):
    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        return finish(nb.correct.float().sum(1))  # (Q, L+1) counts; all-zero rows exit at L
