"""Each valid neighbour votes for its earliest correct layer (for L if no layer gets it right);
exit at the most voted layer (earliest on ties), or at L with no valid neighbour."""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo, finish, gather_neighbours


class EarliestCorrectVote(Aggregator):
    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        nb = gather_neighbours(distances, ids, info)
        last = nb.correct.shape[-1] - 1
        # argmax over a bool row returns its first True, i.e. the earliest correct layer
        earliest = torch.where(nb.correct.any(-1), nb.correct.to(torch.uint8).argmax(-1),
                               torch.full_like(nb.valid, last, dtype=torch.long))  # (Q, k)
        votes = torch.nn.functional.one_hot(earliest, last + 1).float() * nb.valid.unsqueeze(-1)
        return finish(votes.sum(1), empty=~nb.valid.any(-1))
