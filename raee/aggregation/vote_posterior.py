"""Retrieval + confidence hybrid (exit=raee_dynamic): the head and the neighbours as two experts.

posterior_l(c) ∝ p_l(c) * q(c)^weight, with p_l = softmax(z_l) the example's own head distribution at layer l
and q the neighbours' nearness-weighted, smoothed label distribution (:func:`~raee.aggregation.base.label_vote`);
so posterior_l = softmax(z_l + weight * log q). estimate(l) = posterior_l(ŷ_l), the combined belief in the
head's prediction ŷ_l = argmax z_l. A confident head that its neighbours agree with leaves early;
disagreement or doubt keeps the example running.
"""

from __future__ import annotations

import numpy as np
import torch

from raee.aggregation.base import LayerRule, Neighbours, label_vote_array
from raee.errors import UserError


class VotePosterior(LayerRule):
    def __init__(self, threshold: float = 0.9, weight: float = 2.0, smoothing: float = 1.0) -> None:
        if float(weight) < 0:
            raise UserError(f"aggregator.weight={weight} must be >= 0 (0 ignores the neighbours: a max-probability rule)")
        if float(smoothing) <= 0:
            raise UserError(f"aggregator.smoothing={smoothing} must be > 0 (keeps every class possible)")
        self.threshold = float(threshold)
        self.weight = float(weight)
        self.smoothing = float(smoothing)

    def summarize(self, nb: Neighbours, num_classes: int) -> torch.Tensor:
        """(Q, C) weight x log of the neighbours' label vote (> 0 everywhere: smoothing > 0)."""
        return torch.from_numpy(self.weight * np.log(label_vote_array(nb, num_classes, self.smoothing)))

    def estimate(self, layer: int, logits: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # log p_l up to a per-row constant, which the softmax cancels
        posterior = torch.softmax(logits + summary.to(logits.device), dim=-1)
        return posterior.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
