"""DeeBERT's entropy exit: leave at the first layer whose prediction entropy is below a threshold."""

from __future__ import annotations

from typing import Any

import torch

from raee.exits.base import BatchContext, DynamicExit


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(n, C) logits -> (n,) entropy (nats) of the softmax distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyExit(DynamicExit):
    name = "entropy"

    def __init__(self, threshold: float = 0.3, min_layer: int = 1) -> None:
        if threshold < 0:
            raise ValueError(f"exit.threshold={threshold} is below 0: entropy is never negative, use a value >= 0 "
                             "(0 never exits early; larger exits earlier)")
        self.threshold = float(threshold)
        self.min_layer = int(min_layer)

    def knobs(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_layer": self.min_layer}

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return prediction_entropy(logits) < self.threshold
