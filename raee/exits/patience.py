"""PABEE's patience exit.

After layer i the counter goes up by one if layer i predicts the same class as layer i-1 and
resets to 0 otherwise; an example exits when the counter reaches ``patience`` (so patience+1
consecutive layers agree), else at the last layer. The first layer that predicts
(``min_layer``: 1 as in PABEE, whose first classifier follows layer 1; 0 adds the embeddings)
starts the counter at 0.

Regression (PABEE's rule for real-valued outputs): layer i "agrees" with layer i-1 when their
predictions differ by less than ``regression_threshold``.
"""

from __future__ import annotations

from typing import Any

import torch

from raee.calibration.target import Calibrated
from raee.errors import UserError
from raee.exits.base import BatchContext, DynamicExit


class PatienceExit(Calibrated, DynamicExit):
    name = "patience"
    supports_regression = True
    knob = "patience"  # exit.target=... chooses it on the validation split

    def __init__(self, patience: int = 2, min_layer: int = 1, regression_threshold: float = 0.1,
                 **calibration: Any) -> None:
        self.patience = int(patience)
        self.min_layer = int(min_layer)
        if self.patience < 1:
            raise UserError(f"exit.patience={patience} must be at least 1 (PABEE's t: exit once t+1 consecutive "
                            "layers agree)")
        if not regression_threshold > 0:
            raise UserError(f"exit.regression_threshold={regression_threshold} must be > 0 (two layers' regression "
                            "outputs agree when they differ by less than it)")
        self.regression_threshold = float(regression_threshold)
        self._regression = False
        self.init_calibration(**calibration)
        self._prev: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.patience > num_layers:
            raise UserError(f"exit.patience={self.patience} is above the number of layers ({num_layers}): no example "
                            f"could ever exit early; use 1..{num_layers}")

    def knobs(self) -> dict[str, Any]:
        knobs = {"patience": self.patience, "min_layer": self.min_layer}
        knobs |= {"regression_threshold": self.regression_threshold} if self._regression else {}
        return self.with_calibration_knobs(knobs)

    def prepare(self, backbone: Any, head: Any) -> None:
        super().prepare(backbone, head)
        self._regression = bool(getattr(head, "regression", False))

    def default_grid(self, num_layers: int, num_classes: int) -> list[float]:
        return list(range(1, max(num_layers - self.min_layer, 1) + 1))

    def begin(self, ctx: BatchContext) -> None:
        # previous layer's prediction per example: a class id, or a value for regression (NaN: none yet)
        self._prev = torch.full((ctx.batch_size,), float("nan"))
        self._count = torch.zeros(ctx.batch_size, dtype=torch.long)

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        idx = active.cpu()
        if self._regression:
            pred = logits[:, 0].detach().float().cpu()
            same = (pred - self._prev[idx]).abs() < self.regression_threshold  # NaN (first layer) compares False
        else:
            pred = logits.argmax(-1).cpu().float()
            same = pred == self._prev[idx]
        self._count[idx] = torch.where(same, self._count[idx] + 1, torch.zeros_like(self._count[idx]))
        self._prev[idx] = pred
        return (self._count[idx] >= self.patience).to(logits.device)
