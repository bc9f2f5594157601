"""Bounds and references: the full model, a fixed exit layer, and the oracle."""

from __future__ import annotations

from typing import Any

import torch

from raee.backbones.base import LayerState
from raee.errors import UserError
from raee.exits.base import BatchContext, DynamicExit, PlannedExit, check_layer


class FullModel(PlannedExit):
    """Every example runs all L layers: the reference for accuracy and wall-clock speed-ups."""

    name = "full"
    supports_regression = True

    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        return torch.full((state.batch_size,), ctx.num_layers, dtype=torch.long, device=state.hidden.device)


class FixedLayer(PlannedExit):
    """Every example exits at ``layer`` (0 = embeddings only)."""

    name = "fixed"
    supports_regression = True

    def __init__(self, layer: int) -> None:
        self.layer = int(layer)

    def validate(self, num_layers: int) -> None:
        check_layer(self.layer, num_layers, "exit.layer")

    def knobs(self) -> dict[str, Any]:
        return {"layer": self.layer}

    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        return torch.full((state.batch_size,), self.layer, dtype=torch.long, device=state.hidden.device)


class OracleExit(DynamicExit):
    """Exit at the earliest layer whose prediction is correct (reads the labels: an upper bound,
    not a method); examples no layer gets right run to the last layer.

    Regression: a prediction within ``tolerance`` of the target counts as correct.
    """

    name = "oracle"
    supports_regression = True

    def __init__(self, tolerance: float = 0.5) -> None:
        if not tolerance >= 0:
            raise UserError(f"exit.tolerance={tolerance} must be >= 0 (the largest |prediction - target| that "
                            "counts as correct on a regression task)")
        self.tolerance = float(tolerance)
        self._regression = False

    def knobs(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance} if self._regression else {}

    def prepare(self, backbone: Any, head: Any) -> None:
        super().prepare(backbone, head)
        self._regression = bool(getattr(head, "regression", False))

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if ctx.labels is None:
            raise UserError("the oracle exit needs labels; the data split has none")
        labels = ctx.labels.to(logits.device)[active]
        if self._regression:
            return within_tolerance(logits[:, 0], labels, self.tolerance)
        return logits.argmax(-1) == labels


def within_tolerance(predictions: torch.Tensor, targets: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Regression's "correct": |prediction - target| <= tolerance, elementwise (any matching shapes)."""
    return (predictions.float() - targets.float()).abs() <= tolerance
