"""Each neighbour votes for its earliest correct layer (the last layer if it has none);
exit at the most voted layer (earliest on ties)."""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours


class EarliestCorrectVote(Aggregator):
    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        last = nb.correct.shape[-1] - 1
        earliest = torch.where(nb.correct.any(-1), nb.correct.float().argmax(-1), torch.full_like(ids, last).long())
        votes = torch.nn.functional.one_hot(earliest, last + 1).float() * nb.valid.unsqueeze(-1)
        scores = votes.sum(1)
        return finish(scores, empty=~nb.valid.any(-1))
