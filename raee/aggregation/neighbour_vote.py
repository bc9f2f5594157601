"""Retrieval + confidence hybrid (exit=raee_dynamic): the neighbours' label vote for the layer's prediction.

estimate(l) = q(ŷ_l), where ŷ_l is the example's own prediction at layer l and q the neighbours'
nearness-weighted, smoothed label distribution (:func:`~raee.aggregation.base.label_vote`). The
example leaves at the first layer whose prediction enough of its neighbours share (q(ŷ_l) >= threshold).
"""

from __future__ import annotations

import torch

from raee.aggregation.base import LayerRule, Neighbours, label_vote
from raee.errors import UserError


class NeighbourVote(LayerRule):
    def __init__(self, threshold: float = 0.6, smoothing: float = 1.0) -> None:
        if float(smoothing) < 0:
            raise UserError(f"aggregator.smoothing={smoothing} must be >= 0 (pseudo-votes spread over the classes)")
        self.threshold = float(threshold)
        self.smoothing = float(smoothing)

    def summarize(self, nb: Neighbours, num_classes: int) -> torch.Tensor:
        return label_vote(nb, num_classes, self.smoothing)  # (Q, C)

    def estimate(self, layer: int, logits: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        return summary.to(logits.device).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
