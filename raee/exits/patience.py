"""PABEE's patience exit.

After layer i the counter goes up by one if layer i predicts the same class as layer i-1 and
resets to 0 otherwise; an example exits when the counter reaches ``patience`` (so patience+1
consecutive layers agree), else at the last layer. The first layer that predicts
(``min_layer``: 1 as in PABEE, whose first classifier follows layer 1; 0 adds the embeddings)
starts the counter at 0.
"""

from __future__ import annotations

from typing import Any

import torch

from raee.calibration.target import Calibrated
from raee.exits.base import BatchContext, DynamicExit


class PatienceExit(Calibrated, DynamicExit):
    name = "patience"
    knob = "patience"  # exit.target=... chooses it on the validation split

    def __init__(self, patience: int = 2, min_layer: int = 1, **calibration: Any) -> None:
        self.patience = int(patience)
        self.min_layer = int(min_layer)
        if self.patience < 1:
            raise ValueError(f"exit.patience={patience} must be at least 1 (PABEE's t: exit once t+1 consecutive "
                             "layers agree)")
        self.init_calibration(**calibration)
        self._prev: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.patience > num_layers:
            raise ValueError(f"exit.patience={self.patience} is above the number of layers ({num_layers}): no example "
                             f"could ever exit early; use 1..{num_layers}")

    def knobs(self) -> dict[str, Any]:
        return self.with_calibration_knobs({"patience": self.patience, "min_layer": self.min_layer})

    def default_grid(self, num_layers: int, num_classes: int) -> list[float]:
        return list(range(1, max(num_layers - self.min_layer, 1) + 1))

    def begin(self, ctx: BatchContext) -> None:
        self._prev = torch.full((ctx.batch_size,), -1, dtype=torch.long)
        self._count = torch.zeros(ctx.batch_size, dtype=torch.long)

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        pred = logits.argmax(-1).cpu()
        idx = active.cpu()
        same = pred == self._prev[idx]
        self._count[idx] = torch.where(same, self._count[idx] + 1, torch.zeros_like(pred))
        self._prev[idx] = pred
        return (self._count[idx] >= self.patience).to(logits.device)
