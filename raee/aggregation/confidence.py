"""Confidence threshold: keep the base rule's choice only when its distribution is peaked enough
(max >= threshold); otherwise fall back to the last layer L (play safe)."""

from __future__ import annotations

import torch

from raee.aggregation.base import Aggregator, ExitInfo
from raee.errors import UserError


class ConfidenceThreshold(Aggregator):
    def __init__(self, base: Aggregator, threshold: float = 0.5) -> None:
        if not callable(getattr(base, "choose", None)):
            raise UserError(f"aggregator.base must be an aggregation rule (with choose()), got {type(base).__name__}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise UserError(f"aggregator.threshold={threshold} must be in [0, 1] (a probability)")
        self.base = base
        self.threshold = float(threshold)

    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """The base rule's (layers, distribution), with unsure rows sent to L; the distribution is the base's."""
        layers, distribution = self.base.choose(distances, ids, info)
        unsure = distribution.max(-1).values < self.threshold
        return torch.where(unsure, torch.full_like(layers, info.num_layers), layers), distribution
