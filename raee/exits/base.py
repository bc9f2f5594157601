"""The exit-strategy interface.

Two kinds, both driven by :func:`raee.exit_loop.run_early_exit`:

- :class:`PlannedExit` decides every example's exit layer once, after layer ``plan_layer``
  (full, fixed, RAEE: from retrieval). The head is evaluated only at the chosen layer; a planned
  strategy may instead answer every example itself at ``plan_layer`` (:meth:`PlannedExit.own_logits`,
  kNN: no head, no further layer).
- :class:`DynamicExit` looks at the head's logits after every layer and says which examples
  leave now (entropy, patience, oracle).

Either way, an example that has exited is dropped from the batch: later layers never run on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError


@dataclass
class BatchContext:
    """What a strategy may know about the batch besides hidden states."""

    num_layers: int
    batch_size: int
    texts: list[str]
    text_pairs: list[str] | None = None
    labels: torch.Tensor | None = None  # (B,) only strategies that need them (oracle) may read them
    index: torch.Tensor | None = None  # (B,) positions of the examples in their split
    timings: dict[str, float] = field(default_factory=dict)  # seconds of strategy overheads, e.g. retrieval


class ExitStrategy(ABC):
    """Base of every exit strategy. Subclass :class:`PlannedExit` or :class:`DynamicExit`."""

    #: short name used in configs, summaries and tables
    name: str = "strategy"
    #: strategies that can exit on regression outputs (one real value per example)
    supports_regression: bool = False
    #: strategies that fine-tune the head's classifier themselves in fit() (HashEE): the head is bound, not fitted
    trains_head: bool = False

    def validate(self, num_layers: int) -> None:
        """Raise a clear error when the settings do not fit a backbone with ``num_layers`` layers."""

    def fit(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any = None,
            progress: bool = True) -> None:
        """Learn or build what the strategy needs from the training split (RAEE's database,
        HashEE's hash and fine-tuning). Runs once per experiment, before evaluation."""

    def check_task(self, regression: bool) -> None:
        """Refuse a regression task when this strategy cannot exit on real-valued outputs."""
        if regression and not self.supports_regression:
            raise UserError(f"exit={self.name} decides on class predictions and cannot handle a regression task: "
                            "use full, fixed, oracle, patience, raee or hashee")

    def prepare(self, backbone: LayerwiseBackbone, head: Any) -> None:
        """One-time setup with the bound backbone and head (load a database, check compatibility)."""
        self.validate(backbone.num_layers)
        self.check_task(getattr(head, "regression", False))

    def knobs(self) -> dict[str, Any]:
        """The settings that distinguish runs of this strategy (reported in summaries)."""
        return {}

    def begin(self, ctx: BatchContext) -> None:
        """Called at the start of every batch (reset per-example state)."""

    def run_layer(self, backbone: LayerwiseBackbone, state: LayerState) -> LayerState:
        """Compute the next layer; token-level methods (HashEE) override this."""
        return backbone.run_layer(state)


class PlannedExit(ExitStrategy):
    #: the layer after which the exit layers are known (0 = right after the embeddings)
    plan_layer: int = 0

    @abstractmethod
    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        """(B,) exit layer in 0..L for every example of ``state`` (the whole batch)."""

    def own_logits(self, state: LayerState, ctx: BatchContext) -> torch.Tensor | None:
        """(B, C) logits when the strategy answers every example itself at :attr:`plan_layer`, without
        the head (the retrieval-only kNN baseline: its neighbours' labels); the exit loop then records
        them with exit layer ``plan_layer`` and runs no further layer. None (default): the head answers
        at the layers :meth:`plan` chooses."""
        return None


class DynamicExit(ExitStrategy):
    #: first layer whose prediction is looked at (DeeBERT/PABEE have off-ramps from layer 1 on)
    min_layer: int = 0

    def validate(self, num_layers: int) -> None:
        check_layer(self.min_layer, num_layers, "exit.min_layer")

    def observe(self, state: LayerState, active: torch.Tensor, ctx: BatchContext) -> None:
        """Sees the state of every layer (before ``min_layer`` too) ahead of :meth:`should_exit`; active: (n,)
        batch positions of its examples. Retrieval strategies take their keys here; most ignore it."""

    @abstractmethod
    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """logits: (n, C) of the n examples still running at ``layer``; active: (n,) their batch positions.
        Returns (n,) bool: True for those that exit at this layer."""

    def answer(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """(n, C) what the examples of :meth:`should_exit`'s last call answer with if they leave: the head's logits
        (default), or the strategy's own for some (the neighbours' vote of exit=raee_choice)."""
        return logits


def check_layer(value: int, num_layers: int, what: str) -> None:
    if not 0 <= int(value) <= num_layers:
        raise UserError(f"{what}={value} is outside 0..{num_layers} (layer 0 is the embedding output, "
                        f"{num_layers} the last layer of this backbone)")
