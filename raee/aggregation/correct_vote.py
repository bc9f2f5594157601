"""The RAEE paper's v1 rule: distribution(l) = share of neighbours that layer l gets right."""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours


class CorrectLayerVote(Aggregator):
    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        scores = nb.correct.float().sum(1)  # (Q, L+1)
        return finish(scores, empty=scores.sum(-1) == 0)
