"""DeeBERT's entropy exit: leave at the first layer whose prediction entropy is below a threshold."""

from __future__ import annotations

import math
from typing import Any

import torch

from raee.calibration.target import Calibrated
from raee.errors import UserError
from raee.exits.base import BatchContext, DynamicExit


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(n, C) logits -> (n,) entropy (nats) of the softmax distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyExit(Calibrated, DynamicExit):
    """``exit.target=accuracy exit.max_drop=0`` chooses the threshold on the validation split instead."""

    name = "entropy"
    knob = "threshold"

    def __init__(self, threshold: float = 0.3, min_layer: int = 1, **calibration: Any) -> None:
        if threshold < 0:
            raise UserError(f"exit.threshold={threshold} is below 0: entropy is never negative, use a value >= 0 "
                            "(0 never exits early; larger exits earlier)")
        self.threshold = float(threshold)
        self.min_layer = int(min_layer)
        self.init_calibration(**calibration)

    def knobs(self) -> dict[str, Any]:
        return self.with_calibration_knobs({"threshold": self.threshold, "min_layer": self.min_layer})

    def default_grid(self, num_layers: int, num_classes: int) -> list[float]:
        """41 thresholds from 0 (never exit early) to ln(C) (exit at min_layer), evenly spaced."""
        return [round(math.log(max(num_classes, 2)) * i / 40, 6) for i in range(41)]

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return prediction_entropy(logits) < self.threshold
